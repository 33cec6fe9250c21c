"""Every private Lightning, torch and Opacus access of lightning-autodp, in one place.

Each function or constant wraps one private attribute, class or function; ``tests/test_compat.py``
exercises each, so a Lightning or torch upgrade that moves one breaks a named test here instead of
a training run. It sits at the package's root, below every layer: the engines and the safeguards
use it without importing the Lightning integration, and Lightning is imported inside the functions
that need it, so the engines import the torch constants below without pulling in Lightning.

Not routed through here (each is the subclass side of a documented extension point, not a reach
into someone else's object): ``DPAutoStrategy`` overriding ``DDPStrategy._setup_model`` /
``_configure_launcher`` and setting ``self._launcher``, and ``PrivacyBudget`` calling
``Callback._generate_state_key``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    import lightning.pytorch as pl

#: torch's base classes of the batch-statistics norms (BatchNorm*d, SyncBatchNorm; InstanceNorm*d)
BATCH_NORM_BASE: type[nn.Module] = nn.modules.batchnorm._BatchNorm
INSTANCE_NORM_BASE: type[nn.Module] = nn.modules.instancenorm._InstanceNorm


def sync_module_states(module: nn.Module) -> None:
    """Broadcast rank 0's parameters and buffers to every rank (what DDP's constructor does)."""
    from lightning.pytorch.strategies.ddp import _sync_module_states

    _sync_module_states(module)


def fit_loop_restarting(trainer: pl.Trainer) -> bool:
    """True while the fit loop resumes from a checkpoint."""
    return bool(trainer.fit_loop.restarting)


def batches_processed_in_epoch(trainer: pl.Trainer) -> int:
    """Micro-batches of the current epoch Lightning has processed (restored on resume).

    ``processed``, not ``completed``: a checkpoint saved in ``on_train_batch_end`` has not counted
    its batch as completed yet, but Lightning resumes after it.
    """
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


def grad_scaler(precision_plugin: Any) -> Any:
    """The precision plugin's ``torch.amp.GradScaler`` (``16-mixed``), else None."""
    return getattr(precision_plugin, "scaler", None)


def is_compiled_lightning_module(module: nn.Module) -> bool:
    """True when ``module`` came to the Trainer as ``torch.compile(module)`` (Lightning's ``from_compiled``
    records ``_compiler_ctx`` on the unwrapped module)."""
    return getattr(module, "_compiler_ctx", None) is not None


def donated_buffers_enabled() -> bool:
    """torch's AOTAutograd donates saved-tensor buffers to a compiled backward (``donated_buffer``),
    which forbids a second backward over the same graph (``retain_graph=True``)."""
    import torch._functorch.config as functorch_config

    return bool(getattr(functorch_config, "donated_buffer", False))


def copy_without_hooks(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` (same parameters) whose forward runs none of its hooks.

    torch keeps a module's hooks in private ordered dicts; the copy gets empty ones, so the
    original keeps its hooks.
    """
    plain = copy.copy(module)
    for attr in (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks_with_kwargs",
    ):
        if hasattr(plain, attr):
            setattr(plain, attr, OrderedDict())
    return plain


def clear_opacus_current_grad_sample(p: nn.Parameter) -> None:
    """Forget the per-sample gradient Opacus's hooks keep on ``p`` while a backward is in progress."""
    if hasattr(p, "_current_grad_sample"):
        p._current_grad_sample = None


def is_view(tensor: Tensor) -> bool:
    """True when ``tensor`` is a view of another tensor's storage (torch's ``Tensor._base``)."""
    return tensor._base is not None
