"""The :class:`PrivacyBudget` callback: account epsilon, calibrate sigma, stop before the target."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_autodp.integration.fit_checks import planned_steps
from lightning_autodp.integration.strategy import require_dp_auto
from lightning_autodp.mechanism.accounting import (
    ACCOUNTANTS,
    Accountant,
    AccountantName,
    Segment,
    merge_segments,
)
from lightning_autodp.mechanism.calibration import CalibrationRequest, NoiseCalibrator
from lightning_autodp.mechanism.step import PrivacyLedger


def state_key_class(state_key: str) -> str:
    """The callback class name a checkpoint's callback-state key was made from.

    Lightning saves each callback's state under its ``state_key``: the class's ``__qualname__``,
    followed, for a callback that builds it with ``Callback._generate_state_key`` (as
    :attr:`PrivacyBudget.state_key` does), by the ``repr`` of the arguments that tell several
    instances apart. So ``"PrivacyBudget{'target_epsilon': 3.0, ...}"`` belongs to ``PrivacyBudget``.

    Example::

        >>> state_key_class("PrivacyBudget{'target_epsilon': 3.0, 'delta': 1e-05, 'accountant': 'prv'}")
        'PrivacyBudget'
    """
    return state_key.partition("{")[0]


class PrivacyBudget(Callback, NoiseCalibrator):
    r"""Account the privacy spent by ``dp_auto``, calibrate its noise, stop before a target epsilon.

    After every optimizer step the strategy has run one Poisson-subsampled Gaussian mechanism with
    noise multiplier :math:`\sigma` and sampling rate :math:`q`, and recorded that ``(sigma, q)`` in
    its privacy ledger (:attr:`DPAutoStrategy.ledger <lightning_autodp.DPAutoStrategy.ledger>`).
    The callback reads the ledger's ``(sigma, q, steps)`` segments (it keeps no copy of its own) and
    composes them with Opacus's accountant (``"prv"``, default, or ``"rdp"``) to report
    :math:`\varepsilon` at ``delta``. A change of :math:`q` (a reloaded training loader) starts a new
    segment and a new stopping plan.

    * **Logging**: ``epsilon`` is logged (every logger, progress bar) at the end of each training
      epoch; :attr:`history` holds one ``(epoch, step, epsilon)`` per finished epoch.
    * **Stopping**: with ``target_epsilon`` set, the largest number of steps :math:`T^*` with
      :math:`\varepsilon \le` target is found once per run (bisection over the steps); training
      stops right after step :math:`T^*`, so the final epsilon is :math:`\le` target and one more
      step would exceed it. Every rank computes the same :math:`T^*` from the same history, so all
      ranks stop together without communicating.
    * **Calibration**: when the strategy has ``noise_multiplier=None`` (or its default ``"auto"``),
      the strategy asks this callback (the
      :class:`~lightning_autodp.mechanism.calibration.NoiseCalibrator` protocol) once, when
      training starts, for the :math:`\sigma` with which the planned run
      (``trainer.estimated_stepping_batches``: ``max_epochs`` or ``max_steps``) ends at, or up to
      1% under, the target. Every ``on_train_start`` hook already sees that sigma, whatever the
      order of the callbacks.
    * **Checkpoints**: the ledger is saved with the strategy's state, this callback's history and
      calibrated sigma with its own (under :attr:`state_key`, so several budgets can coexist); a
      resumed run continues from the epsilon already spent. A checkpoint written with a
      PrivacyBudget cannot be resumed without one (the strategy refuses, naming the fix).

    Args:
        target_epsilon: stop before exceeding it (and calibrate sigma for it). ``None``: only
            account and log.
        delta: the delta of the guarantee; should be well below ``1 / N`` (a warning says so).
        accountant: ``"prv"`` (tight, default) or ``"rdp"``.

    Example::

        import lightning as L
        from lightning_autodp import PrivacyBudget

        budget = PrivacyBudget(target_epsilon=3.0, delta=1e-5)
        trainer = L.Trainer(strategy="dp_auto", callbacks=[budget], max_epochs=20)
        trainer.fit(model, datamodule)
        print(budget.epsilon, budget.history[-1])
    """

    def __init__(
        self,
        target_epsilon: float | None = None,
        delta: float = 1e-5,
        accountant: AccountantName = "prv",
    ) -> None:
        if target_epsilon is not None and not (
            isinstance(target_epsilon, (int, float)) and 0 < target_epsilon < math.inf
        ):
            raise ValueError(
                f"target_epsilon must be a positive number (e.g. 3.0) or None to only account, "
                f"got {target_epsilon!r}."
            )
        if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
            raise ValueError(f"delta must lie in (0, 1), got {delta!r}; choose it well below 1/N, e.g. 1e-5.")
        if accountant not in ACCOUNTANTS:
            raise ValueError(
                f"Unknown accountant={accountant!r}. Use one of {', '.join(map(repr, ACCOUNTANTS))}."
            )
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.delta = float(delta)
        self.accountant = accountant
        #: ``(epoch, step, epsilon)`` at the end of every training epoch
        self.history: list[tuple[int, int, float]] = []
        #: sigma of the current run (calibrated or the strategy's)
        self.noise_multiplier: float | None = None
        self._accountant = Accountant(accountant, self.delta)
        self._ledger: PrivacyLedger | None = None  # the strategy's, from setup on
        self._restored_segments: list[Segment] = []  # from a checkpoint, until a ledger is attached
        self._plan: tuple[float, float] | None = None  # (sigma, q) the stopping plan was made for
        self._base: list[Segment] = []  # ledger segments when the plan was made
        self._base_steps = 0
        self._allowed_steps: int | None = None  # T*: steps after the base this plan allows; None = unlimited
        self._budget_binds = False  # T* is set by the target, not by the end of the search horizon
        self._planned: int | None = None  # steps this fit plans (Trainer's estimate), None = unbounded
        self._calibrated: float | None = None  # the sigma this callback proposed (kept in checkpoints)
        #: True once this callback stopped training because one more step would exceed the target
        self.stopped_by_budget = False

    @property
    @override
    def state_key(self) -> str:
        """Where checkpoints keep this callback's state: the class name and the arguments
        (:func:`state_key_class` reads the class name back)."""
        return self._generate_state_key(
            target_epsilon=self.target_epsilon, delta=self.delta, accountant=self.accountant
        )

    # ------------------------------------------------------------------ what was spent

    @property
    def segments(self) -> list[Segment]:
        """The whole history ``[(sigma, q, steps), ...]`` from the strategy's privacy ledger."""
        if self._ledger is None:
            return list(self._restored_segments)
        return merge_segments(self._ledger.accountable_segments())

    @property
    def steps(self) -> int:
        """Optimizer steps accounted so far (all fits and restored checkpoints)."""
        return sum(steps for _, _, steps in self.segments)

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at :attr:`delta`."""
        return self._accountant.epsilon(self.segments)

    def _live_steps(self) -> int:
        """Steps taken since the current plan was made."""
        return 0 if self._ledger is None else self._ledger.steps - self._base_steps

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        require_dp_auto(trainer, "PrivacyBudget accounts the privacy of")
        self._ledger = trainer.strategy.ledger

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        self._ledger = strategy.ledger
        q, n = strategy.sample_rate, strategy.dataset_size
        if not strategy.poisson_sampling:
            rank_zero_warn(
                "PrivacyBudget accounts Poisson sampling with q = batch_size / N, but dp_auto runs with "
                "poisson_sampling=False: the epsilon reported does not hold for shuffled fixed-size "
                "batches. Use DPAutoStrategy(poisson_sampling=True) (the default) for a guarantee."
            )
        if n and self.delta >= 1.0 / n:
            rank_zero_warn(
                f"PrivacyBudget(delta={self.delta}) is not below 1/N = {1.0 / n:.3g} (N={n} examples): "
                "such a delta allows releasing whole examples. Choose delta well below 1/N, e.g. 1/(10 N)."
            )
        self._planned = planned_steps(trainer)
        self.stopped_by_budget = False
        self.noise_multiplier = strategy.settle_noise_multiplier()
        self._make_plan(strategy.noise_multiplier, q, self._planned)
        if self._allowed_steps == 0:
            rank_zero_warn(
                f"PrivacyBudget: epsilon={self.epsilon:.4g} already spent; one more step would exceed "
                f"target_epsilon={self.target_epsilon}. Training stops before the first step."
            )
            trainer.should_stop = True
            self.stopped_by_budget = True

    def _make_plan(self, sigma: float, q: float, planned: int | None) -> None:
        """Find T*, the steps at ``(sigma, q)`` after what the ledger holds now that stay within target."""
        assert self._ledger is not None
        self._plan = (float(sigma), float(q))
        self._base = self.segments
        self._base_steps = self._ledger.steps
        self._allowed_steps = None
        if self.target_epsilon is not None:
            self._allowed_steps = self._search_up_to(planned if planned is not None else 1024)

    def _replan_if_mechanism_changed(self, trainer: pl.Trainer) -> None:
        """A reloaded training loader changed q: what follows is a new segment with its own plan."""
        strategy = trainer.strategy
        current = (float(strategy.noise_multiplier), float(strategy.sample_rate))
        if self._plan is None or current == self._plan:
            return
        rank_zero_info(
            f"PrivacyBudget: the mechanism changed from (sigma, q) = {self._plan} to {current}; "
            "a new accounted segment starts."
        )
        planned = None if self._planned is None else max(self._planned - self._live_steps(), 0)
        self._planned = planned
        self._make_plan(current[0], current[1], planned)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._replan_if_mechanism_changed(trainer)
        # The epsilon logged at this epoch's end is known now: compute it while the epoch trains.
        if self._plan is None or not math.isfinite(trainer.num_training_batches):
            return
        steps = self._live_steps() + math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        if self._allowed_steps is not None:
            steps = min(steps, self._allowed_steps)
        self._accountant.prefetch([*self._base, (self._plan[0], self._plan[1], steps)])

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._allowed_steps is None or self._live_steps() < self._allowed_steps:
            return
        if self._budget_binds:
            raise RuntimeError(
                "PrivacyBudget stopped training at the target epsilon, but Trainer(min_epochs=..., "
                "min_steps=...) forces it to continue, which would exceed the budget. Lower "
                "min_epochs/min_steps or raise target_epsilon."
            )
        self._extend_horizon()  # training runs longer than planned: search further out

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Checked after every batch, not at epoch ends, so the step after T* never runs. T* was
        # found once (T* within the target, T* + 1 beyond it): no accountant call per step.
        if self._allowed_steps is None or self._live_steps() < self._allowed_steps:
            return
        if not self._budget_binds and (self._planned is None or self._live_steps() < self._planned):
            self._allowed_steps = self._search_up_to(2 * max(self._allowed_steps, 1))
        if self._budget_binds and self._live_steps() >= self._allowed_steps:
            trainer.should_stop = True
            self.stopped_by_budget = True
            self._announce_budget_stop()

    def _announce_budget_stop(self) -> None:
        """Say that the budget, not the Trainer's plan, ended training; warn when well before the plan."""
        taken, planned = self._live_steps(), self._planned
        message = (
            f"PrivacyBudget: stopping after step {taken}"
            + (f" of {planned} planned" if planned is not None else "")
            + f": one more step would exceed target_epsilon={self.target_epsilon:g} "
            f"(epsilon={self.epsilon:.4g} spent at delta={self.delta:g})."
        )
        if planned is not None and taken < planned:
            rank_zero_warn(
                message + " Training ends before the Trainer's max_epochs/max_steps. To use the whole "
                "plan, let PrivacyBudget calibrate sigma (DPAutoStrategy(noise_multiplier='auto')) or "
                "raise noise_multiplier."
            )
        else:
            rank_zero_info(message)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epsilon = self.epsilon
        self.history.append((trainer.current_epoch, self.steps, epsilon))
        # Every rank holds the same epsilon (the same ledger), so the reduction changes nothing; it is
        # there because Lightning warns about an epoch-level metric logged without sync_dist under DDP.
        # reduce_fx="max": the value itself, whatever the ranks' batch sizes.
        pl_module.log(
            "epsilon",
            epsilon,
            prog_bar=True,
            logger=bool(trainer.loggers),
            on_epoch=True,
            sync_dist=True,
            reduce_fx="max",
        )
        if trainer.world_size > 1:
            # The sync is a collective that runs where the metric is first read. The progress bar reads
            # it right after this hook on rank 0 only, the other ranks later (checkpointing, epoch-end
            # logging): a collective in between (self.all_gather in LightningModule.on_train_epoch_end)
            # would meet the wrong peer and hang. Reading the metrics here syncs them on every rank at
            # the same point; later readers get Lightning's cached value (tests/test_ddp.py).
            _ = trainer.callback_metrics

    # The end-of-fit line (sigma, q, steps, epsilon, why it stopped) is printed by the strategy from
    # lightning_autodp.integration.summary, which reads this callback's epsilon, delta and stopped_by_budget.

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._accountant.close()
        self._plan = None  # the ledger stays attached: epsilon and segments remain readable

    # ------------------------------------------------------------------ checkpoints

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "accountant": self.accountant,
            "segments": [list(s) for s in self.segments],  # informative: the strategy's ledger is restored
            "history": [list(h) for h in self.history],
            "calibrated_noise_multiplier": self._calibrated,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if float(state_dict["delta"]) != self.delta:
            raise ValueError(
                f"The checkpoint accounted privacy at delta={state_dict['delta']}, this PrivacyBudget uses "
                f"delta={self.delta}. Epsilons at different deltas do not add up: resume with "
                f"PrivacyBudget(delta={state_dict['delta']})."
            )
        self._restored_segments = merge_segments(state_dict["segments"])
        self.history = [(int(e), int(s), float(eps)) for e, s, eps in state_dict["history"]]
        self._calibrated = state_dict.get("calibrated_noise_multiplier")

    # ------------------------------------------------------------------ planning

    def calibrate_noise_multiplier(self, request: CalibrationRequest) -> float:
        r"""The smallest sigma (within 1%) with which ``request``'s planned run stays within the target.

        The strategy's question (:class:`~lightning_autodp.mechanism.calibration.NoiseCalibrator`),
        asked once per fit when training starts: :math:`\sigma` such that the spent segments
        followed by ``planned_steps`` steps at ``(sigma, sample_rate)`` give
        :math:`0.99\,\varepsilon_{\text{target}} \le \varepsilon \le \varepsilon_{\text{target}}`.
        """
        q, planned, spent = request.sample_rate, request.planned_steps, list(request.spent)
        if self.target_epsilon is None:
            raise ValueError(
                "PrivacyBudget has no target_epsilon to calibrate the noise multiplier for: set "
                "PrivacyBudget(target_epsilon=...), or give sigma yourself with "
                "DPAutoStrategy(noise_multiplier=1.0) to only account epsilon."
            )
        if planned is None:
            raise ValueError(
                "PrivacyBudget calibrates the noise multiplier for the planned length of training, and "
                "Trainer(max_epochs=-1) plans none. Set Trainer(max_epochs=...) or Trainer(max_steps=...); "
                "or, to train until the budget is spent, fix sigma with "
                "DPAutoStrategy(noise_multiplier=1.0) and keep max_epochs=-1."
            )
        steps = max(planned, 1)
        start = None
        if self.accountant != "rdp":
            # RDP is cheap and a little looser: its sigma is a close, feasible first guess. Below
            # RDP's floor (about 0.1 at delta=1e-5) PRV still certifies: it then searches alone.
            with contextlib.suppress(ValueError):
                start = Accountant("rdp", self.delta).calibrate_noise_multiplier(
                    spent, q, steps, self.target_epsilon
                )
        try:
            sigma = self._accountant.calibrate_noise_multiplier(
                spent, q, steps, self.target_epsilon, start=start
            )
        except ValueError as err:
            raise ValueError(
                f"PrivacyBudget cannot reach target_epsilon={self.target_epsilon:g} at delta={self.delta:g} "
                f"over {steps} steps with q={q:.4g}: {err} Spend less per run: more training data or a "
                "smaller batch (both lower q), fewer epochs or max_steps, or a larger target_epsilon or "
                "delta. Whatever the noise, the PRV accountant reports no epsilon below about 0.01 and "
                "RDP none below about 0.1 at delta=1e-5."
            ) from err
        self._calibrated = sigma
        planned_eps = self._accountant.epsilon([*spent, (sigma, q, planned)])
        rank_zero_info(
            f"PrivacyBudget: noise_multiplier={sigma:.4g} calibrated for epsilon={planned_eps:.4g} "
            f"(target {self.target_epsilon}) at delta={self.delta:g} over {planned} steps with q={q:.4g} "
            f"({self.accountant})."
        )
        return sigma

    def _search_up_to(self, horizon: int) -> int:
        assert self._plan is not None and self.target_epsilon is not None
        horizon = max(horizon, 1)
        sigma, q = self._plan
        allowed = self._accountant.max_steps(self._base, sigma, q, self.target_epsilon, horizon)
        self._budget_binds = allowed < horizon
        return allowed

    def _extend_horizon(self) -> None:
        """Training runs past the planned number of steps: search further out, or refuse the step."""
        assert self._allowed_steps is not None
        self._allowed_steps = self._search_up_to(2 * max(self._allowed_steps, 1))
        if self._allowed_steps <= self._live_steps():
            raise RuntimeError(
                f"PrivacyBudget: the next optimizer step would exceed target_epsilon={self.target_epsilon}, "
                f"but training continues past the {self._planned} steps the Trainer planned. Training is "
                "stopped here; set Trainer(max_epochs=...) or max_steps so that the plan is known."
            )
