"""What a fit must satisfy before dp_auto trains it, and what it reads from the Trainer to plan it.

Every refusal here happens before the first step and names the fix.
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import DoublePrecision, MixedPrecision, Precision
from lightning.pytorch.plugins.precision.half import HalfPrecision
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_autodp import _compat
from lightning_autodp.mechanism.calibration import NoiseCalibrator
from lightning_autodp.safeguards.batchnorm import refuse_unsupported_batch_norms

_RECURRENT_LAYERS = (nn.RNNBase,)


def validate_trainer(trainer: pl.Trainer, precision: Precision) -> None:
    """Refuse Trainer settings dp_auto cannot train privately with, naming the fix."""
    module = trainer.lightning_module
    if not module.automatic_optimization:
        raise RuntimeError(
            "dp_auto needs automatic optimization: it clips, noises and steps for you. Remove "
            "`self.automatic_optimization = False` and return the loss from training_step."
        )
    if trainer.gradient_clip_val is not None:
        raise ValueError(
            f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) cannot be combined with dp_auto: "
            "DP clips each example's gradient itself. Remove gradient_clip_val and set "
            "DPAutoStrategy(max_grad_norm=...) if you need another clipping bound."
        )
    if isinstance(precision, HalfPrecision) or type(precision) not in (
        Precision,
        DoublePrecision,
        MixedPrecision,
    ):
        raise ValueError(
            f"dp_auto does not support the precision plugin {type(precision).__name__}. Use "
            "precision='32-true', '64-true', '16-mixed' or 'bf16-mixed'."
        )


def find_calibrator(callbacks: list[pl.Callback]) -> NoiseCalibrator | None:
    """The first callback that implements :class:`NoiseCalibrator` (a PrivacyBudget), else None."""
    return next((cb for cb in callbacks if isinstance(cb, NoiseCalibrator)), None)


def planned_steps(trainer: pl.Trainer) -> int | None:
    """Optimizer steps this fit will take if nothing stops it (``None``: unbounded)."""
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        return None
    return max(int(total) - trainer.global_step, 0)


#: what Lightning plans when neither ``max_epochs`` nor ``max_steps`` is given
_LIGHTNING_DEFAULT_MAX_EPOCHS = 1000


def warn_if_run_length_unchosen(trainer: pl.Trainer) -> None:
    """Warn when sigma is about to be calibrated for Lightning's default of 1000 epochs.

    Lightning replaces an unset ``max_epochs`` by 1000 before any callback runs, so the two cannot be
    told apart here: 1000 epochs with ``max_steps=-1`` is taken as the user not choosing.
    """
    if trainer.max_steps != -1 or trainer.max_epochs != _LIGHTNING_DEFAULT_MAX_EPOCHS:
        return
    rank_zero_warn(
        "PrivacyBudget calibrates the noise multiplier for the planned run, and this Trainer plans "
        "max_epochs=1000, Lightning's default when neither max_epochs nor max_steps is set: sigma will "
        "be large enough for 1000 epochs. Set Trainer(max_epochs=...) or Trainer(max_steps=...) to the "
        "run you want; or, to train until the budget is spent, fix sigma with "
        "DPAutoStrategy(noise_multiplier=1.0) and Trainer(max_epochs=-1)."
    )


def refuse_ddp_wrapper_arguments(kwargs: dict[str, Any]) -> None:
    """dp_auto never builds DistributedDataParallel: its arguments would be silently dropped."""
    refused = sorted(kwargs)
    if refused:
        raise TypeError(
            f"DPAutoStrategy does not accept {', '.join(map(repr, refused))}: dp_auto does not wrap the "
            "model in torch's DistributedDataParallel (it all-reduces the clipped, noised sums itself), "
            "so DistributedDataParallel arguments and DDP communication hooks would have no effect. "
            "Remove them; the all-reduce's bucket size is DPAutoStrategy(bucket_cap_mb=...)."
        )


def run_seed() -> int:
    """The run's seed (``seed_everything``), else torch's initial seed."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None else torch.initial_seed()


def validate_layers(module: nn.Module) -> None:
    """Reject layers whose per-example gradients are undefined or unsupported, naming the fix."""
    # BatchNorm: frozen and in eval mode it is per-example (the mode is checked at every step)
    refuse_unsupported_batch_norms(module)
    for name, sub in module.named_modules():
        if isinstance(sub, _compat.INSTANCE_NORM_BASE) and sub.track_running_stats:
            raise ValueError(
                f"Layer {name!r} is {type(sub).__name__}(track_running_stats=True), whose running statistics "
                "mix examples. Use track_running_stats=False or nn.GroupNorm."
            )
        if isinstance(sub, _RECURRENT_LAYERS) and any(p.requires_grad for p in sub.parameters()):
            raise ValueError(
                f"Layer {name!r} is {type(sub).__name__}, which has no per-sample gradient support. Use "
                "opacus.layers.DPLSTM / DPGRU / DPRNN (same interface), e.g. via "
                "opacus.validators.ModuleValidator.fix(model)."
            )
