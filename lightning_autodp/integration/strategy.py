"""The Lightning glue: :class:`DPAutoStrategy`, registered as ``strategy="dp_auto"``.

A private fit is one :class:`~lightning_autodp.integration.dp_mechanism.DPMechanism` (configuration,
sigma, seed, engine, DP step, noise, Poisson loader, observers, ledger); this module maps Lightning's
hooks onto it. Private Lightning/torch accesses go through :mod:`lightning_autodp._compat`.
"""

from __future__ import annotations

import atexit
import functools
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.distributed.constants import default_pg_timeout
from torch.optim import Optimizer
from typing_extensions import override

from lightning_autodp import _compat
from lightning_autodp.integration import fit_checks, physical, summary
from lightning_autodp.integration.dp_mechanism import AUTO, DPConfig, DPMechanism
from lightning_autodp.mechanism import distributed
from lightning_autodp.mechanism.clipping import DEFAULT_CLIPPING, ClippingMode
from lightning_autodp.mechanism.observers import StepObserver
from lightning_autodp.mechanism.sampling import DistributedPoissonBatchSampler, EmptyBatch
from lightning_autodp.mechanism.step import DEFAULT_BUCKET_MB, DPStep, PrivacyLedger
from lightning_autodp.safeguards.checks import RunTimeChecks
from lightning_autodp.safeguards.verify import DEFAULT_EXAMPLES, GradientLayout

#: the checkpoint entry holding :meth:`DPAutoStrategy.dp_state_dict`
CHECKPOINT_KEY = "dp_auto"


