r"""One line at the start and one at the end of every ``dp_auto`` fit: the privacy spent, why it stopped.

The end line reads, for example::

    dp_auto: fit ended after 800 steps (max_epochs=40 reached): sigma=2.18, q=0.0509,
    epsilon=2.99 at delta=1e-05 (PrivacyBudget, prv accountant)

* With a :class:`~lightning_autodp.PrivacyBudget` callback, epsilon and delta are the callback's
  (its whole history, resumed fits included).
* Without one, epsilon is computed here with the PRV accountant of
  :mod:`lightning_autodp.mechanism.accounting` for the ``(sigma, q, steps)`` this strategy ran, at the
  default delta :func:`default_delta`: :math:`10^{-5}`, or :math:`1/(10N)` when the training set
  has more than 10,000 examples (delta must stay well below :math:`1/N`). The line says that the
  delta is a default and how to choose it.

:func:`format_fit_summary` is a pure function of a :class:`FitSummary`; :func:`summarize_fit`
collects one from a Trainer and its strategy; :func:`log_fit_summary` prints it on rank 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_autodp.mechanism.clipping import DEFAULT_GAMMA

if TYPE_CHECKING:
    from lightning_autodp.integration.callbacks import PrivacyBudget
    from lightning_autodp.integration.strategy import DPAutoStrategy
    from lightning_autodp.mechanism.step import PrivacyLedger

#: delta used for the end-of-fit epsilon when no PrivacyBudget sets one (see :func:`default_delta`)
DEFAULT_DELTA = 1e-5
#: accountant used for the end-of-fit epsilon when no PrivacyBudget sets one
DEFAULT_ACCOUNTANT = "prv"


def default_delta(dataset_size: int | None) -> float:
    """``1e-5``, or ``1 / (10 N)`` when that is smaller (``N > 10,000``): delta well below ``1/N``."""
    if dataset_size and dataset_size > 0:
        return min(DEFAULT_DELTA, 1.0 / (10 * dataset_size))
    return DEFAULT_DELTA


@dataclass(frozen=True)
class FitSummary:
    """What one ``dp_auto`` fit spent. ``epsilon`` is ``None`` when it cannot be accounted (``q`` unknown)."""

    noise_multiplier: float
    sample_rate: float | None
    steps: int
    epsilon: float | None
    delta: float
    stop_reason: str
    accountant: str = DEFAULT_ACCOUNTANT
    from_budget: bool = False
    poisson_sampling: bool = True
    strategy: str = "dp_auto"  # the registered name of the strategy that ran


def format_fit_summary(s: FitSummary) -> str:
    """The end-of-fit line: steps, why it stopped, sigma, q, epsilon at delta, and where they come from."""
    q = "unknown" if s.sample_rate is None else f"{s.sample_rate:.4g}"
    head = (
        f"{s.strategy}: fit ended after {s.steps} steps ({s.stop_reason}): "
        f"sigma={s.noise_multiplier:.4g}, q={q}, "
    )
    if s.epsilon is None:
        return head + (
            "epsilon not accounted: the sample rate is unknown (a DataLoader without len() or batch_size). "
            "Use poisson_sampling=True with a map-style dataset for a guarantee."
        )
    source = (
        f"PrivacyBudget, {s.accountant} accountant"
        if s.from_budget
        else f"{s.accountant} accountant, default delta: add PrivacyBudget(delta=...) to choose it"
    )
    eps = "inf (no noise: no privacy)" if math.isinf(s.epsilon) else f"{s.epsilon:.4g}"
    line = head + f"epsilon={eps} at delta={s.delta:.3g} ({source})"
    if not s.poisson_sampling:
        line += "; this epsilon assumes Poisson sampling and does not hold for poisson_sampling=False"
    return line + "."


def find_budget(trainer: pl.Trainer) -> PrivacyBudget | None:
    """The Trainer's first :class:`~lightning_autodp.PrivacyBudget` (the one that calibrates sigma)."""
    # imported here: the callback imports the strategy, which imports this module
    from lightning_autodp.integration.callbacks import PrivacyBudget

    return next((cb for cb in trainer.callbacks if isinstance(cb, PrivacyBudget)), None)


