r"""The epsilon lower bound of one-run privacy auditing (Steinke, Nasr, Jagielski, NeurIPS 2023).

Setting: ``m`` canaries, each included in training independently with probability 1/2. After
training the auditor guesses "in" for some canaries and "out" for others and abstains on the rest:
``r`` guesses, ``v`` of them correct. If training is :math:`(\varepsilon, \delta)`-DP, the number of
correct guesses is stochastically dominated by a binomial with success probability
:math:`p_\varepsilon = e^\varepsilon/(1+e^\varepsilon)` (randomized response), up to a
:math:`\delta` term (the paper's Theorem 3.1 / Corollary 5.4 and the code of its Appendix D):

.. math::

    \Pr[V \ge v] \;\le\; \underbrace{\Pr[\mathrm{Bin}(r, p_\varepsilon) \ge v]}_{\beta}
        \;+\; 2 m \delta \cdot \underbrace{\max_{1 \le i \le v}
        \tfrac{1}{i}\Pr[v > \mathrm{Bin}(r, p_\varepsilon) \ge v - i]}_{\alpha}

This p-value is decreasing in :math:`\varepsilon`. The audit reports the largest
:math:`\varepsilon` rejected at significance ``1 - confidence``: with probability at least
``confidence`` over the canaries' inclusion and the training randomness, the training run is
**not** :math:`(\varepsilon_{\text{lower}}, \delta)`-DP for the reported lower bound.
:func:`epsilon_lower_bound` follows the paper's ``get_eps_audit``: grow an upper bracket by 1 until
it is not rejected, then 30 bisection steps, returning the (conservative) low end.

Choosing how many guesses to make after seeing the scores is a multiple comparison:
:func:`audit_scores` tries a fixed list of ``(k_+, k_-)`` choices and tests each at significance
``(1 - confidence) / len(choices)`` (Bonferroni), so the reported bound keeps its confidence.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

#: fractions of m guessed (two-sided: half "in" from the top scores, half "out" from the bottom;
#: one-sided: all "in" from the top). Fixed before seeing any score.
GUESS_FRACTIONS: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
#: significance at which the canaries' realised sampling rate is called not the accounted one
SAMPLING_FALSE_ALARM = 1e-6


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Probability of ``>= v`` correct guesses out of ``r`` under the null hypothesis ``(eps, delta)``-DP."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need eps >= 0 and 0 <= delta <= 1, got eps={eps}, delta={delta}")
    q = 1.0 / (1.0 + math.exp(-eps))  # accuracy of eps-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    if delta == 0:
        return min(beta, 1.0)
    # alpha = max_i P[v > Bin(r, q) >= v - i] / i, the cumulative sums taken from the top down
    cumulative = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(cumulative / np.arange(1, v + 1), initial=0.0))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` correct of ``r`` guesses on ``m`` canaries rejects at ``confidence``.

    Returns 0.0 when not even ``eps = 0`` is rejected.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    significance = 1.0 - confidence
    eps_min, eps_max = 0.0, 1.0  # keep p_value(eps_min) < significance <= p_value(eps_max)
    if p_value(m, r, v, eps_min, delta) >= significance:
        return 0.0
    while p_value(m, r, v, eps_max, delta) < significance:
        eps_max += 1.0
    for _ in range(30):
        eps = (eps_min + eps_max) / 2
        if p_value(m, r, v, eps, delta) < significance:
            eps_min = eps
        else:
            eps_max = eps
    return eps_min


def max_certifiable_epsilon(m: int, delta: float, confidence: float = 0.95) -> float:
    """The audit's ceiling: the bound from ``m`` correct guesses out of ``m`` (no audit with ``m``
    canaries can report more, however broken the mechanism)."""
    return epsilon_lower_bound(m, m, m, delta, confidence)


def audit_ceiling(m: int, delta: float, confidence: float = 0.95) -> float:
    """The ceiling :func:`max_certifiable_epsilon` at the Bonferroni level of :func:`audit_scores`."""
    return max_certifiable_epsilon(m, delta, 1.0 - (1.0 - confidence) / len(guess_choices(m)))


@functools.cache
def canaries_needed(epsilon: float, delta: float, confidence: float = 0.95) -> tuple[int | None, float]:
    r"""The fewest canaries whose audit can show a bound above ``epsilon``, and the best ceiling seen.

    The ceiling grows with :math:`m` like :math:`\log m` until the :math:`2m\delta` term of the
    p-value takes over (at :math:`\delta = 10^{-5}` it peaks near 5.4, around :math:`m = 2000`), so
    beyond some epsilon no number of canaries can show a violation. Scans :math:`m` from 50 to
    20000 in steps of 10%. Returns ``(m, ceiling at m)``, or ``(None, best ceiling)``.
    """
    m, best = 50, 0.0
    while m <= 20_000:
        ceiling = audit_ceiling(m, delta, confidence)
        if ceiling > epsilon:
            return m, ceiling
        best = max(best, ceiling)
        m = max(m + 1, int(m * 1.1))
    return None, best


@dataclass(frozen=True)
class AuditResult:
    """What one audit found.

    Attributes:
        epsilon_lower_bound: with probability ``>= confidence`` the run is not
            ``(epsilon_lower_bound, delta)``-DP. Compare it with the accounted epsilon: above it
            means the guarantee is violated (or the accounting is wrong).
        confidence: e.g. 0.95.
        delta: the delta the bound is for.
        m: canaries; ``included``: how many of them were in training.
        guesses, correct: ``r`` and ``v`` of the choice that gave the bound.
        k_in, k_out: how many top scores were guessed "in" and bottom scores "out".
        max_certifiable: the largest bound this audit can give with ``m`` canaries (all ``m``
            guessed right, at the Bonferroni-corrected level): the audit's power ceiling.
        choices: how many ``(k_in, k_out)`` choices were tried (Bonferroni factor).
        sampling_p_value: two-sided p-value of the canaries' draws by the data sampler at the
            accounted rate (None if not tested); below :data:`SAMPLING_FALSE_ALARM` the sampler is
            not drawing at the accounted ``q`` (:attr:`sampling_violated`).
        sampled_rate, accounted_rate: the canaries' realised inclusion rate and the accounted ``q``.
    """

    epsilon_lower_bound: float
    confidence: float
    delta: float
    m: int
    included: int
    guesses: int
    correct: int
    k_in: int
    k_out: int
    max_certifiable: float
    choices: int
    sampling_p_value: float | None = None
    sampled_rate: float | None = None
    accounted_rate: float | None = None

    @property
    def sampling_violated(self) -> bool:
        """The canaries, drawn by the data's sampler, came in at a rate implausible under the accounted q."""
        return self.sampling_p_value is not None and self.sampling_p_value < SAMPLING_FALSE_ALARM

    def can_show_violation(self, accounted_epsilon: float) -> bool:
        """Whether this audit's ceiling lies above ``accounted_epsilon`` (else no bound can exceed it)."""
        return self.max_certifiable > accounted_epsilon

    def summary(self, accounted_epsilon: float | None = None) -> str:
        text = (
            f"audit: epsilon >= {self.epsilon_lower_bound:.3f} at {self.confidence:.0%} confidence "
            f"(delta={self.delta:g}; {self.correct}/{self.guesses} guesses right on m={self.m} canaries; "
            f"ceiling: the most m={self.m} canaries can show is {self.max_certifiable:.2f})"
        )
        if self.sampling_p_value is not None:
            text += (
                f"; sampler: canaries drawn at rate {self.sampled_rate:.4g} against the accounted "
                f"q={self.accounted_rate:.4g} (p={self.sampling_p_value:.2g}"
                + (", VIOLATED)" if self.sampling_violated else ", consistent)")
            )
        if accounted_epsilon is not None:
            violated = self.epsilon_lower_bound > accounted_epsilon or self.sampling_violated
            text += f"; accounted epsilon {accounted_epsilon:.3f}: {'VIOLATED' if violated else 'consistent'}"
            if not self.can_show_violation(accounted_epsilon):
                text += ". " + self.ceiling_note(accounted_epsilon)
        return text

    def ceiling_note(self, accounted_epsilon: float) -> str:
        """What it would take for the epsilon bound to be able to exceed ``accounted_epsilon``."""
        m, best = canaries_needed(accounted_epsilon, self.delta, self.confidence)
        head = (
            f"This audit cannot show a violation of epsilon={accounted_epsilon:.3f}: its ceiling "
            f"{self.max_certifiable:.2f} is below it"
        )
        if m is not None:
            return f"{head}; PrivacyAudit(m={m}) could (ceiling {best:.2f})."
        return (
            f"{head}, and no number of canaries up to 20000 lifts the ceiling above {best:.2f} at "
            f"delta={self.delta:g}: audit at a lower target epsilon or a larger delta."
        )


