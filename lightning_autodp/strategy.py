"""The Lightning glue: :class:`DPAutoStrategy`, registered as ``strategy="dp_auto"``."""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _distributed_is_initialized
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.precision import DoublePrecision, MixedPrecision, Precision
from lightning.pytorch.plugins.precision.half import HalfPrecision
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.strategies.ddp import _sync_module_states
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.distributed.constants import default_pg_timeout
from torch.optim import Optimizer

from lightning_autodp.checks import FirstStepChecks
from lightning_autodp.clipping import ClippingMode, clip_factors, validate_clipping
from lightning_autodp.engines import ENGINE_NAMES, PerSampleEngine, make_engine
from lightning_autodp.noise import NoiseSource
from lightning_autodp.sampling import EmptyBatch, check_poisson_compatible, poisson_dataloader

log = logging.getLogger(__name__)

#: ``noise_multiplier`` default: calibrated by a PrivacyBudget callback if there is one, else 1.0.
AUTO = "auto"
_DEFAULT_NOISE_MULTIPLIER = 1.0
_RECURRENT_LAYERS = (nn.RNNBase,)


class DPAutoStrategy(DDPStrategy):
    r"""Differentially private training with automatic clipping, on one process or many.

    The strategy takes over what happens between the loss and ``optimizer.step()``. For every
    optimizer step with logical batch :math:`S` (all micro-batches of ``accumulate_grad_batches``
    on all ranks), the gradient handed to the optimizer is

    .. math::

        \tilde g = \frac{1}{B}\Big(\sum_{i \in S} C_i\, g_i + \sigma R\, z\Big),\qquad z \sim N(0, I)

    where :math:`g_i` is the gradient of example :math:`i`'s own loss term over every trainable
    parameter, :math:`C_i` the clipping factor of ``clipping`` (see :mod:`lightning_autodp.clipping`),
    :math:`R` = ``max_grad_norm``, :math:`\sigma` = ``noise_multiplier`` and :math:`B` the expected
    logical batch size :math:`qN` (or the actual number of examples without Poisson sampling).

    Args:
        noise_multiplier: :math:`\sigma`. ``"auto"`` (default): chosen by a
            :class:`~lightning_autodp.PrivacyBudget` callback for its target epsilon, or 1.0 when
            there is none. ``None``: must be calibrated by such a callback.
        clipping: ``"auto_s"`` (default) :math:`R/(\|g_i\|+\gamma)`, ``"auto_v"`` :math:`R/\|g_i\|`,
            ``"abadi"`` :math:`\min(1, R/\|g_i\|)`.
        gamma: the stability constant of AUTO-S.
        max_grad_norm: :math:`R`. Under AUTO-S/V it only rescales the update: it drops out under
            Adam-type optimizers and folds into the learning rate under SGD.
        poisson_sampling: replace the training DataLoader by Poisson samples with rate
            :math:`q` = ``batch_size * accumulate_grad_batches * world_size / len(dataset)``, the
            sampling the privacy accounting assumes. Without it batches are used as they come.
        engine: how per-example norms and clipped sums are computed: ``"bk"`` (one backward pass,
            no per-example gradients; keeps layer inputs and output gradients until the end of
            backward), ``"ghost"`` (the same layers with two backward passes: more time, peak
            memory of non-private training), ``"hooks"`` (Opacus per-sample gradients, exact for
            any layer Opacus supports) or ``"auto"`` (``"bk"`` when it supports every layer).
        loss_reduction: ``"mean"`` if ``training_step`` returns the mean of the examples' losses
            (the default, as ``F.cross_entropy`` does), ``"sum"`` if it returns their sum.
        secure_mode: draw noise from the operating system's CSPRNG with Opacus's mitigation of
            floating-point attacks. Off by default (reproducible runs with ``seed_everything``).
        run_checks: check the first optimizer step of every fit against silent privacy failures
            (see :mod:`lightning_autodp.checks`); on by default, negligible cost.
        \**kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy` (e.g.
            ``process_group_backend``, ``timeout``, ``start_method``).

    Example::

        import lightning as L
        import lightning_autodp  # registers "dp_auto"

        trainer = L.Trainer(strategy="dp_auto", max_epochs=3)
        trainer = L.Trainer(strategy=lightning_autodp.DPAutoStrategy(noise_multiplier=1.0, clipping="auto_s"))
        trainer = L.Trainer(strategy="dp_auto", accelerator="gpu", devices=8, num_nodes=4)  # DDP

    Data parallelism: each rank clips its own examples and sums them; rank 0 alone adds the noise
    to its sum *before* the all-reduce, so the reduced gradient carries the noise exactly once
    (:math:`\sigma R`, not :math:`\sqrt{W}\sigma R`) and every rank ends with the same gradient.
    Drawing on one rank needs no shared generator state, and survives ranks seeded differently.
    """

    strategy_name = "dp_auto"

    def __init__(
        self,
        noise_multiplier: float | None | Literal["auto"] = AUTO,
        clipping: ClippingMode = "auto_s",
        gamma: float = 0.01,
        max_grad_norm: float = 1.0,
        poisson_sampling: bool = True,
        engine: Literal["auto", "bk", "ghost", "hooks"] = "auto",
        loss_reduction: Literal["mean", "sum"] = "mean",
        secure_mode: bool = False,
        run_checks: bool = True,
        timeout: timedelta | None = default_pg_timeout,
        **kwargs: Any,
    ) -> None:
        super().__init__(timeout=timeout, **kwargs)
        if noise_multiplier not in (None, AUTO) and not (
            isinstance(noise_multiplier, (int, float)) and noise_multiplier >= 0
        ):
            raise ValueError(
                f"noise_multiplier must be >= 0 (or None/'auto' to calibrate it with a PrivacyBudget "
                f"callback), got {noise_multiplier!r}."
            )
        validate_clipping(clipping, max_grad_norm, gamma)
        if engine not in ENGINE_NAMES:
            raise ValueError(f"Unknown engine={engine!r}. Use one of {', '.join(map(repr, ENGINE_NAMES))}.")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.")
        self.noise_multiplier: float | None | str = (
            float(noise_multiplier) if isinstance(noise_multiplier, (int, float)) else noise_multiplier
        )
        self.clipping = clipping
        self.gamma = gamma
        self.max_grad_norm = max_grad_norm
        self.poisson_sampling = poisson_sampling
        self.engine = engine
        self.loss_reduction = loss_reduction
        self.secure_mode = secure_mode
        #: optimizer steps taken (each one consumed privacy), identical on every rank
        self.steps = 0
        self.dataset_size: int | None = None
        self._sample_rate: float | None = None
        self._engine: PerSampleEngine | None = None
        self._noise: NoiseSource | None = None
        self._summed: dict[nn.Parameter, Tensor] = {}
        self._examples_in_step = 0
        self._capture: contextlib.ExitStack | None = None
        self._fitting = False
        self._poisson_loader: Any = None
        self._noise_state_to_load: dict | None = None
        # --- audit/checks extension points (lightning_autodp.audit, lightning_autodp.checks) ---
        self.run_checks = run_checks
        self._checks: FirstStepChecks | None = None
        #: set by lightning_autodp.audit.PrivacyAudit: virtual examples added to the clipped sum
        self.canaries: Any = None
        # --- end audit/checks ---

    # ------------------------------------------------------------------ registry and launch

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name,
            cls,
            description="Differentially private training with automatic clipping (lightning-autodp)",
        )

    def _configure_launcher(self) -> None:
        """No launcher for a single process, as Lightning's single-device strategy.

        DDP's script launcher would export ``LOCAL_RANK``/``MASTER_PORT`` into this process even for
        one device, and a later multi-process launch from the same process (a notebook, a test
        suite) would then believe it is already a child and wait forever for its peers.
        """
        if self.num_nodes * self.num_processes > 1 or self.cluster_environment.creates_processes_externally:
            super()._configure_launcher()
        else:
            self._launcher = None

    def setup_distributed(self) -> None:
        """Join the process group only when there is more than one process."""
        if self.num_nodes * self.num_processes > 1:
            super().setup_distributed()
            _destroy_process_group_at_exit()
            return
        reset_seed()
        self.set_world_ranks()

    # ------------------------------------------------------------------ properties

    @property
    def sample_rate(self) -> float:
        """``q``: the probability that one example enters one optimizer step (all ranks)."""
        if self._sample_rate is None:
            raise RuntimeError(
                "dp_auto's sample rate is known once the training DataLoader has been set up "
                "(from on_train_start, or after trainer.estimated_stepping_batches)."
            )
        return self._sample_rate

    @property
    def expected_batch_size(self) -> float:
        """``B = q * N``, the expected number of examples per optimizer step (all ranks)."""
        assert self.dataset_size is not None
        return self.sample_rate * self.dataset_size

    # ------------------------------------------------------------------ setup and validation

    def setup(self, trainer: pl.Trainer) -> None:
        self._fitting = trainer.state.fn == TrainerFn.FITTING
        if self._fitting:
            self._validate_trainer(trainer)
            self._resolve_noise_multiplier(trainer)
        if self.world_size > 1:
            super().setup(trainer)  # DDPStrategy.setup: configure_ddp() when fitting
        else:
            Strategy.setup(self, trainer)  # the same steps without a process group

    def configure_ddp(self) -> None:
        self.model = self._setup_model(self.model)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        """Attach the per-sample engine in place instead of wrapping in DistributedDataParallel.

        torch's DDP would all-reduce the raw ``p.grad`` after backward; under DP the all-reduce
        must carry the clipped sums plus noise instead (see :meth:`optimizer_step`).
        """
        if not self._fitting:
            return model
        module = self.lightning_module
        assert module is not None
        _validate_layers(module)
        if self.world_size > 1 and _distributed_is_initialized():
            _sync_module_states(module)  # what DDP's constructor would do: rank 0's weights everywhere
        self._engine = make_engine(self.engine, module)
        rank_zero_info(
            f"dp_auto: engine={self._engine.name}, clipping={self.clipping}, "
            f"max_grad_norm={self.max_grad_norm}"
            + (f", gamma={self.gamma}" if self.clipping == "auto_s" else "")
            + f", poisson_sampling={self.poisson_sampling}"
        )
        self._noise = NoiseSource(seed=_base_seed(), secure_mode=self.secure_mode)
        self._checks = FirstStepChecks(self) if self.run_checks else None  # audit/checks
        if self._noise_state_to_load is not None:
            self._noise.load_state_dict(self._noise_state_to_load)
            self._noise_state_to_load = None
        return model

    def _validate_trainer(self, trainer: pl.Trainer) -> None:
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
        precision = self.precision_plugin
        if isinstance(precision, HalfPrecision) or type(precision) not in (
            Precision,
            DoublePrecision,
            MixedPrecision,
        ):
            raise ValueError(
                f"dp_auto does not support the precision plugin {type(precision).__name__}. Use "
                "precision='32-true', '64-true', '16-mixed' or 'bf16-mixed'."
            )

    def _resolve_noise_multiplier(self, trainer: pl.Trainer) -> None:
        calibrator = any(getattr(cb, "calibrates_noise_multiplier", False) for cb in trainer.callbacks)
        if self.noise_multiplier == AUTO:
            self.noise_multiplier = None if calibrator else _DEFAULT_NOISE_MULTIPLIER
        if self.noise_multiplier is None and not calibrator:
            raise ValueError(
                "DPAutoStrategy(noise_multiplier=None) needs a callback that calibrates it: add "
                "lightning_autodp.PrivacyBudget(target_epsilon=..., delta=...) to Trainer(callbacks=...), "
                "or pass a number, e.g. DPAutoStrategy(noise_multiplier=1.0)."
            )

    # ------------------------------------------------------------------ data

    def process_dataloader(self, dataloader: object) -> object:
        """Swap the training DataLoader for Poisson samples of the same dataset.

        Lightning calls this for every loader; only the training loader of ``fit`` changes
        (validation, test and predict run as usual, without per-sample cost).
        """
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or not trainer.training:
            return dataloader
        micro_batches = trainer.accumulate_grad_batches
        if not self.poisson_sampling:
            self._record_sampling_without_poisson(dataloader, micro_batches)
            return dataloader
        loader = check_poisson_compatible(dataloader)
        self.dataset_size = len(loader.dataset)  # type: ignore[arg-type]
        expected = loader.batch_size * micro_batches * self.world_size  # type: ignore[operator]
        self._sample_rate = min(1.0, expected / self.dataset_size)
        self._poisson_loader = poisson_dataloader(
            loader,
            sample_rate=self._sample_rate,
            num_replicas=self.world_size,
            rank=self.global_rank,
            micro_batches=micro_batches,
            seed=_base_seed(),
        )
        return self._poisson_loader

    def _record_sampling_without_poisson(self, dataloader: object, micro_batches: int) -> None:
        dataset = getattr(dataloader, "dataset", None)
        batch_size = getattr(dataloader, "batch_size", None)
        try:
            self.dataset_size = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            self.dataset_size = None
        if self.dataset_size and batch_size:
            self._sample_rate = min(1.0, batch_size * micro_batches * self.world_size / self.dataset_size)

    def on_train_start(self) -> None:
        """On a mid-epoch resume, continue the epoch's Poisson stream after the batches already trained.

        The count comes from Lightning's restored loop progress rather than the sampler's own
        counter, which includes batches prefetched but never trained on.
        """
        super().on_train_start()
        trainer = self.lightning_module.trainer
        if self._poisson_loader is None or not trainer.fit_loop.restarting:
            return
        # ``processed``: a checkpoint saved in on_train_batch_end has not counted its batch as
        # completed yet, but Lightning resumes after it.
        processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if processed < trainer.num_training_batches:
            self._poisson_loader.batch_sampler.skip_next(processed)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """Add the noise generator's state, so that a resumed run draws the noise it would have."""
        if self._noise is not None:
            checkpoint["dp_auto"] = {"noise": self._noise.state_dict(), "steps": self.steps}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        state = checkpoint.get("dp_auto")
        if state is not None:
            if self._noise is not None:
                self._noise.load_state_dict(state["noise"])
            else:
                self._noise_state_to_load = state["noise"]
        return checkpoint

    # ------------------------------------------------------------------ the training step

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Run the user's step with per-sample capture on; an empty Poisson batch runs no step."""
        self._close_capture()
        batch = args[0] if args else kwargs.get("batch")
        if isinstance(batch, EmptyBatch):
            # No example drew this micro-batch: the step still happens (noise only).
            return torch.zeros((), device=self.root_device, requires_grad=True)
        assert self._engine is not None
        self._capture = contextlib.ExitStack()
        self._capture.enter_context(self._engine.capturing())
        return super().training_step(*args, **kwargs)

    def backward(
        self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any
    ) -> Tensor:
        """Backward, then clip this micro-batch's examples and add them to the step's sum."""
        if not self._grad_scaler_active() and not torch.isfinite(closure_loss).all():
            self._close_capture()
            raise FloatingPointError(
                f"The training loss is {closure_loss.item()}. dp_auto stops rather than take noise-only "
                "steps: lower the learning rate, check the data for NaN/inf, or use precision='16-mixed' "
                "whose GradScaler skips such steps."
            )
        if closure_loss.dim() != 0:
            self._close_capture()
            raise ValueError(
                "training_step must return a scalar loss for dp_auto, got shape "
                f"{tuple(closure_loss.shape)}. "
                "Reduce it with .mean() (loss_reduction='mean') or .sum() (loss_reduction='sum')."
            )
        assert self._engine is not None
        try:
            if self._engine.needs_backward_root:
                closure_loss = self._backward_keeping_graph(closure_loss, optimizer, *args, **kwargs)
            else:
                closure_loss = super().backward(closure_loss, optimizer, *args, **kwargs)
        finally:
            self._close_capture()
        self._clip_and_accumulate()
        return closure_loss

    def _backward_keeping_graph(
        self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any
    ) -> Tensor:
        """``Strategy.backward`` with the graph retained and the loss that was backpropagated
        (after the precision plugin's GradScaler scaling) handed to a two-pass engine."""
        assert self._engine is not None
        module = self.lightning_module
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        kwargs["retain_graph"] = True
        self.precision_plugin.backward(closure_loss, module, optimizer, *args, **kwargs)
        self._engine.set_backward_root(closure_loss)
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    def _close_capture(self) -> None:
        if self._capture is not None:
            self._capture.close()
            self._capture = None

    def _grad_scaler_active(self) -> bool:
        return getattr(self.precision_plugin, "scaler", None) is not None

    def _backward_scale(self, batch_size: int) -> float:
        """``s`` with ``raw_grad_i = s * g_i``: the loss reduction, Lightning's division of the loss
        by ``accumulate_grad_batches``, and the GradScaler's factor."""
        trainer = self.lightning_module.trainer
        scale = 1.0 / trainer.accumulate_grad_batches
        if self.loss_reduction == "mean":
            scale /= batch_size
        if self._grad_scaler_active():
            scale *= float(self.precision_plugin.scaler.get_scale())  # type: ignore[attr-defined]
        return scale

    def _clip_and_accumulate(self) -> None:
        r"""Add this micro-batch's :math:`\sum_i C_i g_i` to the step's running sum.

        With raw per-example gradients :math:`\hat g_i = s\, g_i` from the engine,
        :math:`\|g_i\| = \|\hat g_i\| / s` and :math:`C_i g_i = (C_i / s)\,\hat g_i`.
        """
        engine = self._engine
        assert engine is not None
        batch_size = engine.batch_size
        if batch_size > 0:
            scale = self._backward_scale(batch_size)
            norms = engine.per_sample_squared_norms().sqrt() / scale
            if not self._grad_scaler_active() and not torch.isfinite(norms).all():
                raise FloatingPointError(
                    "A per-example gradient norm is NaN or inf. dp_auto stops rather than take noise-only "
                    "steps: lower the learning rate or check the data."
                )
            factors = self.clip_factors(norms)
            engine.accumulate_weighted_sum(factors / scale, self._summed)
            self._examples_in_step += batch_size
        engine.reset()
        # The raw (unclipped) gradients autograd may have left must never reach the optimizer.
        for p in engine.params:
            p.grad = None

    def clip_factors(self, norms: Tensor) -> Tensor:
        """The configured clipping factors ``C_i`` for per-example norms (examples and audit canaries)."""
        return clip_factors(norms, self.clipping, self.max_grad_norm, self.gamma)

    # ------------------------------------------------------------------ the optimizer step

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the closure (forward + backward of the last micro-batch), privatize, then step."""

        def private_closure() -> Any:
            result = closure()
            self._privatize_gradients()
            return result

        result = super().optimizer_step(optimizer, private_closure, model, **kwargs)
        if self._checks is not None:  # audit/checks
            self._checks.after_step(optimizer)
        return result

    def _privatize_gradients(self) -> None:
        r"""Set ``p.grad`` to :math:`(\sum_i C_i g_i + \sigma R z) / B` for every trainable ``p``.

        1. rank 0 adds :math:`\sigma R z` to its clipped sum (one draw for the whole world);
        2. the sums (and the example count) are all-reduced: :math:`\sum_{ranks}`;
        3. divide by :math:`B = qN` (Poisson) or the number of examples in the step.
        Under a GradScaler the result is put back in scaled units, so that Lightning's
        ``scaler.unscale_`` and inf/NaN check act on it as on ordinary gradients.
        """
        engine, noise = self._engine, self._noise
        assert engine is not None and noise is not None
        sigma = self.noise_multiplier
        if not isinstance(sigma, float):
            raise RuntimeError(
                "dp_auto has no noise_multiplier at the first optimizer step; the PrivacyBudget callback "
                "should have calibrated it in on_train_start."
            )
        params = engine.params
        if self.canaries is not None:  # audit/checks: virtual examples through the same clipping
            self.canaries.add_to_sum(self._summed, params, self.clip_factors, self.global_rank)
        if self._checks is not None:  # audit/checks
            self._checks.before_noise(self._summed, params)
        sums = [self._summed.pop(p, None) for p in params]
        sums = [
            s if s is not None else torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
            for s, p in zip(sums, params)
        ]
        if self.global_rank == 0 and sigma > 0:
            std = sigma * self.max_grad_norm
            for s in sums:
                s.add_(noise.gaussian(std, like=s).to(s.dtype))
        examples = float(self._examples_in_step)
        if self.world_size > 1 and _distributed_is_initialized():
            sums, examples = _all_reduce_sums(sums, examples)
        divisor = self.expected_batch_size if self.poisson_sampling else max(examples, 1.0)
        if self._grad_scaler_active():
            divisor /= float(self.precision_plugin.scaler.get_scale())  # type: ignore[attr-defined]
        for p, s in zip(params, sums):
            p.grad = (s / divisor).to(p.dtype)
        self._examples_in_step = 0
        self.steps += 1
        if self._checks is not None:  # audit/checks
            self._checks.after_privatize(params, divisor, examples)

    # ------------------------------------------------------------------ teardown

    def teardown(self) -> None:
        self._close_capture()
        if self._engine is not None:
            self._engine.remove()
            self._engine = None
        self._summed.clear()
        super().teardown()


@functools.cache
def _destroy_process_group_at_exit() -> None:
    """Destroy the process group before the interpreter finalizes (registered once).

    A process that exits with a gloo group alive can abort (SIGABRT): gloo's worker threads may
    still hold tensors whose release needs the GIL while Python is being torn down
    (pytorch/pytorch#179291). Destroying the group from ``atexit`` runs while Python is alive.
    """

    def destroy() -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    atexit.register(destroy)


def _all_reduce_sums(sums: list[Tensor], examples: float) -> tuple[list[Tensor], float]:
    """Sum the clipped (and, on rank 0, noised) sums and the example counts over all ranks."""
    flat = torch.cat([s.reshape(-1) for s in sums] + [sums[0].new_tensor([examples])])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, offset = [], 0
    for s in sums:
        out.append(flat[offset : offset + s.numel()].view_as(s))
        offset += s.numel()
    return out, float(flat[-1].item())


def _base_seed() -> int:
    """The run's seed (``seed_everything``), else torch's initial seed; 63 bits."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return (int(seed) if seed is not None else torch.initial_seed()) & 0x7FFF_FFFF_FFFF_FFFF


def _validate_layers(module: nn.Module) -> None:
    """Reject layers whose per-example gradients are undefined or unsupported, naming the fix."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"Layer {name!r} is {type(sub).__name__}: batch normalisation mixes the examples of a "
                "batch, so per-example gradients and DP do not exist for it. Replace it with "
                "nn.GroupNorm (e.g. opacus.validators.ModuleValidator.fix(model) does this)."
            )
        if isinstance(sub, nn.modules.instancenorm._InstanceNorm) and sub.track_running_stats:
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
