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
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import numpy as np
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
        self._pending: dict[tuple[Segment, ...], Future[float]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.calls = 0  # evaluations of the underlying accountant (for the cost benchmark)
        self.seconds = 0.0  # their total compute time, background thread included

    def epsilon(self, segments: Iterable[Sequence[float]]) -> float:
        r"""Epsilon spent at ``delta`` after ``segments``: the composition over all their steps.

        0 for an empty history; ``inf`` if any step ran without noise.
        """
        key = tuple(merge_segments(segments))
        if not key:
            return 0.0
        if any(sigma == 0.0 for sigma, _, _ in key):
            return math.inf
        with self._lock:
            pending = self._pending.get(key)
        if pending is not None:
            return pending.result()
        if key not in self._cache:
            self._cache[key] = self._compute(key)
        return self._cache[key]

    def prefetch(self, segments: Iterable[Sequence[float]]) -> None:
        """Start computing ``epsilon(segments)`` in a background thread.

        The callback asks for the epsilon of the coming epoch end when the epoch starts, so that
        the accountant's FFTs (numpy releases the GIL) overlap with training instead of pausing it.
        """
        key = tuple(merge_segments(segments))
        if not key or key in self._cache or any(sigma == 0.0 for sigma, _, _ in key):
            return
        with self._lock:
            if key in self._pending:
                return
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autodp-accountant")
            self._pending[key] = self._executor.submit(self._compute_and_cache, key)

    def _compute_and_cache(self, key: tuple[Segment, ...]) -> float:
        value = self._compute(key)
        self._cache[key] = value
        with self._lock:
            self._pending.pop(key, None)
        return value

    def _compute(self, key: tuple[Segment, ...]) -> float:
        start = time.perf_counter()
        accountant = ACCOUNTANTS[self.name]()
        accountant.history = list(key)
        with warnings.catch_warnings(), np.errstate(divide="ignore"):
            # RDP warns when the optimal order is at the edge of its default grid; the value
            # is still an upper bound, and the warning would repeat every epoch. PRV takes
            # log(1 - q) = -inf at q = 1 (no subsampling) and handles it: not worth a warning.
            warnings.filterwarnings("ignore", message="Optimal order is the")
            # A negative value means delta alone covers every outcome: the mechanism is (0, delta)-DP.
            value = max(float(accountant.get_epsilon(delta=self.delta)), 0.0)
        self.calls += 1
        self.seconds += time.perf_counter() - start
        return value

    def close(self) -> None:
        """Stop the background thread (pending results are still delivered)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_pending={}, _executor=None, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def max_steps(
        self,
        done: Sequence[Segment],
        sigma: float,
        q: float,
        target_epsilon: float,
        horizon: int,
    ) -> int:
        r"""The largest ``T`` in ``[0, horizon]`` with ``epsilon(done + [(sigma, q, T)]) <= target``.

        Epsilon grows with ``T`` and :math:`\log\varepsilon` is close to linear in :math:`\log T`,
        so the bracket ``[lo, hi]`` (``lo`` within the target, ``hi`` beyond it) is narrowed by
        interpolating there, with a bisection step whenever that fails to halve it: a handful of
        evaluations, done once per run rather than once per step. The answer is exact for the
        accountant: ``T`` is within the target and ``T + 1`` was evaluated beyond it.
        """

        def f(t: int) -> float:
            eps = self.epsilon([*done, (sigma, q, t)])
            return math.inf if eps == math.inf else math.log(max(eps, 1e-300)) - math.log(target_epsilon)

        if f(0) > 0 or f(1) > 0:
            return 0
        f_hi = f(horizon)
        if f_hi <= 0:
            return horizon
        lo, hi, f_lo = 1, horizon, f(1)
        last_side, same_side = 0, 0
        while hi - lo > 1:
            if same_side >= 2 or not math.isfinite(f_hi):
                # regula falsi stalls when one end never moves: split the bracket instead
                x = round(math.sqrt(lo * hi)) if hi > 4 * lo else (lo + hi) // 2
            else:
                log_x = math.log(lo) - f_lo * (math.log(hi) - math.log(lo)) / (f_hi - f_lo)
                x = round(math.exp(log_x))
            x = min(max(x, lo + 1), hi - 1)
            f_x = f(x)
            side = -1 if f_x <= 0 else 1
            same_side = same_side + 1 if side == last_side else 1
            last_side = side
            if side < 0:
                lo, f_lo = x, f_x
            else:
                hi, f_hi = x, f_x
        return lo

    def calibrate_noise_multiplier(
        self,
        done: Sequence[Segment],
        q: float,
        steps: int,
        target_epsilon: float,
        rtol: float = 0.005,
        start: float | None = None,
    ) -> float:
        r"""The smallest ``sigma`` (to ``rtol``) with ``epsilon(done + [(sigma, q, steps)]) <= target``.

        A search on :math:`\log\sigma` against :math:`\log\varepsilon` (nearly linear):
        bracket the target, starting from ``start`` when given, then regula falsi with the
        Illinois modification, keeping the upper end feasible, until the epsilon there lies in
        ``[(1 - rtol) * target, target]``. About five evaluations where bisection needs ten.
        """
        if target_epsilon <= self.epsilon(done):
            raise ValueError(
                f"The privacy budget is already spent: epsilon={self.epsilon(done):.4g} >= target "
                f"{target_epsilon} before this run. Raise target_epsilon or train no further."
            )
        aim = math.log((1.0 - 0.5 * rtol) * target_epsilon)

        def f(log_sigma: float) -> float:
            eps = self.epsilon([*done, (math.exp(log_sigma), q, steps)])
            return math.log(max(eps, 1e-300)) - aim  # epsilon 0 (a large delta): feasible

        def feasible(value: float) -> bool:
            return value <= math.log(target_epsilon) - aim

        # bracket: lo infeasible (too little noise), hi feasible
        hi = math.log(start) if start else 0.0
        f_hi = f(hi)
        step = 0.1 if start else math.log(2.0)
        if feasible(f_hi):
            lo, f_lo = hi - step, f(hi - step)
            while feasible(f_lo):
                if lo < math.log(1e-3):
                    return math.exp(lo)  # (nearly) no noise needed: the budget is loose for this plan
                hi, f_hi, step = lo, f_lo, 2 * step
                lo, f_lo = hi - step, f(hi - step)
        else:
            lo, f_lo = hi, f_hi
            hi, f_hi = lo + step, f(lo + step)
            while not feasible(f_hi):
                if hi > math.log(1e6):
                    floor = self.epsilon([*done, (math.exp(hi), q, steps)])
                    raise ValueError(
                        f"No noise_multiplier below 1e6 reaches epsilon={target_epsilon}: the {self.name} "
                        f"accountant reports {floor:.3g} at delta={self.delta:g} even with sigma=1e6."
                    )
                lo, f_lo, step = hi, f_hi, 2 * step
                hi, f_hi = lo + step, f(lo + step)
        w_lo, w_hi, side = f_lo, f_hi, 0  # secant weights; Illinois halves a stale one
        while f_hi < math.log((1.0 - rtol) * target_epsilon) - aim and hi - lo > 1e-9:
            x = hi - w_hi * (hi - lo) / (w_hi - w_lo)
            x = min(max(x, lo + 1e-3 * (hi - lo)), hi - 1e-3 * (hi - lo))
            f_x = f(x)
            if feasible(f_x):
                hi, f_hi, w_hi = x, f_x, f_x
                w_lo = 0.5 * w_lo if side == 1 else w_lo
                side = 1
            else:
                lo, f_lo, w_lo = x, f_x, f_x
                w_hi = 0.5 * w_hi if side == -1 else w_hi
                side = -1
        return math.exp(hi)