def guess_choices(m: int, fractions: Sequence[float] = GUESS_FRACTIONS) -> list[tuple[int, int]]:
    """The fixed ``(k_in, k_out)`` choices tried for ``m`` canaries (two-sided and one-sided)."""
    choices: list[tuple[int, int]] = []
    for f in fractions:
        k = max(1, round(f * m))
        for choice in ((k - k // 2, k // 2), (k, 0)):
            if choice not in choices and sum(choice) <= m:
                choices.append(choice)
    return choices


def audit_scores(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    delta: float,
    confidence: float = 0.95,
    fractions: Sequence[float] = GUESS_FRACTIONS,
) -> AuditResult:
    """Turn canary scores (higher = "more likely in") into an epsilon lower bound.

    For each fixed choice ``(k_in, k_out)``: guess "in" for the ``k_in`` highest scores and "out"
    for the ``k_out`` lowest, count the correct guesses, and compute the bound at significance
    ``(1 - confidence) / choices``. The largest bound is reported: all choices hold together at
    ``confidence`` (union bound).
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if m == 0 or included.shape != scores.shape:
        raise ValueError(
            f"need one inclusion flag per score and m >= 1, got {included.shape} and {scores.shape}"
        )
    order = np.argsort(-scores, kind="stable")
    in_sorted = included[order]
    choices = guess_choices(m, fractions)
    per_choice = 1.0 - (1.0 - confidence) / len(choices)
    best = (0.0, 0, 0, 0, 0)
    for k_in, k_out in choices:
        correct = int(in_sorted[:k_in].sum()) + int((~in_sorted[m - k_out :]).sum() if k_out else 0)
        eps = epsilon_lower_bound(m, k_in + k_out, correct, delta, per_choice)
        if eps > best[0]:
            best = (eps, k_in + k_out, correct, k_in, k_out)
    eps, guesses, correct, k_in, k_out = best
    return AuditResult(
        epsilon_lower_bound=eps,
        confidence=confidence,
        delta=delta,
        m=m,
        included=int(included.sum()),
        guesses=guesses,
        correct=correct,
        k_in=k_in,
        k_out=k_out,
        max_certifiable=max_certifiable_epsilon(m, delta, per_choice),
        choices=len(choices),
    )
