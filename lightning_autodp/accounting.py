r"""Privacy accounting: epsilon of a training history, the stopping step, and sigma calibration.

A DP training run is a sequence of *segments* ``(sigma, q, steps)``: ``steps`` optimizer steps of
the Poisson-subsampled Gaussian mechanism with sampling rate ``q`` and noise multiplier
``sigma`` (noise ``sigma * R`` on a sum of examples clipped to norm ``R``). A run resumed with
another ``sigma`` or ``q`` simply adds a segment. The epsilon spent at ``delta`` is the
composition over all segments, computed by Opacus's accountants (``"prv"``: Gopi et al. 2021,
numerical composition of privacy loss random variables, tight; ``"rdp"``: Rényi DP, Mironov et
al. 2019, looser and cheaper). Nothing here re-implements their math: this module only keeps the
history, caches results and searches over steps or sigma.

Example::

    acc = Accountant("prv", delta=1e-5)
    acc.epsilon([(1.0, 0.004, 2000)])                            # spent after 2000 steps
    acc.max_steps([], sigma=1.0, q=0.004, target_epsilon=3.0, horizon=50_000)
    acc.calibrate_noise_multiplier([], q=0.004, steps=14_100, target_epsilon=3.0)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Literal

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant

AccountantName = Literal["prv", "rdp"]
ACCOUNTANTS: dict[str, type[IAccountant]] = {"prv": PRVAccountant, "rdp": RDPAccountant}

#: ``(noise_multiplier, sample_rate, steps)``, the order of Opacus's ``accountant.history``.
Segment = tuple[float, float, int]


def merge_segments(segments: Iterable[Sequence[float]]) -> list[Segment]:
    """Drop empty segments and join neighbours with the same ``(sigma, q)``.

    Joining makes the result independent of where a run was interrupted: a run resumed after
    ``k`` steps is accounted as ``[(sigma, q, T)]``, exactly like the uninterrupted one.
    """
    merged: list[Segment] = []
    for sigma, q, steps in segments:
        sigma, q, steps = float(sigma), float(q), int(steps)
        if steps <= 0:
            continue
        if merged and merged[-1][0] == sigma and merged[-1][1] == q:
            merged[-1] = (sigma, q, merged[-1][2] + steps)
        else:
            merged.append((sigma, q, steps))
    return merged


class Accountant:
    """Epsilon at a fixed ``delta`` for histories of segments, with a cache.

    Args:
        name: ``"prv"`` (default of :class:`~lightning_autodp.PrivacyBudget`) or ``"rdp"``.
        delta: the target delta, in (0, 1).
    """

    def __init__(self, name: AccountantName = "prv", delta: float = 1e-5) -> None:
        if name not in ACCOUNTANTS:
            raise ValueError(f"Unknown accountant={name!r}. Use one of {', '.join(map(repr, ACCOUNTANTS))}.")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must lie in (0, 1), got {delta!r}; 1e-5 or below 1/N is usual.")
        self.name = name
        self.delta = delta
        self._cache: dict[tuple[Segment, ...], float] = {}
        self.calls = 0  # evaluations of the underlying accountant (for the cost benchmark)

    def epsilon(self, segments: Iterable[Sequence[float]]) -> float:
        r"""Epsilon spent at ``delta`` after ``segments``: the composition over all their steps.

        0 for an empty history; ``inf`` if any step ran without noise.
        """
        key = tuple(merge_segments(segments))
        if not key:
            return 0.0
        if any(sigma == 0.0 for sigma, _, _ in key):
            return math.inf
        if key not in self._cache:
            accountant = ACCOUNTANTS[self.name]()
            accountant.history = list(key)
            with warnings.catch_warnings():
                # RDP warns when the optimal order is at the edge of its default grid; the value
                # is still an upper bound, and the warning would repeat every epoch.
                warnings.filterwarnings("ignore", message="Optimal order is the")
                self._cache[key] = float(accountant.get_epsilon(delta=self.delta))
            self.calls += 1
        return self._cache[key]

    def max_steps(
        self,
        done: Sequence[Segment],
        sigma: float,
        q: float,
        target_epsilon: float,
        horizon: int,
    ) -> int:
        """The largest ``T`` in ``[0, horizon]`` with ``epsilon(done + [(sigma, q, T)]) <= target``.

        Epsilon grows with ``T``, so a bisection needs about ``log2(horizon)`` evaluations, done
        once per run rather than once per step.
        """

        def within(t: int) -> bool:
            return self.epsilon([*done, (sigma, q, t)]) <= target_epsilon

        if not within(0):
            return 0
        if within(horizon):
            return horizon
        lo, hi = 0, horizon  # within(lo), not within(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if within(mid) else (lo, mid)
        return lo

    def calibrate_noise_multiplier(
        self,
        done: Sequence[Segment],
        q: float,
        steps: int,
        target_epsilon: float,
        rtol: float = 0.005,
    ) -> float:
        r"""The smallest ``sigma`` (to ``rtol``) with ``epsilon(done + [(sigma, q, steps)]) <= target``.

        Bisection on :math:`\sigma`, keeping the upper end feasible, until the epsilon there lies
        in ``[(1 - rtol) * target, target]``.
        """
        if target_epsilon <= self.epsilon(done):
            raise ValueError(
                f"The privacy budget is already spent: epsilon={self.epsilon(done):.4g} >= target "
                f"{target_epsilon} before this run. Raise target_epsilon or train no further."
            )

        def eps(sigma: float) -> float:
            return self.epsilon([*done, (sigma, q, steps)])

        lo, hi = 0.5, 1.0  # bracket: eps(lo) > target >= eps(hi)
        if eps(hi) <= target_epsilon:
            while eps(lo) <= target_epsilon:
                if lo < 1e-3:
                    return lo  # (nearly) no noise needed: the budget is loose for this plan
                lo, hi = 0.5 * lo, lo
        else:
            lo, hi = hi, 2.0 * hi
            while eps(hi) > target_epsilon:
                if hi > 1e6:
                    raise ValueError(f"No noise_multiplier below 1e6 reaches epsilon={target_epsilon}.")
                lo, hi = hi, 2.0 * hi
        while eps(hi) < (1.0 - rtol) * target_epsilon and hi - lo > 1e-6 * hi:
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
        return hi
