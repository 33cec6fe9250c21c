r"""The DP step without Lightning: clip and accumulate, noise, all-reduce, divide, and the ledger.

For one optimizer step with logical batch :math:`S` (all micro-batches on all ranks) the gradient
handed to the optimizer is

.. math::

    \tilde g = \frac{1}{B}\Big(\sum_{r} \sum_{i \in S_r} C_i\, g_i + \sigma R\, z\Big),
    \qquad z \sim N(0, I)

* :meth:`DPStep.clip_and_accumulate` adds one micro-batch's :math:`\sum_i C_i g_i` (the engine
  gives raw per-example gradients :math:`\hat g_i = s\, g_i` of whatever was backpropagated);
* :meth:`DPStep.privatize` adds :math:`\sigma R z` on one rank only, sums over ranks
  (:func:`all_reduce_in_buckets`), divides by :math:`B` and writes ``p.grad``; it records the
  step's :math:`(\sigma, q)` in the :class:`PrivacyLedger` at the place the noise is added.

Nothing here imports Lightning: tests drive it with an engine and a per-example loop
(``tests/test_core.py``), and :class:`~lightning_autodp.DPAutoStrategy` only calls it from its hooks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_autodp.engines.base import PerSampleEngine
from lightning_autodp.mechanism.accounting import Accountant, AccountantName
from lightning_autodp.mechanism.clipping import ClippingMode, clip_factors
from lightning_autodp.mechanism.noise import NoiseSource

#: DDP's default bucket size (``DistributedDataParallel(bucket_cap_mb=25)``)
DEFAULT_BUCKET_MB = 25.0

#: ``(sigma, q, steps)``; ``q`` is None when the sampling rate is unknown (no Poisson sampling
#: over a dataset without ``len``).
LedgerSegment = tuple[float, "float | None", int]


class PrivacyLedger:
    r"""What the mechanism actually ran: one ``(sigma, q)`` per optimizer step, as segments.

    A step with the same :math:`(\sigma, q)` as the previous one extends the last segment;
    any change (a loader reload changing :math:`q`, a new fit with another :math:`\sigma`)
    starts a new one. The accounting composes the segments in order.

    Read API (also for summaries): :attr:`segments`, :attr:`steps`, :attr:`last`,
    :meth:`epsilon`; persistence: :meth:`state_dict` / :meth:`load_state_dict`.

    Example::

        ledger = PrivacyLedger()
        for _ in range(100):
            ledger.record(1.0, 0.01)
        ledger.record(1.0, 0.02)
        ledger.segments          # [(1.0, 0.01, 100), (1.0, 0.02, 1)]
        ledger.epsilon(1e-5, "rdp")
    """

    def __init__(self) -> None:
        self._segments: list[list[Any]] = []

    def record(self, sigma: float, q: float | None) -> None:
        """Account one optimizer step of the subsampled Gaussian mechanism with ``(sigma, q)``."""
        sigma = float(sigma)
        q = None if q is None else float(q)
        if self._segments and self._segments[-1][0] == sigma and self._segments[-1][1] == q:
            self._segments[-1][2] += 1
        else:
            self._segments.append([sigma, q, 1])

    @property
    def segments(self) -> list[LedgerSegment]:
        """``[(sigma, q, steps), ...]`` in the order they ran."""
        return [(s, q, n) for s, q, n in self._segments]

    @property
    def steps(self) -> int:
        """Optimizer steps recorded (all fits, restored checkpoints included)."""
        return sum(n for _, _, n in self._segments)

    @property
    def last(self) -> tuple[float, float | None] | None:
        """``(sigma, q)`` of the latest step, None before the first."""
        return (self._segments[-1][0], self._segments[-1][1]) if self._segments else None

    def accountable_segments(self) -> list[tuple[float, float, int]]:
        """:attr:`segments` for an accountant; raises if a segment has no known ``q``."""
        if any(q is None for _, q, _ in self._segments):
            raise ValueError(
                "The privacy ledger has steps with an unknown sampling rate q (poisson_sampling=False over "
                "a dataset without len()): no epsilon can be computed. Use "
                "DPAutoStrategy(poisson_sampling=True)."
            )
        return [(s, q, n) for s, q, n in self._segments]

    def epsilon(self, delta: float, accountant: AccountantName = "prv") -> float:
        """Epsilon at ``delta`` of everything recorded (Opacus's PRV or RDP accountant)."""
        acc = Accountant(accountant, delta)
        try:
            return acc.epsilon(self.accountable_segments())
        finally:
            acc.close()

    def state_dict(self) -> dict[str, Any]:
        return {"segments": [list(s) for s in self._segments]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._segments = [
            [float(s), None if q is None else float(q), int(n)] for s, q, n in state["segments"] if int(n) > 0
        ]

    def __repr__(self) -> str:
        return f"PrivacyLedger(segments={self.segments})"


def all_reduce_in_buckets(
    tensors: Sequence[Tensor], reduce: Callable[[Tensor], None], bucket_mb: float = DEFAULT_BUCKET_MB
) -> int:
    """Sum-reduce ``tensors`` in place, at most ``bucket_mb`` of them flattened at a time.

    Consecutive tensors of one dtype and device are packed into a flat buffer of at most
    ``bucket_mb`` megabytes (2**20 bytes), reduced with ``reduce`` (e.g. ``dist.all_reduce``) and
    copied back, so the step needs one bucket of extra memory instead of a second copy of every
    gradient. A contiguous tensor larger than a bucket is reduced in place, without a copy.
    Returns the number of ``reduce`` calls. The sums are those of one flat all-reduce: the
    reduction is elementwise, so the packing changes nothing but the memory.
    """
    limit = max(int(bucket_mb * 2**20), 1)
    calls = 0
    bucket: list[Tensor] = []
    bucket_bytes = 0

    def flush() -> None:
        nonlocal calls, bucket, bucket_bytes
        if not bucket:
            return
        if len(bucket) == 1 and bucket[0].is_contiguous():
            reduce(bucket[0])
        else:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            reduce(flat)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        calls += 1
        bucket, bucket_bytes = [], 0

    for tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if bucket and (
            bucket_bytes + size > limit
            or tensor.dtype != bucket[0].dtype
            or tensor.device != bucket[0].device
        ):
            flush()
        bucket.append(tensor)
        bucket_bytes += size
    flush()
    return calls


class DPStep:
    r"""Accumulates one optimizer step's clipped sum and turns it into private gradients.

    Args:
        params: the trainable parameters (the engine's), in a fixed order shared by all ranks.
        clipping, max_grad_norm, gamma: the clipping rule :math:`C_i` and :math:`R`
            (see :mod:`lightning_autodp.mechanism.clipping`).
        names: parameter names by ``id(param)``, used in error messages.
        bucket_mb: the largest flat buffer (megabytes) that a reduction over ranks packs.

    Example (one process, no Lightning)::

        step = DPStep(engine.params, "auto_s", max_grad_norm=1.0, gamma=0.01)
        with engine.capturing():
            loss_fn(model(x), y).backward()         # mean over the batch: scale = 1 / len(x)
        step.clip_and_accumulate(engine, scale=1 / len(x))
        step.privatize(sigma=1.0, q=q, noise=NoiseSource(seed), divisor=q * N, ledger=ledger)
        optimizer.step()
    """

    #: the strategy's name, in messages
    strategy_name = "dp_auto"
    #: under data parallelism one rank adds the noise to the whole sum before the all-reduce
    every_rank_draws_noise = False
    #: :attr:`summed` holds this rank's own sums until :meth:`privatize` reduces them
    sums_are_reduced = False

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        clipping: ClippingMode,
        max_grad_norm: float,
        gamma: float,
        names: dict[int, str] | None = None,
        bucket_mb: float = DEFAULT_BUCKET_MB,
    ) -> None:
        self.params = list(params)
        #: the largest flat buffer a reduction of the sums packs, in megabytes
        self.bucket_mb = bucket_mb
        #: parameter names by ``id``, for messages
        self.names = names or {}
        self.clipping = clipping
        self.max_grad_norm = max_grad_norm
        self.gamma = gamma
        self.summed: dict[nn.Parameter, Tensor] = {}
        self.examples = 0

    @torch.no_grad()
    def clip_and_accumulate(self, engine: PerSampleEngine, scale: float, check_finite: bool = True) -> None:
        r"""Add the captured micro-batch's :math:`\sum_i C_i g_i` to the step's sum, then reset the engine.

        With raw per-example gradients :math:`\hat g_i = s\, g_i` (``scale`` :math:`= s`: loss
        reduction, gradient accumulation, loss scaling), :math:`\|g_i\| = \|\hat g_i\| / s` and
        :math:`C_i g_i = (C_i / s)\,\hat g_i`. Raw ``p.grad`` left by autograd is dropped: it
        must never reach the optimizer.
        """
        batch_size = engine.batch_size
        if batch_size > 0:
            engine.accumulate_weighted_sum(self.clip_weights(engine, scale, check_finite), self.summed)
            self.examples += batch_size
        engine.reset()
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def add_virtual_examples(self, engine: PerSampleEngine) -> None:
        r"""Clip virtual examples (audit canaries) by the code that clips the data, and add them to the sum.

        ``engine`` gives their gradients directly (raw = true gradients, :math:`s = 1`), e.g. a
        :class:`~lightning_autodp.mechanism.observers.VirtualExamples`. They go through
        :meth:`clip_and_accumulate` like a micro-batch of data, so a fault in the clipping shows in
        them too; they are not counted among the step's examples.
        """
        examples = self.examples
        self.clip_and_accumulate(engine, scale=1.0)
        self.examples = examples

    def clip_weights(self, engine: PerSampleEngine, scale: float, check_finite: bool = True) -> Tensor:
        r"""The weights :math:`C_i / s` of the captured micro-batch's raw per-example gradients."""
        norms = engine.per_sample_squared_norms().sqrt() / scale
        if check_finite and not torch.isfinite(norms).all():
            raise FloatingPointError(
                "A per-example gradient norm is NaN or inf. dp_auto stops rather than take noise-only "
                "steps: lower the learning rate or check the data."
            )
        return clip_factors(norms, self.clipping, self.max_grad_norm, self.gamma) / scale

    @torch.no_grad()
    def privatize(
        self,
        *,
        sigma: float,
        q: float | None,
        noise: NoiseSource | None,
        ledger: PrivacyLedger,
        divisor: float | None,
        reduce: Callable[[Tensor], None] | None = None,
        bucket_mb: float = DEFAULT_BUCKET_MB,
        grad_scale: float = 1.0,
    ) -> tuple[float, float]:
        r"""Set ``p.grad`` to :math:`\big(\sum_{ranks} \sum_i C_i g_i + \sigma R z\big) / B` for every ``p``.

        1. ``noise`` given (rank 0 only under data parallelism): add :math:`\sigma R z` to the
           local sum; record ``(sigma, q)`` in ``ledger`` (every rank, whether it drew or not);
        2. ``reduce`` given: sum the sums and the example counts over ranks, in buckets;
        3. divide by :math:`B` = ``divisor`` (``qN`` under Poisson sampling) or, when None, by the
           number of examples in the step; under a GradScaler multiply back by ``grad_scale`` so that
           its ``unscale_`` and inf check act on ordinary-looking gradients.

        Returns ``(b, examples)``: the divisor applied (``B / grad_scale``) and the number of
        examples in the step over all ranks, for checks that rebuild the noise from ``p.grad``.
        """
        if not (isinstance(sigma, float) and math.isfinite(sigma) and sigma >= 0):
            raise RuntimeError(
                f"{self.strategy_name} needs a noise_multiplier >= 0 at every step, got {sigma!r}."
            )
        sums = [self.summed.pop(p, None) for p in self.params]
        sums = [s if s is not None else self.zero_sum(p) for s, p in zip(sums, self.params)]
        if noise is not None and sigma > 0:
            std = sigma * self.max_grad_norm
            for s in sums:
                s.add_(noise.gaussian(std, like=s).to(s.dtype))
        ledger.record(sigma, q)
        examples = self.reduce_step(sums, reduce, bucket_mb)
        b = divisor if divisor is not None else max(examples, 1.0)
        b /= grad_scale
        for p, s in zip(self.params, sums):
            p.grad = self.as_grad(s.div_(b), p)
        self.examples = 0
        return b, examples

    # The three places where a sharded step differs (``lightning_autodp.mechanism.sharded.ShardedDPStep``).

    def zero_sum(self, p: nn.Parameter) -> Tensor:
        """The clipped sum of a parameter no example reached: zeros, in the sums' precision."""
        return torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))

    def reduce_step(
        self, sums: list[Tensor], reduce: Callable[[Tensor], None] | None, bucket_mb: float
    ) -> float:
        """Sum the (noised) sums and the example counts over ranks with ``reduce``, in buckets of
        ``bucket_mb``; return the number of examples in the step over all ranks."""
        count = sums[0].new_tensor([float(self.examples)]) if sums else torch.zeros(1)
        if reduce is not None:
            all_reduce_in_buckets([*sums, count], reduce, bucket_mb)
        return float(count.item())

    def as_grad(self, total: Tensor, p: nn.Parameter) -> Tensor:
        """``p.grad`` from the step's private gradient ``total`` (already divided by B)."""
        return total.to(p.dtype)

    def clear(self) -> None:
        """Drop a partial sum (an interrupted step)."""
        self.summed.clear()
        self.examples = 0