def _config_field(name: str) -> property:
    """A read-only view of one field of the strategy's :class:`DPConfig` (its one owner)."""

    def read(self: DPAutoStrategy) -> Any:
        return getattr(self.mechanism.config, name)

    return property(read, doc=f"``{name}`` of :attr:`DPAutoStrategy.config` (read-only).")


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
            ``"abadi"`` :math:`\min(1, R/(\|g_i\| + 10^{-6}))` (Opacus's form). The default is the
            one the utility study measured closest to a tuned Abadi threshold (see
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
        config: the validated, read-only :class:`~lightning_autodp.DPConfig` (the arguments above;
            ``strategy.clipping`` etc. read it).
        mechanism: the :class:`~lightning_autodp.DPMechanism` this strategy drives: sigma, seed,
            engine, DP step, noise, Poisson loader, observers and the privacy ledger of the fit.

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
    #: the DP step the mechanism runs (:class:`~lightning_autodp.mechanism.step.DPStep`: all-reduced sums)
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
        verify: bool = True,
        verify_examples: int = DEFAULT_EXAMPLES,
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
        fit_checks.refuse_ddp_wrapper_arguments(kwargs)
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
        config = DPConfig(
            noise_multiplier=noise_multiplier, clipping=clipping, gamma=gamma, max_grad_norm=max_grad_norm,
            poisson_sampling=poisson_sampling, engine=engine, loss_reduction=loss_reduction, seed=seed,
            secure_mode=secure_mode, verify=verify, verify_examples=verify_examples,
            bucket_cap_mb=bucket_cap_mb, run_checks=run_checks,
            max_physical_batch_size=max_physical_batch_size,
        )  # fmt: skip
        #: the DP training this strategy drives: configuration, engine, DP step, noise, ledger, sigma
        self.mechanism = DPMechanism(config, observers, step_class=self.dp_step_class)
        self._fitting = False

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

    # ------------------------------------------------------------------ the configuration (read-only)

    @property
    def config(self) -> DPConfig:
        """The DP configuration, as passed and validated (one owner: :attr:`mechanism`)."""
        return self.mechanism.config

    clipping = _config_field("clipping")
    gamma = _config_field("gamma")
    max_grad_norm = _config_field("max_grad_norm")
    poisson_sampling = _config_field("poisson_sampling")
    engine = _config_field("engine")
    loss_reduction = _config_field("loss_reduction")
    secure_mode = _config_field("secure_mode")
    verify = _config_field("verify")
    verify_examples = _config_field("verify_examples")
    bucket_cap_mb = _config_field("bucket_cap_mb")
    run_checks = _config_field("run_checks")
    max_physical_batch_size = _config_field("max_physical_batch_size")

    # ------------------------------------------------------------------ what the fit spent

    @property
    def runs_distributed(self) -> bool:
        """True when this strategy runs on several processes joined in a process group."""
        return self.world_size > 1 and distributed.initialized()

    @property
    def ledger(self) -> PrivacyLedger:
        """What the mechanism ran: ``(sigma, q)`` of every optimizer step (see :class:`PrivacyLedger`)."""
        return self.mechanism.ledger

    @property
    def steps(self) -> int:
        """Optimizer steps taken (each one consumed privacy), identical on every rank: ``ledger.steps``."""
        return self.mechanism.ledger.steps

    @property
    def dataset_size(self) -> int | None:
        """:math:`N`, the number of training examples (known once the training DataLoader is set up)."""
        return self.mechanism.dataset_size

    @property
    def noise_multiplier(self) -> float | None | str:
        r""":math:`\sigma` of the coming steps: a float once training starts, else as passed.

        A sigma left to a calibrator (``"auto"``/None with a :class:`~lightning_autodp.PrivacyBudget`)
        is settled by :meth:`settle_noise_multiplier` when training starts: by the first reader
        once the training data is set up (e.g. any callback's ``on_train_start``, whatever the
        order of the callbacks), at the latest in this strategy's own ``on_train_start``.
        Setting it is :meth:`set_noise_multiplier`: allowed until the first step of a fit.
        """
        if self.mechanism.calibrator is not None and self._training_data_ready():
            self.settle_noise_multiplier()
        return self.mechanism.sigma

    @noise_multiplier.setter
    def noise_multiplier(self, value: float) -> None:
        self.set_noise_multiplier(value)

    def set_noise_multiplier(self, sigma: float) -> None:
        """Fix sigma for this fit (a calibrating callback's proposal); refused after its first step.

        Every step records the sigma it used in :attr:`ledger`, so a sigma set before another fit
        starts a new accounted segment; within a fit it would make the running plan wrong.
        """
        self.mechanism.set_sigma(sigma)

    def settle_noise_multiplier(self) -> float:
        """Ask the calibrator for this fit's sigma, once, if it was left to one; return sigma.

        Called when training starts (see :attr:`noise_multiplier`); the request holds ``q``, the
        planned optimizer steps of this fit and what the ledger already spent, so the answer does
        not depend on which hook asked first.
        """
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None

        def planned() -> int | None:
            fit_checks.warn_if_run_length_unchosen(trainer)
            return fit_checks.planned_steps(trainer)

        return self.mechanism.settle_sigma(planned)

    @property
    def verification_pending(self) -> bool:
        """True until this fit's engine verification has run (see :meth:`verify_first_batch`)."""
        return self.mechanism.verification_pending

    @verification_pending.setter
    def verification_pending(self, pending: bool) -> None:
        self.mechanism.verification_pending = bool(pending)

    @property
    def observers(self) -> list[StepObserver]:
        """The step observers called at every DP step: those registered, then the run-time checks."""
        return self.mechanism.observers

    def add_observer(self, observer: StepObserver) -> None:
        """Register a :class:`~lightning_autodp.mechanism.observers.StepObserver` for every following step."""
        self.mechanism.add_observer(observer)

    def remove_observer(self, observer: StepObserver) -> None:
        """Stop calling ``observer`` (no error if it was not registered)."""
        self.mechanism.remove_observer(observer)

    @property
    def poisson_sampler(self) -> DistributedPoissonBatchSampler | None:
        """The Poisson batch sampler drawing the data (None before setup, or without Poisson sampling)."""
        return self.mechanism.poisson_sampler

    @property
    def seed(self) -> int | None:
        """The seed of the noise and sampling streams of this fit (None in secure mode / before fit)."""
        return self.mechanism.seed

    @property
    def sample_rate(self) -> float:
        """``q``: the probability that one example enters one optimizer step (all ranks)."""
        return self.mechanism.require_sample_rate()

    @property
    def expected_batch_size(self) -> float:
        """``B = q * N``, the expected number of examples per optimizer step (all ranks)."""
        return self.mechanism.expected_batch_size

    @property
    def noise_std(self) -> float:
        r""":math:`\sigma R / B`: the standard deviation of the noise in each coordinate of the gradient
        the optimizer receives (:class:`~lightning_autodp.mechanism.optim.DPAdamBC` subtracts its square).

        Known once the fit has started (sigma calibrated, the DataLoader set up). Without Poisson
        sampling :math:`B` is the nominal logical batch; a shorter last batch has more noise per example.
        """
        sigma = self.mechanism.sigma
        if not isinstance(sigma, (int, float)):
            raise RuntimeError(
                f"noise_std is known once sigma is (noise_multiplier={sigma!r}): read it "
                "from the optimizer's step, not in configure_optimizers (pass a callable)."
            )
        return sigma * self.max_grad_norm / self.expected_batch_size

    # ------------------------------------------------------------------ setup and validation

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        self._fitting = trainer.state.fn == TrainerFn.FITTING
        if self._fitting:
            fit_checks.validate_trainer(trainer, self.precision_plugin)
            self.mechanism.begin_fit(
                fit_checks.find_calibrator(trainer.callbacks), run_seed=fit_checks.run_seed()
            )
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
        fit_checks.validate_layers(module)
        if not any(p.requires_grad for p in module.parameters()):
            raise ValueError(
                f"{type(module).__name__} has no trainable parameter (every parameter has "
                "requires_grad=False): dp_auto has nothing to train privately. Unfreeze the parameters to "
                "train (p.requires_grad_(True), e.g. a head or adapters) before Trainer.fit."
            )
        self.prepare_module(module)
        self.mechanism.attach(module, rank=self.global_rank)
        return model

    def prepare_module(self, module: pl.LightningModule) -> None:
        """Get the module ready for the engine, in place, before the optimizers are configured.

        dp_auto: broadcast rank 0's parameters and buffers, as DDP's constructor would. Subclasses
        that distribute the module differently (:class:`~lightning_autodp.DPFSDPStrategy` shards
        it) override this.
        """
        if self.runs_distributed:
            _compat.sync_module_states(module)

    def _training_data_ready(self) -> bool:
        """True once fit's training DataLoader is set up: ``q`` and the planned steps are known."""
        module = self.lightning_module
        trainer = module.trainer if module is not None else None
        return (
            self._fitting
            and self.mechanism.sample_rate is not None
            and trainer is not None
            and trainer.train_dataloader is not None
        )

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
        return self.mechanism.sample(
            dataloader, trainer.accumulate_grad_batches, world_size=self.world_size, rank=self.global_rank
        )

    @override
    def on_train_start(self) -> None:
        """Settle sigma, print the start line; on a mid-epoch resume, continue the epoch's Poisson
        stream after the batches already trained.

        The count comes from Lightning's restored loop progress rather than the sampler's own
        counter, which includes batches prefetched but never trained on.
        """
        super().on_train_start()
        trainer = self.lightning_module.trainer
        self.settle_noise_multiplier()  # if no callback has read it yet
        summary.log_start_line(self, trainer)
        sampler = self.mechanism.poisson_sampler
        if sampler is None or not _compat.fit_loop_restarting(trainer):
            return
        processed = _compat.batches_processed_in_epoch(trainer)
        if processed < trainer.num_training_batches:
            sampler.skip_next(processed)

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
        return self.mechanism.state_dict()

    def load_dp_state_dict(self, state: dict[str, Any]) -> None:
        self.mechanism.load_state_dict(state)

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
            explained = self.mechanism.explain_error(err)
            if explained is None:
                raise
            raise explained from err

    def _captured_training_step(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        self.mechanism.close_capture()
        if self.max_physical_batch_size is not None:  # the leading pieces train here, the last below
            args, kwargs = physical.run_leading_physical_batches(self, args, kwargs)
        batch = args[0] if args else kwargs.get("batch")
        empty = isinstance(batch, EmptyBatch)
        if self.mechanism.verification_pending:
            with self.precision_plugin.train_step_context():
                self.mechanism.verification_pending = not self.verify_first_batch(args, kwargs, empty=empty)
        if empty:
            # No example drew this micro-batch: the step still happens (noise only). A graph-less
            # zero lets Lightning's closure run backward; nothing is logged for it.
            return torch.zeros((), device=self.root_device, requires_grad=True)
        self.mechanism.open_capture(batch)
        return super().training_step(*args, **kwargs)

    def verify_first_batch(
        self, args: tuple, kwargs: dict, *, empty: bool = False, layout: GradientLayout | None = None
    ) -> bool:
        """Verify the engine on this rank's micro-batch; True once verified, False to wait.

        An empty Poisson micro-batch has nothing to verify: the next one is used. Under data
        parallelism every rank stops if any rank's verification failed (see
        :meth:`DPMechanism.verify`). ``layout`` tells how gradients are read (sharded strategies
        read shards).
        """
        if empty:
            return False
        distributed_run = self.runs_distributed
        self.mechanism.verify(
            self.lightning_module, args, kwargs, layout=layout,
            reduce=distributed.all_reduce_sum if distributed_run else None, device=self.root_device,
        )  # fmt: skip
        return True

    @override
    def backward(
        self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any
    ) -> Tensor:
        """Backward, then clip this micro-batch's examples and add them to the step's sum."""
        mechanism = self.mechanism
        scaler = _compat.grad_scaler(self.precision_plugin)
        if scaler is None and not torch.isfinite(closure_loss).all():
            mechanism.close_capture()
            raise FloatingPointError(
                f"The training loss is {closure_loss.item()}. dp_auto stops rather than take noise-only "
                "steps: lower the learning rate, check the data for NaN/inf, or use precision='16-mixed' "
                "whose GradScaler skips such steps."
            )
        if closure_loss.dim() != 0:
            mechanism.close_capture()
            raise ValueError(
                "training_step must return a scalar loss for dp_auto, got shape "
                f"{tuple(closure_loss.shape)}. "
                "Reduce it with .mean() (loss_reduction='mean') or .sum() (loss_reduction='sum')."
            )
        engine = mechanism.engine
        assert engine is not None
        try:
            if engine.needs_backward_root:
                # A two-pass engine backpropagates the loss again: keep the graph, and hand it the
                # root the first pass used. Of the precision plugins dp_auto accepts, only a
                # GradScaler changes the root (MixedPrecision.pre_backward: scaler.scale(loss)).
                kwargs["retain_graph"] = True
                root = closure_loss
                closure_loss = super().backward(closure_loss, optimizer, *args, **kwargs)
                engine.set_backward_root(scaler.scale(root) if scaler is not None else root)
            else:
                closure_loss = super().backward(closure_loss, optimizer, *args, **kwargs)
        finally:
            mechanism.close_capture()
        mechanism.accumulate(self.lightning_module.trainer.accumulate_grad_batches, grad_scaler=scaler)
        return closure_loss

    # ------------------------------------------------------------------ the optimizer step

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        r"""Run the closure (forward + backward of the last micro-batch), privatize, then step.

        Privatizing sets ``p.grad`` to :math:`(\sum_i C_i g_i + \sigma R z) / B`
        (:meth:`DPMechanism.privatize`): rank 0 alone draws the noise, every rank records
        ``(sigma, q)`` in the ledger.
        """

        def private_closure() -> Any:
            result = closure()
            self.settle_noise_multiplier()  # settled in on_train_start; a no-op here
            self.mechanism.privatize(
                rank=self.global_rank,
                world_size=self.world_size,
                reduce=distributed.all_reduce_sum if self.runs_distributed else None,
                grad_scaler=_compat.grad_scaler(self.precision_plugin),
                optimizers=self.optimizers,
            )
            return result

        result = super().optimizer_step(optimizer, private_closure, model, **kwargs)
        self.mechanism.after_step(optimizer)
        return result

    # ------------------------------------------------------------------ teardown

    @override
    def teardown(self) -> None:
        self.mechanism.detach()
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
