"""The Lightning glue: :class:`DPAutoStrategy`, registered as ``strategy="dp_auto"``.

The DP math lives in :mod:`lightning_autodp.mechanism.step` (framework-free); this module maps Lightning's
hooks onto it. Private Lightning/torch accesses go through :mod:`lightning_autodp.integration._compat`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import math
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.precision import DoublePrecision, MixedPrecision, Precision
from lightning.pytorch.plugins.precision.half import HalfPrecision
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.distributed.constants import default_pg_timeout
from torch.optim import Optimizer
from typing_extensions import override

from lightning_autodp.engines import ENGINE_NAMES, PerSampleEngine, make_engine
from lightning_autodp.integration import _compat, compiled, physical, summary
from lightning_autodp.mechanism import distributed
from lightning_autodp.mechanism.accounting import merge_segments
from lightning_autodp.mechanism.batches import infer_batch_size
from lightning_autodp.mechanism.calibration import CalibrationRequest, NoiseCalibrator
from lightning_autodp.mechanism.clipping import (
    DEFAULT_CLIPPING,
    ClippingMode,
    resolve_gamma,
    validate_clipping,
)
from lightning_autodp.mechanism.noise import NoiseSource
from lightning_autodp.mechanism.observers import StepContext, StepObserver
from lightning_autodp.mechanism.sampling import (
    DistributedPoissonBatchSampler,
    EmptyBatch,
    check_poisson_compatible,
    poisson_dataloader,
)
from lightning_autodp.mechanism.step import DEFAULT_BUCKET_MB, DPStep, PrivacyLedger
from lightning_autodp.safeguards.batchnorm import BatchNormGuard, refuse_unsupported_batch_norms
from lightning_autodp.safeguards.checks import RunTimeChecks, check_clipping_bound
from lightning_autodp.safeguards.verify import (
    DEFAULT_EXAMPLES,
    EngineVerificationError,
    GradientLayout,
    check_verify_args,
    verify_engine,
)

#: ``noise_multiplier`` default: calibrated by a PrivacyBudget callback if there is one, else 1.0.
AUTO = "auto"
_DEFAULT_NOISE_MULTIPLIER = 1.0
_RECURRENT_LAYERS = (nn.RNNBase,)
#: the checkpoint entry holding :meth:`DPAutoStrategy.dp_state_dict`
CHECKPOINT_KEY = "dp_auto"


class DPAutoStrategy(DDPStrategy):
    r"""Differentially private training with automatic clipping, on one process or many.

    At a glance (details under Args and Attributes):

    * DP arguments: ``noise_multiplier`` (:math:`\sigma`; ``"auto"``: calibrated by a
      :class:`~lightning_autodp.PrivacyBudget`, else 1.0), ``max_grad_norm`` (:math:`R`),
      ``clipping`` (``"psac"``, ``"auto_s"``, ``"auto_v"``, ``"abadi"``), ``gamma``, ``poisson_sampling``,
      ``engine``, ``seed``, ``secure_mode``.
    * What a fit spent: ``noise_multiplier``, ``steps``, ``dataset_size`` (:math:`N`),
      ``sample_rate`` (:math:`q`), ``expected_batch_size`` and ``ledger`` (the ``(sigma, q)`` of
      every step); epsilon is ``PrivacyBudget.epsilon``, or the line printed at the end of fit.

    The strategy takes over what happens between the loss and ``optimizer.step()``. For every
    optimizer step with logical batch :math:`S` (all micro-batches of ``accumulate_grad_batches``
    on all ranks), the gradient handed to the optimizer is

    .. math::

        \tilde g = \frac{1}{B}\Big(\sum_{i \in S} C_i\, g_i + \sigma R\, z\Big),\qquad z \sim N(0, I)

    where :math:`g_i` is the gradient of example :math:`i`'s own loss term over every trainable
    parameter, :math:`C_i` the clipping factor of ``clipping`` (see
    :mod:`lightning_autodp.mechanism.clipping`),
    :math:`R` = ``max_grad_norm``, :math:`\sigma` = ``noise_multiplier`` and :math:`B` the expected
    logical batch size :math:`qN` (or the actual number of examples without Poisson sampling).
    The math is in :mod:`lightning_autodp.mechanism.step`; this class maps Lightning's hooks onto it.

    Args:
        noise_multiplier: :math:`\sigma`. ``"auto"`` (default): chosen by a
            :class:`~lightning_autodp.PrivacyBudget` callback for its target epsilon, or 1.0 when
            there is none (a resumed run keeps the checkpoint's sigma). ``None``: must be
            calibrated by such a callback. The strategy asks the callback once, when training
            starts (any :class:`~lightning_autodp.mechanism.calibration.NoiseCalibrator`), so
            every ``on_train_start`` hook sees the calibrated value. Fixed once the first step of
            a fit is taken.
        clipping: ``"psac"`` (default) :math:`R/(\|g_i\|+\gamma/(\|g_i\|+\gamma))` (fitted examples
            keep small gradients), ``"auto_s"`` :math:`R/(\|g_i\|+\gamma)`,
            ``"auto_v"`` :math:`R/\|g_i\|`,
            ``"abadi"`` :math:`\min(1, R/\|g_i\|)`. The default is the one the utility study
            measured closest to a tuned Abadi threshold (see
            :data:`~lightning_autodp.mechanism.clipping.DEFAULT_CLIPPING`).
        gamma: PSAC's :math:`r` (default 1) or the stability constant of AUTO-S (default 0.01);
            ``None`` picks the mode's default.
        max_grad_norm: :math:`R`. Under AUTO-S/V and PSAC it only rescales the update: it drops out under
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
        verify: before the first optimizer update of every fit, check the engine's per-example
            norms and clipped sum on the first ``verify_examples`` examples of the first micro-batch
            against each example's own backward pass, and refuse to train on a mismatch (see
            :mod:`lightning_autodp.safeguards.verify`). ``False`` turns the check off.
        verify_examples: how many examples the verification checks (default 4).
        seed: the seed of the noise and sampling streams (each derived from it by SHA-256 with a
            domain tag, see :mod:`lightning_autodp.mechanism.randomness`). ``None`` (default): the run's seed
            (``seed_everything``, else torch's initial seed). Anyone who knows it can recompute the
            noise and the samples: keep it secret, or use ``secure_mode``. Restored from a checkpoint.
        secure_mode: draw Poisson samples from the operating system's CSPRNG (``os.urandom``) and
            noise from ChaCha20 keyed by 32 fresh bytes of it per step, computed on the parameters'
            device, with Opacus's floating-point mitigation; no seed, not reproducible.
        bucket_cap_mb: under data parallelism the clipped sums are all-reduced in buckets of at
            most this many megabytes (as DDP's ``bucket_cap_mb``), never as one flat copy of all.
        run_checks: check the first optimizer step of every fit in full, and every 25th step after
            it, against silent privacy failures (see :mod:`lightning_autodp.safeguards.checks`); on by
            default, under 2% of a step. A :class:`~lightning_autodp.RunTimeChecks` instance sets how
            often and how many noise coordinates (``RunTimeChecks(check_every=10)``).
        observers: :class:`~lightning_autodp.mechanism.observers.StepObserver` objects called at
            fixed points of every DP step (checks, audit canaries, your own); more can be added with
            :meth:`add_observer`.
        max_physical_batch_size: the most examples run through forward and backward at once. A
            larger micro-batch (Poisson batches have no upper bound) is cut into pieces of at most
            this size inside the same optimizer step: same update, same accounting, memory of one
            piece (see :mod:`lightning_autodp.integration.physical`). ``None`` (default): no cap.
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
            process_group_backend, timeout, start_method: as for
            :class:`~lightning.pytorch.strategies.DDPStrategy`.
        \**kwargs: refused with a ``TypeError``: arguments of torch's ``DistributedDataParallel``
            wrapper (``find_unused_parameters``, ``static_graph``, ...) and DDP communication hooks
            would have no effect, since dp_auto does not wrap the model in DDP (it all-reduces the
            clipped, noised sums itself).

    Attributes:
        noise_multiplier: :math:`\sigma` in use: a float once training has started (calibrated
            then if it was left to a :class:`~lightning_autodp.PrivacyBudget`), else as passed.
        steps: optimizer steps taken so far (each one spent privacy); the same on every rank.
        dataset_size: :math:`N`, the number of training examples (known once the training
            DataLoader is set up).
        sample_rate: :math:`q`, the probability that an example enters one step (property).
        expected_batch_size: :math:`B = qN` (property).

    Every fit prints one line at its start (sigma, q, N, planned steps, engine, clipping) and one at
    its end (steps, why it stopped, sigma, q, and epsilon at delta: the PrivacyBudget's, or at a
    default delta without one; see :mod:`lightning_autodp.integration.summary`).

    Example::

        import lightning as L
        import lightning_autodp  # registers "dp_auto"

        trainer = L.Trainer(strategy="dp_auto", max_epochs=3)
        trainer = L.Trainer(strategy=lightning_autodp.DPAutoStrategy(noise_multiplier=1.0, clipping="auto_s"))
        trainer = L.Trainer(strategy="dp_auto", accelerator="gpu", devices=8, num_nodes=4)  # DDP

    Data parallelism: each rank clips its own examples and sums them; rank 0 alone adds the noise
    to its sum *before* the all-reduce, so the reduced gradient carries the noise exactly once
    (:math:`\sigma R`, not :math:`\sqrt{W}\sigma R`) and every rank ends with the same gradient.

    Empty Poisson steps: a micro-batch that drew no example arrives as
    :class:`~lightning_autodp.EmptyBatch` (``len(batch) == 0``). The step is still taken (noise
    only). The module's ``training_step``, ``transfer_batch_to_device`` and
    ``on_after_batch_transfer`` are not called for it, so it logs nothing itself (but Lightning's
    logger connector re-emits the last ``on_step`` value of a metric on any step that did not log
    it, as for any skipped training step; log with ``on_epoch=True`` to avoid that). Exactly these
    hooks do see the ``EmptyBatch``: ``on_before_batch_transfer`` (called by Lightning's loop before
    the strategy), and ``on_train_batch_start``/``on_train_batch_end`` of the module and the
    callbacks, where ``outputs`` holds a placeholder ``{"loss": tensor(0.)}`` (no loss was computed:
    test ``isinstance(batch, EmptyBatch)`` before using it).

    The privacy ledger :attr:`ledger` records the ``(sigma, q)`` of every step taken and is saved
    and restored with checkpoints.

    The methods below are the Lightning strategy hooks the Trainer calls; those inherited from
    :class:`~lightning.pytorch.strategies.DDPStrategy` (``barrier``, ``broadcast``, ``reduce``,
    ``all_gather``, ...) work as they do there.
    """

    strategy_name = "dp_auto"
    #: the description Lightning's strategy registry shows for :attr:`strategy_name`
    strategy_description = "Differentially private training with automatic clipping (lightning-autodp)"
    #: the framework-free DP step (:class:`~lightning_autodp.mechanism.step.DPStep`: all-reduce of full sums)
    dp_step_class: type[DPStep] = DPStep

    def __init__(
        self,
        noise_multiplier: float | None | Literal["auto"] = AUTO,
        clipping: ClippingMode = DEFAULT_CLIPPING,
        gamma: float | None = None,
        max_grad_norm: float = 1.0,
        poisson_sampling: bool = True,
        engine: Literal["auto", "bk", "ghost", "hooks"] = "auto",
        loss_reduction: Literal["mean", "sum"] = "mean",
        seed: int | None = None,
        secure_mode: bool = False,
        verify: bool = True,  # verify
        verify_examples: int = DEFAULT_EXAMPLES,  # verify
        bucket_cap_mb: float = DEFAULT_BUCKET_MB,
        run_checks: bool | RunTimeChecks = True,
        observers: Sequence[StepObserver] = (),
        max_physical_batch_size: int | None = None,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **kwargs: Any,
    ) -> None:
        # DDPStrategy's own arguments are explicit; everything else it would hand to
        # DistributedDataParallel is refused (kwargs are deliberately not forwarded).
        _refuse_ddp_wrapper_arguments(kwargs)
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        if noise_multiplier not in (None, AUTO):
            _check_noise_multiplier(noise_multiplier)
        gamma = resolve_gamma(clipping, gamma)
        validate_clipping(clipping, max_grad_norm, gamma)
        if engine not in ENGINE_NAMES:
            raise ValueError(f"Unknown engine={engine!r}. Use one of {', '.join(map(repr, ENGINE_NAMES))}.")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.")
        if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool)):
            raise TypeError(f"seed must be an int or None (the run's seed), got {seed!r}.")
        if not (isinstance(bucket_cap_mb, (int, float)) and bucket_cap_mb > 0):
            raise ValueError(f"bucket_cap_mb must be a positive number of megabytes, got {bucket_cap_mb!r}.")
        self._noise_multiplier: float | None | str = (
            float(noise_multiplier) if isinstance(noise_multiplier, (int, float)) else noise_multiplier
        )
        self.clipping = clipping
        self.gamma = gamma
        self.max_grad_norm = max_grad_norm
        self.poisson_sampling = poisson_sampling
        self.engine = engine
        self.loss_reduction = loss_reduction
        self.secure_mode = secure_mode
        # -- verify (lightning_autodp.safeguards.verify): check the engine before the first update of each fit
        check_verify_args(verify, verify_examples)
        self.verify, self.verify_examples, self._verify_pending = verify, verify_examples, False
        # -- end verify
        self.bucket_cap_mb = float(bucket_cap_mb)
        physical.check_max_physical_batch_size(max_physical_batch_size)
        self.max_physical_batch_size = max_physical_batch_size
        #: what the mechanism ran: ``(sigma, q)`` of every optimizer step (see :class:`PrivacyLedger`)
        self.ledger = PrivacyLedger()
        self.dataset_size: int | None = None
        self._seed_arg = seed
        self._seed: int | None = None
        self._restored_seed: int | None = None
        self._sample_rate: float | None = None
        self._engine: PerSampleEngine | None = None
        self._batch_norms: BatchNormGuard | None = None
        self._dp_step: DPStep | None = None
        self._noise: NoiseSource | None = None
        self._capture: contextlib.ExitStack | None = None
        self._fitting = False
        self._steps_at_fit_start: int | None = None  # ledger steps when this fit began; None: not fitting
        self._calibrator: NoiseCalibrator | None = None  # to be asked for sigma when training starts
        self._accounted_by_calibrator = False  # this fit has a calibrator: its checkpoints need one
        self._restored_with_calibrator = False  # the restored checkpoint was written with one
        self._poisson_loader: Any = None
        self._step_context: StepContext | None = None
        self._param_names: dict[nn.Parameter, str] = {}
        self.run_checks = run_checks
        self._checks: RunTimeChecks | None = None
        self._observers: list[StepObserver] = []
        for observer in observers:
            self.add_observer(observer)

    # ------------------------------------------------------------------ registry and launch

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description=cls.strategy_description)

    @override
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

    @override
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
    def runs_distributed(self) -> bool:
        """True when this strategy runs on several processes joined in a process group."""
        return self.world_size > 1 and distributed.initialized()

    @property
    def steps(self) -> int:
        """Optimizer steps taken (each one consumed privacy), identical on every rank: ``ledger.steps``."""
        return self.ledger.steps

    @property
    def noise_multiplier(self) -> float | None | str:
        r""":math:`\sigma` of the coming steps: a float once training starts, else as passed.

        A sigma left to a calibrator (``"auto"``/None with a :class:`~lightning_autodp.PrivacyBudget`)
        is settled by :meth:`settle_noise_multiplier` when training starts: by the first reader
        once the training data is set up (e.g. any callback's ``on_train_start``, whatever the
        order of the callbacks), at the latest in this strategy's own ``on_train_start``.
        Setting it is :meth:`set_noise_multiplier`: allowed until the first step of a fit.
        """
        if self._calibrator is not None and self._training_data_ready():
            self.settle_noise_multiplier()
        return self._noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value: float) -> None:
        self.set_noise_multiplier(value)

    def set_noise_multiplier(self, sigma: float) -> None:
        """Fix sigma for this fit (a calibrating callback's proposal); refused after its first step.

        Every step records the sigma it used in :attr:`ledger`, so a sigma set before another fit
        starts a new accounted segment; within a fit it would make the running plan wrong.
        """
        if self._steps_at_fit_start is not None and self.ledger.steps > self._steps_at_fit_start:
            raise RuntimeError(
                f"noise_multiplier cannot change after the first optimizer step of a fit (it is "
                f"{self._noise_multiplier}, {self.ledger.steps - self._steps_at_fit_start} steps taken). Set "
                "DPAutoStrategy(noise_multiplier=...) before trainer.fit, or calibrate it with PrivacyBudget."
            )
        _check_noise_multiplier(sigma)
        self._noise_multiplier = float(sigma)
        self._calibrator = None  # a sigma set explicitly is not recalibrated

    @property
    def verification_pending(self) -> bool:
        """True until this fit's engine verification has run (see :meth:`verify_first_batch`)."""
        return self._verify_pending

    @verification_pending.setter
    def verification_pending(self, pending: bool) -> None:
        self._verify_pending = bool(pending)

    @property
    def observers(self) -> list[StepObserver]:
        """The step observers called at every DP step: those registered, then the run-time checks."""
        return [*self._observers, *([self._checks] if self._checks is not None else [])]

    def add_observer(self, observer: StepObserver) -> None:
        """Register a :class:`~lightning_autodp.mechanism.observers.StepObserver` for every following step."""
        if not isinstance(observer, StepObserver):
            raise TypeError(
                f"add_observer takes a lightning_autodp.StepObserver, got {type(observer).__name__}. "
                "Subclass StepObserver and override the hooks you need."
            )
        if observer not in self._observers:
            self._observers.append(observer)

    def remove_observer(self, observer: StepObserver) -> None:
        """Stop calling ``observer`` (no error if it was not registered)."""
        if observer in self._observers:
            self._observers.remove(observer)

    @property
    def poisson_sampler(self) -> DistributedPoissonBatchSampler | None:
        """The Poisson batch sampler drawing the data (None before setup, or without Poisson sampling)."""
        loader = self._poisson_loader
        return loader.batch_sampler if loader is not None else None

    @property
    def seed(self) -> int | None:
        """The seed of the noise and sampling streams of this fit (None in secure mode / before fit)."""
        return self._seed

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

    @property
    def noise_std(self) -> float:
        r""":math:`\sigma R / B`: the standard deviation of the noise in each coordinate of the gradient
        the optimizer receives (:class:`~lightning_autodp.mechanism.optim.DPAdamBC` subtracts its square).

        Known once the fit has started (sigma calibrated, the DataLoader set up). Without Poisson
        sampling :math:`B` is the nominal logical batch; a shorter last batch has more noise per example.
        """
        if not isinstance(self._noise_multiplier, (int, float)):
            raise RuntimeError(
                f"noise_std is known once sigma is (noise_multiplier={self._noise_multiplier!r}): read it "
                "from the optimizer's step, not in configure_optimizers (pass a callable)."
            )
        return self._noise_multiplier * self.max_grad_norm / self.expected_batch_size

    # ------------------------------------------------------------------ setup and validation

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        self._fitting = trainer.state.fn == TrainerFn.FITTING
        if self._fitting:
            self._validate_trainer(trainer)
            self._resolve_noise_multiplier(trainer)
            self._resolve_seed()
            self._steps_at_fit_start = self.ledger.steps
        if self.world_size > 1:
            super().setup(trainer)  # DDPStrategy.setup: configure_ddp() when fitting
        else:
            Strategy.setup(self, trainer)  # the same steps without a process group

    @override
    def configure_ddp(self) -> None:
        self.model = self._setup_model(self.model)

    @override
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
        if not any(p.requires_grad for p in module.parameters()):
            raise ValueError(
                f"{type(module).__name__} has no trainable parameter (every parameter has "
                "requires_grad=False): dp_auto has nothing to train privately. Unfreeze the parameters to "
                "train (p.requires_grad_(True), e.g. a head or adapters) before Trainer.fit."
            )
        self.prepare_module(module)
        self._engine = make_engine(self.engine, module)
        self._batch_norms = BatchNormGuard(module)
        compiled.check_compiled_module(module, self._engine)  # before training, not mid-step
        self._verify_pending = self.verify  # verify: once per fit, on the first non-empty micro-batch
        names = {id(p): n for n, p in module.named_parameters()}
        self._param_names = {p: n for n, p in module.named_parameters()}
        self._dp_step = self.dp_step_class(
            self._engine.params, self.clipping, self.max_grad_norm, self.gamma, names=names,
            bucket_mb=self.bucket_cap_mb,
        )  # fmt: skip
        self._noise = NoiseSource(seed=self._seed or 0, rank=self.global_rank, secure_mode=self.secure_mode)
        if isinstance(self.run_checks, RunTimeChecks):
            self._checks = self.run_checks
        else:
            self._checks = RunTimeChecks(seed=self._seed or 0) if self.run_checks else None
        return model

    def prepare_module(self, module: pl.LightningModule) -> None:
        """Get the module ready for the engine, in place, before the optimizers are configured.

        dp_auto: broadcast rank 0's parameters and buffers, as DDP's constructor would. Subclasses
        that distribute the module differently (:class:`~lightning_autodp.DPFSDPStrategy` shards
        it) override this.
        """
        if self.runs_distributed:
            _compat.sync_module_states(module)

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
        """Decide where this fit's sigma comes from, before the fit: every source in one place.

        In order: a restored privacy ledger (a resumed run keeps the sigma it was trained and
        accounted with, unless the user passed a number), the user's number, a
        :class:`~lightning_autodp.mechanism.calibration.NoiseCalibrator` among the callbacks (asked
        by :meth:`settle_noise_multiplier` once ``q`` and the planned steps are known), else 1.0.
        """
        calibrator = find_calibrator(trainer.callbacks)
        self._refuse_resume_without_calibrator(calibrator)
        self._calibrator = None
        restored = self.ledger.last[0] if self.ledger.last is not None else None
        if self._noise_multiplier in (AUTO, None) and restored is not None:
            rank_zero_info(f"dp_auto: noise_multiplier={restored:.6g} restored from the privacy ledger.")
            self._noise_multiplier = restored
        elif (
            isinstance(self._noise_multiplier, float)
            and restored is not None
            and restored != self._noise_multiplier
        ):
            rank_zero_warn(
                f"dp_auto resumes with noise_multiplier={self._noise_multiplier}, but the checkpoint's steps "
                f"ran with {restored}: the privacy ledger starts a new segment with the new sigma."
            )
        if self._noise_multiplier in (AUTO, None):
            if calibrator is not None:
                self._calibrator = calibrator  # asked once q and the planned steps are known
            elif self._noise_multiplier == AUTO:
                self._noise_multiplier = _DEFAULT_NOISE_MULTIPLIER
            else:
                raise ValueError(
                    "DPAutoStrategy(noise_multiplier=None) needs a callback that calibrates it: add "
                    "lightning_autodp.PrivacyBudget(target_epsilon=..., delta=...) to "
                    "Trainer(callbacks=...), or pass a number, e.g. DPAutoStrategy(noise_multiplier=1.0)."
                )
        self._accounted_by_calibrator = calibrator is not None

    def _refuse_resume_without_calibrator(self, calibrator: NoiseCalibrator | None) -> None:
        """A run accounted by a PrivacyBudget must be resumed with one: epsilon must not go unreported."""
        if self._restored_with_calibrator and calibrator is None:
            raise ValueError(
                "The checkpoint was trained with a PrivacyBudget, but this Trainer has none: the resumed "
                "run's epsilon would go unreported. Add the same PrivacyBudget(target_epsilon=..., "
                "delta=..., accountant=...) to Trainer(callbacks=...); the spent budget is restored from "
                "the checkpoint's privacy ledger."
            )

    def _training_data_ready(self) -> bool:
        """True once fit's training DataLoader is set up: ``q`` and the planned steps are known."""
        module = self.lightning_module
        trainer = module.trainer if module is not None else None
        return (
            self._fitting
            and self._sample_rate is not None
            and trainer is not None
            and trainer.train_dataloader is not None
        )

    def settle_noise_multiplier(self) -> float:
        """Ask the calibrator for this fit's sigma, once, if it was left to one; return sigma.

        Called when training starts (see :attr:`noise_multiplier`); the request holds ``q``, the
        planned optimizer steps of this fit and what the ledger already spent, so the answer does
        not depend on which hook asked first.
        """
        calibrator, self._calibrator = self._calibrator, None
        if calibrator is not None:
            trainer = self.lightning_module.trainer
            planned = planned_steps(trainer)
            _warn_if_run_length_unchosen(trainer)
            request = CalibrationRequest(
                sample_rate=self.sample_rate,
                planned_steps=planned,
                spent=tuple(merge_segments(self.ledger.accountable_segments())),
            )
            sigma = calibrator.calibrate_noise_multiplier(request)
            _check_noise_multiplier(sigma)
            self._noise_multiplier = float(sigma)
        if not isinstance(self._noise_multiplier, float):
            raise RuntimeError(
                "dp_auto's noise_multiplier is settled when training starts; it was read before "
                "(e.g. in setup or on_fit_start), when it is not known yet."
            )
        return self._noise_multiplier

    def _resolve_seed(self) -> None:
        """The seed of this fit: the user's, else the checkpoint's, else the run's."""
        if self.secure_mode:
            self._seed = None
            return
        if self._seed_arg is not None:
            if self._restored_seed is not None and self._restored_seed != self._seed_arg:
                rank_zero_warn(
                    f"DPAutoStrategy(seed={self._seed_arg}) differs from the checkpoint's seed: the resumed "
                    "run draws other noise and samples than the interrupted one would have (still private)."
                )
            self._seed = self._seed_arg
        elif self._restored_seed is not None:
            self._seed = self._restored_seed
        else:
            self._seed = _run_seed()

    # ------------------------------------------------------------------ data

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """Swap the training DataLoader for Poisson samples of the same dataset.

        Lightning calls this for every loader; only the training loader of ``fit`` changes
        (validation, test and predict run as usual, without per-sample cost). A reloaded training
        loader (``reload_dataloaders_every_n_epochs``) may change ``q``: the ledger then starts a
        new segment at the next step.
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
        _warn_if_no_amplification(expected, self.dataset_size)
        self._poisson_loader = poisson_dataloader(
            loader,
            sample_rate=self._sample_rate,
            num_replicas=self.world_size,
            rank=self.global_rank,
            micro_batches=micro_batches,
            seed=self._seed or 0,
            secure_mode=self.secure_mode,
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
            expected = batch_size * micro_batches * self.world_size
            self._sample_rate = min(1.0, expected / self.dataset_size)
            _warn_if_no_amplification(expected, self.dataset_size)

    @override
    def on_train_start(self) -> None:
        """On a mid-epoch resume, continue the epoch's Poisson stream after the batches already trained.

        The count comes from Lightning's restored loop progress rather than the sampler's own
        counter, which includes batches prefetched but never trained on.
        """
        super().on_train_start()
        trainer = self.lightning_module.trainer
        self.settle_noise_multiplier()  # if no callback has read it yet
        summary.log_start_line(self, trainer)
        if self._poisson_loader is None or not _compat.fit_loop_restarting(trainer):
            return
        processed = _compat.batches_processed_in_epoch(trainer)
        if processed < trainer.num_training_batches:
            self._poisson_loader.batch_sampler.skip_next(processed)

    def on_train_end(self) -> None:
        """Print the end-of-fit line: sigma, q, steps, epsilon at delta, and why training stopped."""
        super().on_train_end()
        summary.log_fit_summary(self, self.lightning_module.trainer)  # after the callbacks' on_train_end

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        """An :class:`EmptyBatch` skips the module's transfer hooks: it has nothing to transfer."""
        if isinstance(batch, EmptyBatch):
            return batch
        return super().batch_to_device(batch, device, dataloader_idx)

    # ------------------------------------------------------------------ checkpoints

    def dp_state_dict(self) -> dict[str, Any]:
        """The strategy's privacy state: the ledger and the seed of the streams.

        In seeded mode the seed is as secret as the noise: keep checkpoints private.
        """
        return {
            "ledger": self.ledger.state_dict(),
            "seed": self._seed,
            "secure_mode": self.secure_mode,
            "calibrator": self._accounted_by_calibrator,
        }

    def load_dp_state_dict(self, state: dict[str, Any]) -> None:
        if "ledger" in state:
            self.ledger.load_state_dict(state["ledger"])
        else:  # written before the ledger existed: the step count only, at an unknown sigma
            raise ValueError(
                "This checkpoint's dp_auto state has no privacy ledger (an older lightning-autodp wrote it): "
                "its steps cannot be accounted. Resume with the version that wrote it, or start a new run."
            )
        self._restored_seed = state.get("seed")
        self._restored_with_calibrator = bool(state.get("calibrator", False))

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """Add the privacy ledger and the seed: a resumed run is accounted and drawn as the original."""
        checkpoint[CHECKPOINT_KEY] = self.dp_state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self.restore_dp_state(checkpoint)
        return checkpoint

    def restore_dp_state(self, checkpoint: dict[str, Any]) -> None:
        """Restore the privacy state of a loaded checkpoint (the sigma it implies is settled in setup)."""
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is not None:
            self.load_dp_state_dict(state)

    # ------------------------------------------------------------------ the training step

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Run the user's step with per-sample capture on; an empty Poisson batch runs no user code.

        An exception the engine's machinery caused in the user's code (Opacus's hooks and an in-place
        operation) is re-raised as the engine's error naming the layer and the fix, chained.
        """
        try:
            return self._captured_training_step(args, kwargs)
        except Exception as err:
            explained = self._engine.explain_error(err) if self._engine is not None else None
            if explained is None:
                raise
            raise explained from err

    def _captured_training_step(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        self._close_capture()
        if self.max_physical_batch_size is not None:  # the leading pieces train here, the last below
            args, kwargs = physical.run_leading_physical_batches(self, args, kwargs)
        batch = args[0] if args else kwargs.get("batch")
        empty = isinstance(batch, EmptyBatch)
        # -- verify (safeguards.verify): engine vs a per-example loop, before the first update
        if self._verify_pending:
            with self.precision_plugin.train_step_context(), self._batch_norms_armed():
                self._verify_pending = not self.verify_first_batch(args, kwargs, empty=empty)
        # -- end verify
        if empty:
            # No example drew this micro-batch: the step still happens (noise only). A graph-less
            # zero lets Lightning's closure run backward; nothing is logged for it.
            return torch.zeros((), device=self.root_device, requires_grad=True)
        assert self._engine is not None
        self._capture = contextlib.ExitStack()
        self._engine.expect_batch_size(infer_batch_size(batch))  # engines: ids shared by the batch
        self._capture.enter_context(self._engine.capturing())
        self._capture.enter_context(self._batch_norms_armed())
        return super().training_step(*args, **kwargs)

    def _batch_norms_armed(self) -> contextlib.AbstractContextManager:
        """Every BatchNorm call is checked inside: one in train mode would mix the examples."""
        return self._batch_norms.armed() if self._batch_norms is not None else contextlib.nullcontext()

    def verify_first_batch(
        self, args: tuple, kwargs: dict, *, empty: bool = False, layout: GradientLayout | None = None
    ) -> bool:
        """Run :func:`verify_engine` on this rank's micro-batch; True once verified, False to wait.

        An empty Poisson micro-batch has nothing to verify: the next one is used. Under data
        parallelism every rank stops if any rank's verification failed (a rank that raised alone
        would leave the others waiting in the first all-reduce until the process group times out).
        ``layout`` tells how gradients are read (sharded strategies read shards).
        """
        if empty:
            return False
        assert self._engine is not None
        failure: Exception | None = None
        try:
            verify_engine(
                self.lightning_module, self._engine, args, kwargs,
                loss_reduction=self.loss_reduction, examples=self.verify_examples, layout=layout,
            )  # fmt: skip
            # the engine is right; the weights the step gives its examples must bound each one by R
            assert self._dp_step is not None
            check_clipping_bound(self._dp_step, self.max_grad_norm)
        except Exception as err:  # noqa: BLE001 - any failure must reach the other ranks too
            failure = err
        if self.runs_distributed:
            failed = torch.tensor([float(failure is not None)], device=self.root_device)
            distributed.all_reduce_sum(failed)
            if failure is None and failed.item() > 0:
                raise EngineVerificationError(
                    f"dp_auto's verification before the first update failed on {int(failed.item())} other "
                    "rank(s) (their error names the parameters); no rank trains."
                )
        if failure is not None:
            raise failure
        return True

    @override
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
        assert self._engine is not None and self._dp_step is not None
        try:
            if self._engine.needs_backward_root:
                # A two-pass engine backpropagates the loss again: keep the graph, and hand it the
                # root the first pass used. Of the precision plugins dp_auto accepts, only a
                # GradScaler changes the root (MixedPrecision.pre_backward: scaler.scale(loss)).
                kwargs["retain_graph"] = True
                root = closure_loss
                closure_loss = super().backward(closure_loss, optimizer, *args, **kwargs)
                scaler = _compat.grad_scaler(self.precision_plugin)
                self._engine.set_backward_root(scaler.scale(root) if scaler is not None else root)
            else:
                closure_loss = super().backward(closure_loss, optimizer, *args, **kwargs)
        finally:
            self._close_capture()
        scale = self._backward_scale(self._engine.batch_size)
        self._dp_step.clip_and_accumulate(self._engine, scale, check_finite=not self._grad_scaler_active())
        return closure_loss

    def _close_capture(self) -> None:
        if self._capture is not None:
            self._capture.close()
            self._capture = None

    def _grad_scaler_active(self) -> bool:
        return _compat.grad_scaler(self.precision_plugin) is not None

    def _backward_scale(self, batch_size: int) -> float:
        """``s`` with ``raw_grad_i = s * g_i``: the loss reduction, Lightning's division of the loss
        by ``accumulate_grad_batches``, and the GradScaler's factor."""
        trainer = self.lightning_module.trainer
        scale = 1.0 / trainer.accumulate_grad_batches
        if self.loss_reduction == "mean" and batch_size > 0:
            scale /= batch_size
        if self._grad_scaler_active():
            scale *= float(_compat.grad_scaler(self.precision_plugin).get_scale())
        return scale

    # ------------------------------------------------------------------ the optimizer step

    @override
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
        if self._step_context is not None:
            for observer in self.observers:
                observer.after_step(self._step_context, optimizer)
            self._step_context = None
        return result

    def _privatize_gradients(self) -> None:
        r"""Set ``p.grad`` to :math:`(\sum_i C_i g_i + \sigma R z) / B` (see :meth:`DPStep.privatize`).

        Rank 0 alone draws the noise; every rank records ``(sigma, q)`` in the ledger.
        """
        dp_step, noise = self._dp_step, self._noise
        assert dp_step is not None and noise is not None
        sigma = self.settle_noise_multiplier()  # settled in on_train_start; a no-op here
        scaler = _compat.grad_scaler(self.precision_plugin)
        ctx = self._step_context = self._make_step_context(sigma, scaler)
        observers = self.observers
        if ctx.fit_step == 0:
            for observer in observers:
                observer.on_fit_start(ctx)
        for observer in observers:  # virtual examples (canaries) join the sum through dp_step's clipping
            observer.contribute(ctx)
        for observer in observers:
            observer.before_noise(ctx)
        noise.start_step(self.ledger.steps)
        divisor, examples = dp_step.privatize(
            sigma=sigma,
            q=self._sample_rate,
            # one rank draws the noise of the whole sum, or (sharded) every rank that of its own shard
            noise=noise if dp_step.every_rank_draws_noise or self.global_rank == 0 else None,
            ledger=self.ledger,
            divisor=self.expected_batch_size if self.poisson_sampling else None,
            reduce=distributed.all_reduce_sum if self.runs_distributed else None,
            bucket_mb=self.bucket_cap_mb,
            grad_scale=float(scaler.get_scale()) if scaler is not None else 1.0,
        )
        for observer in observers:
            observer.on_batch_sampled(ctx, int(round(examples)))
        for observer in observers:
            observer.after_privatize(ctx, divisor, examples)

    def _make_step_context(self, sigma: float, scaler: Any) -> StepContext:
        """What the step observers may read about the step about to be privatized."""
        assert self._dp_step is not None
        fit_start = self._steps_at_fit_start or 0
        return StepContext(
            dp_step=self._dp_step,
            params=self._dp_step.params,
            sigma=sigma,
            max_grad_norm=self.max_grad_norm,
            sample_rate=self._sample_rate,
            dataset_size=self.dataset_size,
            sampler=self.poisson_sampler if self.poisson_sampling else None,
            step=self.ledger.steps,
            fit_step=self.ledger.steps - fit_start,
            rank=self.global_rank,
            world_size=self.world_size,
            reduce=distributed.all_reduce_sum if self.runs_distributed else None,
            ledger=self.ledger,
            grad_scaler=scaler,
            optimizers=self.optimizers,
            names=self._param_names,
        )

    # ------------------------------------------------------------------ teardown

    @override
    def teardown(self) -> None:
        self._close_capture()
        if self._engine is not None:
            self._engine.remove()
            self._engine = None
        if self._batch_norms is not None:
            self._batch_norms.remove()
            self._batch_norms = None
        if self._dp_step is not None:
            self._dp_step.clear()
            self._dp_step = None
        self._steps_at_fit_start = None
        self._calibrator = None  # a fit that failed before training started asks no one afterwards
        super().teardown()


def require_dp_auto(trainer: pl.Trainer, what: str) -> DPAutoStrategy:
    """The Trainer's :class:`DPAutoStrategy`, or a ``TypeError`` naming the fix.

    ``what`` completes "``what`` needs dp_auto", e.g. ``"PrivacyBudget accounts the privacy of"``.
    """
    if not isinstance(trainer.strategy, DPAutoStrategy):
        raise TypeError(
            f"{what} dp_auto, but the Trainer's strategy is {type(trainer.strategy).__name__}. Use "
            "L.Trainer(strategy='dp_auto', ...) or strategy=lightning_autodp.DPAutoStrategy(...)."
        )
    return trainer.strategy


@functools.cache
def _destroy_process_group_at_exit() -> None:
    """Destroy the process group before the interpreter finalizes (registered once).

    A process that exits with a gloo group alive can abort (SIGABRT): gloo's worker threads may
    still hold tensors whose release needs the GIL while Python is being torn down
    (pytorch/pytorch#179291). Destroying the group from ``atexit`` runs while Python is alive.
    """

    def destroy() -> None:
        if distributed.initialized():
            dist.destroy_process_group()

    atexit.register(destroy)


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


def _warn_if_run_length_unchosen(trainer: pl.Trainer) -> None:
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


def _check_noise_multiplier(sigma: object) -> None:
    if isinstance(sigma, bool) or not (isinstance(sigma, (int, float)) and 0 <= sigma < float("inf")):
        raise ValueError(
            f"noise_multiplier must be >= 0 and finite (or None/'auto' to calibrate it with a "
            "PrivacyBudget "
            f"callback), got {sigma!r}."
        )


def _refuse_ddp_wrapper_arguments(kwargs: dict[str, Any]) -> None:
    """dp_auto never builds DistributedDataParallel: its arguments would be silently dropped."""
    refused = sorted(kwargs)
    if refused:
        raise TypeError(
            f"DPAutoStrategy does not accept {', '.join(map(repr, refused))}: dp_auto does not wrap the "
            "model in torch's DistributedDataParallel (it all-reduces the clipped, noised sums itself), "
            "so DistributedDataParallel arguments and DDP communication hooks would have no effect. "
            "Remove them; the all-reduce's bucket size is DPAutoStrategy(bucket_cap_mb=...)."
        )


def _warn_if_no_amplification(expected_batch: int, dataset_size: int) -> None:
    """q is clamped to 1 when the logical batch is not smaller than the dataset: say what that costs."""
    if expected_batch >= dataset_size:
        rank_zero_warn(
            f"dp_auto: the logical batch (batch_size * accumulate_grad_batches * devices = {expected_batch}) "
            f"is not smaller than the training set (N = {dataset_size}), so q = 1: every example enters "
            "every step, there is no amplification by sampling, and each step spends the privacy of the "
            "full Gaussian mechanism. Use a batch_size well below N (q = batch / N of 0.01 or less is usual) "
            "or more training data."
        )


def _run_seed() -> int:
    """The run's seed (``seed_everything``), else torch's initial seed."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None else torch.initial_seed()


def _validate_layers(module: nn.Module) -> None:
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
