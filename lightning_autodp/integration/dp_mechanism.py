r"""The DP training of one model, as one object both strategies drive: :class:`DPMechanism`.

:class:`DPConfig` is the one owner of what the user chose (sigma or its calibration, clipping,
:math:`R`, sampling, engine, seed, safeguards); :class:`DPMechanism` is everything a fit of that
configuration holds and does, in the order a fit needs it:

1. :meth:`DPMechanism.begin_fit`: where sigma comes from (a restored ledger, the user's number,
   a :class:`~lightning_autodp.mechanism.calibration.NoiseCalibrator`) and the seed of the streams;
2. :meth:`DPMechanism.attach`: the per-sample engine on the module, the BatchNorm guard, the DP
   step (dense or sharded), the noise source and the run-time checks;
3. :meth:`DPMechanism.sample`: the training DataLoader replaced by Poisson samples of rate
   :math:`q`;
4. :meth:`DPMechanism.settle_sigma`: the calibrator asked once, when :math:`q` and the planned
   steps are known;
5. per micro-batch: :meth:`DPMechanism.verify` (before the first update of a fit),
   :meth:`DPMechanism.capturing` around forward, :meth:`DPMechanism.accumulate` after backward;
6. per optimizer step: :meth:`DPMechanism.privatize` sets ``p.grad`` to
   :math:`(\sum_i C_i g_i + \sigma R z)/B` with the step observers called around it, and
   :meth:`DPMechanism.after_step` after ``optimizer.step()``;
7. :meth:`DPMechanism.state_dict` / :meth:`DPMechanism.load_state_dict` (ledger, seed) and
   :meth:`DPMechanism.detach`.

Nothing here reads the Trainer: the strategies (:class:`~lightning_autodp.DPAutoStrategy`,
:class:`~lightning_autodp.DPFSDPStrategy`) translate the Trainer's hooks into these calls and
pass what only the Trainer knows (rank, world size, planned steps, the precision's GradScaler).
Messages go through Lightning's rank-zero logging, as the strategies' own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_autodp.engines import ENGINE_NAMES, PerSampleEngine, make_engine
from lightning_autodp.integration import compiled
from lightning_autodp.integration.physical import check_max_physical_batch_size
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
    check_poisson_compatible,
    poisson_dataloader,
)
from lightning_autodp.mechanism.sharded import ShardedDPStep
from lightning_autodp.mechanism.step import DEFAULT_BUCKET_MB, DPStep, PrivacyLedger
from lightning_autodp.safeguards.batchnorm import BatchNormGuard
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
DEFAULT_NOISE_MULTIPLIER = 1.0

Reduce = Callable[[Tensor], None]


@dataclass(frozen=True)
class DPConfig:
    r"""What the user chose, validated once: the arguments of :class:`~lightning_autodp.DPAutoStrategy`.

    Every field has the meaning documented there. Invalid values raise here, before any training,
    with the fix named. ``gamma=None`` is replaced by the clipping mode's default.
    """

    noise_multiplier: float | None | Literal["auto"] = AUTO
    clipping: ClippingMode = DEFAULT_CLIPPING
    gamma: float | None = None
    max_grad_norm: float = 1.0
    poisson_sampling: bool = True
    engine: Literal["auto", "bk", "ghost", "hooks"] = "auto"
    loss_reduction: Literal["mean", "sum"] = "mean"
    seed: int | None = None
    secure_mode: bool = False
    verify: bool = True
    verify_examples: int = DEFAULT_EXAMPLES
    bucket_cap_mb: float = DEFAULT_BUCKET_MB
    run_checks: bool | RunTimeChecks = True
    max_physical_batch_size: int | None = None

    def __post_init__(self) -> None:
        sigma = self.noise_multiplier
        if sigma not in (None, AUTO):
            check_noise_multiplier(sigma)
            object.__setattr__(self, "noise_multiplier", float(sigma))  # type: ignore[arg-type]
        gamma = resolve_gamma(self.clipping, self.gamma)
        validate_clipping(self.clipping, self.max_grad_norm, gamma)
        object.__setattr__(self, "gamma", gamma)
        if self.engine not in ENGINE_NAMES:
            names = ", ".join(map(repr, ENGINE_NAMES))
            raise ValueError(f"Unknown engine={self.engine!r}. Use one of {names}.")
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}.")
        seed = self.seed
        if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool)):
            raise TypeError(f"seed must be an int or None (the run's seed), got {seed!r}.")
        check_verify_args(self.verify, self.verify_examples)
        cap = self.bucket_cap_mb
        if not (isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap > 0):
            raise ValueError(f"bucket_cap_mb must be a positive number of megabytes, got {cap!r}.")
        object.__setattr__(self, "bucket_cap_mb", float(cap))
        check_max_physical_batch_size(self.max_physical_batch_size)


class DPMechanism:
    r"""One model's differentially private training: configuration, engine, DP step, noise, ledger.

    The update it hands the optimizer for every optimizer step with logical batch :math:`S` is

    .. math::

        \tilde g = \frac{1}{B}\Big(\sum_{i \in S} C_i\, g_i + \sigma R\, z\Big),\qquad z \sim N(0, I)

    (see :mod:`lightning_autodp.mechanism.step`). The ledger, the seed and sigma live here and
    nowhere else; a strategy reads them through this object.

    Args:
        config: the user's choices.
        observers: step observers called at fixed points of every DP step (see
            :mod:`lightning_autodp.mechanism.observers`).
        step_class: the DP step: :class:`~lightning_autodp.mechanism.step.DPStep` (all-reduce of
            full sums) or :class:`~lightning_autodp.mechanism.sharded.ShardedDPStep`.
    """

    def __init__(
        self,
        config: DPConfig,
        observers: Sequence[StepObserver] = (),
        step_class: type[DPStep] = DPStep,
    ) -> None:
        self.config = config
        self.step_class = step_class
        #: what the mechanism ran: ``(sigma, q)`` of every optimizer step
        self.ledger = PrivacyLedger()
        self.sigma: float | None | str = config.noise_multiplier
        self.dataset_size: int | None = None
        self.sample_rate: float | None = None
        self.seed: int | None = None
        self.engine: PerSampleEngine | None = None
        self.dp_step: DPStep | None = None
        self.noise: NoiseSource | None = None
        self.poisson_loader: Any = None
        self.checks: RunTimeChecks | None = None
        self.verification_pending = False
        self.calibrator: NoiseCalibrator | None = None  # asked for sigma when training starts
        self.steps_at_fit_start: int | None = None  # ledger steps when this fit began; None: not fitting
        self._batch_norms: BatchNormGuard | None = None
        self._capture: contextlib.ExitStack | None = None
        self._step_context: StepContext | None = None
        self._param_names: dict[nn.Parameter, str] = {}
        self._restored_seed: int | None = None
        self._accounted_by_calibrator = False  # this fit has a calibrator: its checkpoints need one
        self._restored_with_calibrator = False  # the restored checkpoint was written with one
        self._observers: list[StepObserver] = []
        for observer in observers:
            self.add_observer(observer)

    # ------------------------------------------------------------------ observers

    @property
    def observers(self) -> list[StepObserver]:
        """The step observers called at every DP step: those registered, then the run-time checks."""
        return [*self._observers, *([self.checks] if self.checks is not None else [])]

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

    # ------------------------------------------------------------------ 1. a fit begins

    def begin_fit(self, calibrator: NoiseCalibrator | None, run_seed: int) -> None:
        """Decide where this fit's sigma comes from and which seed draws its noise and samples.

        Sigma, in order: a restored privacy ledger (a resumed run keeps the sigma it was trained and
        accounted with, unless the user passed a number), the user's number, ``calibrator`` (asked
        by :meth:`settle_sigma` once ``q`` and the planned steps are known), else 1.0.
        """
        self._refuse_resume_without_calibrator(calibrator)
        self.calibrator = None
        restored = self.ledger.last[0] if self.ledger.last is not None else None
        if self.sigma in (AUTO, None) and restored is not None:
            rank_zero_info(f"dp_auto: noise_multiplier={restored:.6g} restored from the privacy ledger.")
            self.sigma = restored
        elif isinstance(self.sigma, float) and restored is not None and restored != self.sigma:
            rank_zero_warn(
                f"dp_auto resumes with noise_multiplier={self.sigma}, but the checkpoint's steps "
                f"ran with {restored}: the privacy ledger starts a new segment with the new sigma."
            )
        if self.sigma in (AUTO, None):
            if calibrator is not None:
                self.calibrator = calibrator
            elif self.sigma == AUTO:
                self.sigma = DEFAULT_NOISE_MULTIPLIER
            else:
                raise ValueError(
                    "DPAutoStrategy(noise_multiplier=None) needs a callback that calibrates it: add "
                    "lightning_autodp.PrivacyBudget(target_epsilon=..., delta=...) to "
                    "Trainer(callbacks=...), or pass a number, e.g. DPAutoStrategy(noise_multiplier=1.0)."
                )
        self._accounted_by_calibrator = calibrator is not None
        self.seed = self._seed_of_fit(run_seed)
        self.steps_at_fit_start = self.ledger.steps

    def _refuse_resume_without_calibrator(self, calibrator: NoiseCalibrator | None) -> None:
        """A run accounted by a PrivacyBudget must be resumed with one: epsilon must not go unreported."""
        if self._restored_with_calibrator and calibrator is None:
            raise ValueError(
                "The checkpoint was trained with a PrivacyBudget, but this Trainer has none: the resumed "
                "run's epsilon would go unreported. Add the same PrivacyBudget(target_epsilon=..., "
                "delta=..., accountant=...) to Trainer(callbacks=...); the spent budget is restored from "
                "the checkpoint's privacy ledger."
            )

    def _seed_of_fit(self, run_seed: int) -> int | None:
        """The user's seed, else the checkpoint's, else the run's (None in secure mode)."""
        if self.config.secure_mode:
            return None
        chosen = self.config.seed
        if chosen is None:
            return self._restored_seed if self._restored_seed is not None else run_seed
        if self._restored_seed is not None and self._restored_seed != chosen:
            rank_zero_warn(
                f"DPAutoStrategy(seed={chosen}) differs from the checkpoint's seed: the resumed "
                "run draws other noise and samples than the interrupted one would have (still private)."
            )
        return chosen

    @property
    def fitting(self) -> bool:
        """True between :meth:`begin_fit` and :meth:`detach`."""
        return self.steps_at_fit_start is not None

    @property
    def fit_steps(self) -> int:
        """Optimizer steps taken in the current fit (0 outside a fit)."""
        return self.ledger.steps - self.steps_at_fit_start if self.steps_at_fit_start is not None else 0

    # ------------------------------------------------------------------ 2. the model

    def attach(self, module: nn.Module, rank: int) -> None:
        """Attach the per-sample engine to ``module`` (in place) and build this fit's DP step.

        The module must already be distributed as it will train (broadcast, or sharded).
        """
        config = self.config
        self.engine = make_engine(config.engine, module)
        self._batch_norms = BatchNormGuard(module)
        compiled.check_compiled_module(module, self.engine)  # before training, not mid-step
        self.verification_pending = config.verify  # once per fit, on the first non-empty micro-batch
        self._param_names = {p: n for n, p in module.named_parameters()}
        names = {id(p): n for p, n in self._param_names.items()}
        self.dp_step = self.step_class(
            self.engine.params, config.clipping, config.max_grad_norm, config.gamma, names=names,
            bucket_mb=config.bucket_cap_mb,
        )  # fmt: skip
        self.noise = NoiseSource(seed=self.seed or 0, rank=rank, secure_mode=config.secure_mode)
        if isinstance(config.run_checks, RunTimeChecks):
            self.checks = config.run_checks
        else:
            self.checks = RunTimeChecks(seed=self.seed or 0) if config.run_checks else None

    # ------------------------------------------------------------------ 3. the data

    def sample(self, dataloader: object, micro_batches: int, world_size: int, rank: int) -> object:
        """The training loader to use: Poisson samples of ``dataloader``'s dataset, or itself.

        ``q`` = ``batch_size * micro_batches * world_size / N``. Without Poisson sampling the loader
        is used as it is; ``q`` is then its nominal rate, when the dataset has a length.
        """
        if not self.config.poisson_sampling:
            self._record_nominal_rate(dataloader, micro_batches, world_size)
            return dataloader
        loader = check_poisson_compatible(dataloader)
        self.dataset_size = len(loader.dataset)  # type: ignore[arg-type]
        expected = loader.batch_size * micro_batches * world_size  # type: ignore[operator]
        self.sample_rate = min(1.0, expected / self.dataset_size)
        _warn_if_no_amplification(expected, self.dataset_size)
        self.poisson_loader = poisson_dataloader(
            loader,
            sample_rate=self.sample_rate,
            num_replicas=world_size,
            rank=rank,
            micro_batches=micro_batches,
            seed=self.seed or 0,
            secure_mode=self.config.secure_mode,
        )
        return self.poisson_loader

    def _record_nominal_rate(self, dataloader: object, micro_batches: int, world_size: int) -> None:
        dataset = getattr(dataloader, "dataset", None)
        batch_size = getattr(dataloader, "batch_size", None)
        try:
            self.dataset_size = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            self.dataset_size = None
        if self.dataset_size and batch_size:
            expected = batch_size * micro_batches * world_size
            self.sample_rate = min(1.0, expected / self.dataset_size)
            _warn_if_no_amplification(expected, self.dataset_size)

    @property
    def poisson_sampler(self) -> DistributedPoissonBatchSampler | None:
        """The Poisson batch sampler drawing the data (None before :meth:`sample`, or without Poisson)."""
        loader = self.poisson_loader
        return loader.batch_sampler if loader is not None else None

    def require_sample_rate(self) -> float:
        """``q``, or a ``RuntimeError`` saying when it becomes known."""
        if self.sample_rate is None:
            raise RuntimeError(
                "dp_auto's sample rate is known once the training DataLoader has been set up "
                "(from on_train_start, or after trainer.estimated_stepping_batches)."
            )
        return self.sample_rate

    @property
    def expected_batch_size(self) -> float:
        """``B = q * N``, the expected number of examples per optimizer step (all ranks)."""
        q = self.require_sample_rate()
        assert self.dataset_size is not None  # set with q (see sample)
        return q * self.dataset_size

    # ------------------------------------------------------------------ 4. sigma

    def set_sigma(self, sigma: float) -> None:
        """Fix sigma for this fit; refused after its first step (the running plan would be wrong)."""
        if self.fit_steps > 0:
            raise RuntimeError(
                f"noise_multiplier cannot change after the first optimizer step of a fit (it is "
                f"{self.sigma}, {self.fit_steps} steps taken). Set "
                "DPAutoStrategy(noise_multiplier=...) before trainer.fit, or calibrate it with PrivacyBudget."
            )
        check_noise_multiplier(sigma)
        self.sigma = float(sigma)
        self.calibrator = None  # a sigma set explicitly is not recalibrated

    def settle_sigma(self, planned_steps: Callable[[], int | None]) -> float:
        """Ask the calibrator for this fit's sigma, once, if it was left to one; return sigma.

        The request holds ``q``, the planned optimizer steps of this fit (``planned_steps()``,
        called only if a calibrator is asked) and what the ledger already spent, so the answer
        does not depend on who asks first.
        """
        calibrator, self.calibrator = self.calibrator, None
        if calibrator is not None:
            request = CalibrationRequest(
                sample_rate=self.sample_rate,  # type: ignore[arg-type]
                planned_steps=planned_steps(),
                spent=tuple(merge_segments(self.ledger.accountable_segments())),
            )
            sigma = calibrator.calibrate_noise_multiplier(request)
            check_noise_multiplier(sigma)
            self.sigma = float(sigma)
        if not isinstance(self.sigma, float):
            raise RuntimeError(
                "dp_auto's noise_multiplier is settled when training starts; it was read before "
                "(e.g. in setup or on_fit_start), when it is not known yet."
            )
        return self.sigma

    # ------------------------------------------------------------------ 5. micro-batches

    def verify(
        self,
        module: nn.Module,
        args: tuple,
        kwargs: dict,
        layout: GradientLayout | None = None,
        reduce: Reduce | None = None,
        device: torch.device | None = None,
    ) -> None:
        """Check the engine and the clipping on this micro-batch; raise on a mismatch.

        Under data parallelism (``reduce`` given) every rank raises if any rank's verification
        failed: a rank that raised alone would leave the others waiting in the first all-reduce.
        """
        assert self.engine is not None and self.dp_step is not None
        failure: Exception | None = None
        try:
            with self.batch_norms_armed():
                verify_engine(
                    module, self.engine, args, kwargs, loss_reduction=self.config.loss_reduction,
                    examples=self.config.verify_examples, layout=layout,
                )  # fmt: skip
            # the engine is right; the weights the step gives its examples must bound each one by R
            check_clipping_bound(self.dp_step, self.config.max_grad_norm)
        except Exception as err:  # noqa: BLE001 - any failure must reach the other ranks too
            failure = err
        if reduce is not None:
            failed = torch.tensor([float(failure is not None)], device=device)
            reduce(failed)
            if failure is None and failed.item() > 0:
                raise EngineVerificationError(
                    f"dp_auto's verification before the first update failed on {int(failed.item())} other "
                    "rank(s) (their error names the parameters); no rank trains."
                )
        if failure is not None:
            raise failure
        self.verification_pending = False

    def batch_norms_armed(self) -> contextlib.AbstractContextManager:
        """Every BatchNorm call is checked inside: one in train mode would mix the examples."""
        return self._batch_norms.armed() if self._batch_norms is not None else contextlib.nullcontext()

    def open_capture(self, batch: Any) -> None:
        """Start recording what the engine needs from the forward pass of ``batch``.

        Closed by :meth:`close_capture` (after backward, or on an error).
        """
        assert self.engine is not None
        self.close_capture()
        capture = contextlib.ExitStack()
        self.engine.expect_batch_size(infer_batch_size(batch))  # engines: ids shared by the batch
        capture.enter_context(self.engine.capturing())
        capture.enter_context(self.batch_norms_armed())
        self._capture = capture

    def close_capture(self) -> None:
        if self._capture is not None:
            self._capture.close()
            self._capture = None

    @contextlib.contextmanager
    def capturing(self, batch: Any) -> Iterator[None]:
        """:meth:`open_capture` for the duration of the block."""
        self.open_capture(batch)
        try:
            yield
        finally:
            self.close_capture()

    def explain_error(self, err: Exception) -> Exception | None:
        """The engine's error naming the layer and the fix, for an exception its machinery caused."""
        return self.engine.explain_error(err) if self.engine is not None else None

    def discard_next_micro_batch(self) -> None:
        """The next micro-batch is a placeholder run only for the sharded collectives: it adds nothing
        to the clipped sum and counts no example (see :class:`ShardedDPStep`)."""
        if not isinstance(self.dp_step, ShardedDPStep):
            raise TypeError("Only a sharded DP step runs placeholder micro-batches (dp_fsdp).")
        self.dp_step.discard_next = True

    def backward_scale(self, micro_batches: int, grad_scale: float = 1.0) -> float:
        """``s`` with ``raw_grad_i = s * g_i``: the loss reduction, the division of the loss by the
        number of micro-batches (as Lightning's closure divides it), and the GradScaler's factor."""
        assert self.engine is not None
        scale = 1.0 / micro_batches
        if self.config.loss_reduction == "mean" and self.engine.batch_size > 0:
            scale /= self.engine.batch_size
        return scale * grad_scale

    def accumulate(self, micro_batches: int, grad_scaler: Any = None) -> None:
        """Clip this micro-batch's examples and add them to the step's sum (after its backward)."""
        assert self.engine is not None and self.dp_step is not None
        grad_scale = float(grad_scaler.get_scale()) if grad_scaler is not None else 1.0
        scale = self.backward_scale(micro_batches, grad_scale)
        self.dp_step.clip_and_accumulate(self.engine, scale, check_finite=grad_scaler is None)

    # ------------------------------------------------------------------ 6. the optimizer step

    def privatize(
        self,
        rank: int,
        world_size: int,
        reduce: Reduce | None,
        grad_scaler: Any = None,
        optimizers: Sequence[torch.optim.Optimizer] = (),
    ) -> None:
        r"""Set ``p.grad`` to :math:`(\sum_i C_i g_i + \sigma R z) / B` (see :meth:`DPStep.privatize`).

        One rank draws the noise of the whole sum (or, sharded, every rank that of its own shard);
        every rank records ``(sigma, q)`` in the ledger. The observers are called around it.
        """
        dp_step, noise = self.dp_step, self.noise
        assert dp_step is not None and noise is not None
        sigma = self.sigma
        assert isinstance(sigma, float), "settle_sigma() runs when training starts"
        ctx = self._make_step_context(sigma, rank, world_size, reduce, grad_scaler, optimizers)
        self._step_context = ctx
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
            q=self.sample_rate,
            noise=noise if dp_step.every_rank_draws_noise or rank == 0 else None,
            ledger=self.ledger,
            divisor=self.expected_batch_size if self.config.poisson_sampling else None,
            reduce=reduce,
            bucket_mb=self.config.bucket_cap_mb,
            grad_scale=float(grad_scaler.get_scale()) if grad_scaler is not None else 1.0,
        )
        for observer in observers:
            observer.on_batch_sampled(ctx, int(round(examples)))
        for observer in observers:
            observer.after_privatize(ctx, divisor, examples)

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Tell the observers the optimizer has stepped (once per privatized step)."""
        ctx, self._step_context = self._step_context, None
        if ctx is not None:
            for observer in self.observers:
                observer.after_step(ctx, optimizer)

    def _make_step_context(
        self,
        sigma: float,
        rank: int,
        world_size: int,
        reduce: Reduce | None,
        grad_scaler: Any,
        optimizers: Sequence[torch.optim.Optimizer],
    ) -> StepContext:
        assert self.dp_step is not None
        return StepContext(
            dp_step=self.dp_step,
            params=self.dp_step.params,
            sigma=sigma,
            max_grad_norm=self.config.max_grad_norm,
            sample_rate=self.sample_rate,
            dataset_size=self.dataset_size,
            sampler=self.poisson_sampler if self.config.poisson_sampling else None,
            step=self.ledger.steps,
            fit_step=self.fit_steps,
            rank=rank,
            world_size=world_size,
            reduce=reduce,
            ledger=self.ledger,
            grad_scaler=grad_scaler,
            optimizers=optimizers,
            names=self._param_names,
        )

    # ------------------------------------------------------------------ 7. state and teardown

    def state_dict(self) -> dict[str, Any]:
        """The privacy state: the ledger and the seed of the streams (keep checkpoints private)."""
        return {
            "ledger": self.ledger.state_dict(),
            "seed": self.seed,
            "secure_mode": self.config.secure_mode,
            "calibrator": self._accounted_by_calibrator,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ledger" not in state:  # written before the ledger existed: steps at an unknown sigma
            raise ValueError(
                "This checkpoint's dp_auto state has no privacy ledger (an older lightning-autodp wrote it): "
                "its steps cannot be accounted. Resume with the version that wrote it, or start a new run."
            )
        self.ledger.load_state_dict(state["ledger"])
        self._restored_seed = state.get("seed")
        self._restored_with_calibrator = bool(state.get("calibrator", False))

    def detach(self) -> None:
        """Remove the engine's hooks and the guard, free the step's sums; the ledger stays."""
        self.close_capture()
        if self.engine is not None:
            self.engine.remove()
            self.engine = None
        if self._batch_norms is not None:
            self._batch_norms.remove()
            self._batch_norms = None
        if self.dp_step is not None:
            self.dp_step.clear()
            self.dp_step = None
        self.steps_at_fit_start = None
        self.calibrator = None  # a fit that failed before training started asks no one afterwards


def check_noise_multiplier(sigma: object) -> None:
    if isinstance(sigma, bool) or not (isinstance(sigma, (int, float)) and 0 <= sigma < float("inf")):
        raise ValueError(
            f"noise_multiplier must be >= 0 and finite (or None/'auto' to calibrate it with a "
            "PrivacyBudget "
            f"callback), got {sigma!r}."
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