def stop_reason(trainer: pl.Trainer, budget: PrivacyBudget | None = None) -> str:
    """Why the fit loop ended, most specific first: the privacy budget, max_steps, max_epochs, a callback."""
    if budget is not None and budget.stopped_by_budget:
        return f"PrivacyBudget: one more step would exceed target_epsilon={budget.target_epsilon:g}"
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return f"max_steps={trainer.max_steps} reached"
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs != -1 and trainer.current_epoch >= max_epochs:
        return f"max_epochs={max_epochs} reached"
    if trainer.should_stop:
        stoppers = [type(cb).__name__ for cb in trainer.callbacks if getattr(cb, "stopped_epoch", 0)]
        if stoppers:
            return f"stopped by {', '.join(stoppers)}"
        return "trainer.should_stop was set by a callback or the module"
    return "the fit loop ended"


def summarize_fit(strategy: DPAutoStrategy, trainer: pl.Trainer) -> FitSummary:
    """Collect the :class:`FitSummary` of a finished ``dp_auto`` fit."""
    budget = find_budget(trainer)
    sigma_or_name = strategy.noise_multiplier
    sigma = float(sigma_or_name) if isinstance(sigma_or_name, (int, float)) else math.nan
    q = _sample_rate_or_none(strategy)
    common = {
        "noise_multiplier": sigma,
        "sample_rate": q,
        "stop_reason": stop_reason(trainer, budget),
        "poisson_sampling": bool(strategy.poisson_sampling),
        "strategy": strategy.strategy_name,
    }
    if budget is not None:
        return FitSummary(
            steps=int(budget.steps),
            epsilon=float(budget.epsilon),
            delta=float(budget.delta),
            accountant=str(budget.accountant),
            from_budget=True,
            **common,
        )
    delta = default_delta(strategy.dataset_size)
    # The ledger holds every (sigma, q) segment that ran, restored checkpoints included.
    ledger = strategy.ledger
    return FitSummary(steps=ledger.steps, epsilon=ledger_epsilon(ledger, delta), delta=delta, **common)


def ledger_epsilon(ledger: PrivacyLedger, delta: float) -> float | None:
    """Epsilon at ``delta`` of a :class:`~lightning_autodp.mechanism.step.PrivacyLedger`.

    None where q is unknown.
    """
    segments = ledger.segments
    if not segments:
        return 0.0
    if any(q is None for _, q, _ in segments):
        return None
    if any(sigma == 0 for sigma, _, _ in segments):
        return math.inf
    return float(ledger.epsilon(delta, DEFAULT_ACCOUNTANT))


def _sample_rate_or_none(strategy: DPAutoStrategy) -> float | None:
    try:
        return float(strategy.sample_rate)
    except RuntimeError:  # no training DataLoader with a known size and batch size
        return None


def log_fit_summary(strategy: DPAutoStrategy, trainer: pl.Trainer) -> FitSummary:
    """Print the end-of-fit line on rank 0 (every rank computes it: no collective is needed)."""
    summary = summarize_fit(strategy, trainer)
    rank_zero_info(format_fit_summary(summary))
    return summary


def format_start_line(strategy: DPAutoStrategy, planned_steps: float) -> str:
    """The start-of-fit line: engine, clipping, sigma, q, N and the planned number of steps."""
    sigma = strategy.noise_multiplier
    sigma_text = f"{sigma:.4g}" if isinstance(sigma, (int, float)) else str(sigma)
    q = _sample_rate_or_none(strategy)
    attached = strategy.mechanism.engine  # what "auto" resolved to, once the model is set up
    engine = attached.name if attached is not None else strategy.engine
    clipping = f"clipping={strategy.clipping}, max_grad_norm={strategy.max_grad_norm:g}"
    if strategy.clipping in DEFAULT_GAMMA:
        clipping += f", gamma={strategy.gamma:g}"
    planned = "until stopped" if not math.isfinite(planned_steps) else f"{int(planned_steps)} steps planned"
    return (
        f"{strategy.strategy_name}: sigma={sigma_text}, "
        f"q={'unknown' if q is None else f'{q:.4g}'}, "
        f"N={strategy.dataset_size}, {planned}; engine={engine}, {clipping}, "
        f"poisson_sampling={strategy.poisson_sampling}, secure_mode={strategy.secure_mode}"
    )


def log_start_line(strategy: DPAutoStrategy, trainer: pl.Trainer) -> None:
    """Print the start-of-fit line on rank 0, once sigma is settled (the strategy's on_train_start)."""
    rank_zero_info(format_start_line(strategy, trainer.estimated_stepping_batches))
