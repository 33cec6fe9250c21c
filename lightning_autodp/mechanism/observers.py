r"""The one protocol through which checks, canaries and audits see (and join) a DP step.

A :class:`StepObserver` is registered explicitly with the strategy
(``DPAutoStrategy(observers=[...])`` or :meth:`~lightning_autodp.DPAutoStrategy.add_observer`) and
is called at fixed points of every optimizer step, in this order:

1. :meth:`StepObserver.contribute`: after the real examples' clipped sum of the step is complete,
   before the noise. An observer may add *virtual examples* here, through the step's own
   :meth:`~lightning_autodp.mechanism.step.DPStep.clip_and_accumulate` (see
   :class:`VirtualExamples`), so that they are clipped by exactly the code that clips the data;
2. :meth:`StepObserver.before_noise`: the clipped sums :math:`\sum_i C_i g_i` (real and virtual)
   as the noise will find them;
3. :meth:`StepObserver.on_batch_sampled`: the number of real examples in the step over all ranks;
4. :meth:`StepObserver.after_privatize`: ``p.grad`` holds :math:`(\sum_i C_i g_i + \sigma R z)/b`;
5. :meth:`StepObserver.after_step`: after ``optimizer.step()``.

Every hook receives a :class:`StepContext`: what the mechanism knows about the step (the
:class:`~lightning_autodp.mechanism.step.DPStep`, sigma, :math:`q`, :math:`N`, the Poisson sampler,
the step index, the rank and a sum over ranks). Nothing here imports Lightning: the strategy builds
the context and calls the hooks; tests can drive them with a bare ``DPStep``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_autodp.engines.base import PerSampleEngine

if TYPE_CHECKING:
    from lightning_autodp.mechanism.sampling import DistributedPoissonBatchSampler
    from lightning_autodp.mechanism.step import DPStep, PrivacyLedger


@dataclass
class StepContext:
    r"""What an observer may read about the optimizer step in progress.

    Attributes:
        dp_step: the step's :class:`~lightning_autodp.mechanism.step.DPStep` (its ``summed`` holds
            the clipped sums until the noise is added; its ``clip_and_accumulate`` is the clipping).
        params: the trainable parameters, in the order shared by all ranks.
        sigma: :math:`\sigma` of the step; ``max_grad_norm``: :math:`R`.
        sample_rate: :math:`q` as accounted (None when unknown); ``dataset_size``: :math:`N`.
        sampler: the Poisson batch sampler that draws the data (None without Poisson sampling).
        step: the index of this step in the privacy ledger (0 for the first step ever).
        fit_step: the index of this step within the current ``fit`` (0 for its first).
        rank, world_size: data-parallel rank and number of ranks.
        reduce: sums a tensor over ranks in place (None on one process).
        ledger: the privacy ledger (what the accountants read).
        grad_scaler: the GradScaler of mixed precision, or None.
        optimizers: the optimizers of the run.
        names: parameter names by parameter, for messages.
    """

    dp_step: DPStep
    params: list[nn.Parameter]
    sigma: float
    max_grad_norm: float
    sample_rate: float | None
    dataset_size: int | None
    sampler: DistributedPoissonBatchSampler | None
    step: int
    fit_step: int
    rank: int = 0
    world_size: int = 1
    reduce: Callable[[Tensor], None] | None = None
    ledger: PrivacyLedger | None = None
    grad_scaler: Any = None
    optimizers: Sequence[torch.optim.Optimizer] = ()
    names: dict[nn.Parameter, str] = field(default_factory=dict)

    def sum_over_ranks(self, values: Tensor) -> Tensor:
        """``values`` summed over ranks (in place; unchanged on one process)."""
        if self.reduce is not None and self.world_size > 1:
            self.reduce(values)
        return values


class StepObserver:
    """Base class of everything that watches or joins a DP step; every hook is a no-op by default.

    Subclass it and override the hooks you need. Raising from a hook stops training before the
    optimizer applies the step (for every hook up to :meth:`after_privatize`).

    Example::

        class CountExamples(StepObserver):
            def __init__(self):
                self.total = 0

            def on_batch_sampled(self, ctx, examples):
                self.total += examples

        strategy = DPAutoStrategy(observers=[CountExamples()])
    """

    #: False for observers that need full-size (unsharded) clipped sums, e.g. gradient canaries
    supports_sharded: bool = True

    def on_fit_start(self, ctx: StepContext) -> None:  # noqa: B027 - optional hook
        """Once per ``fit``, before its first step (``ctx.step`` is the first step's index)."""

    def contribute(self, ctx: StepContext) -> None:  # noqa: B027 - optional hook
        """Add virtual examples to ``ctx.dp_step``'s clipped sum (before the noise)."""

    def before_noise(self, ctx: StepContext) -> None:  # noqa: B027 - optional hook
        """See the clipped sums ``ctx.dp_step.summed`` before the noise is added."""

    def on_batch_sampled(self, ctx: StepContext, examples: int) -> None:  # noqa: B027 - optional hook
        """The number of real examples in this step's logical batch, over all ranks."""

    def after_privatize(self, ctx: StepContext, divisor: float, examples: float) -> None:  # noqa: B027
        """``p.grad`` holds the private gradient; ``divisor`` is the ``b`` it was divided by."""

    def after_step(self, ctx: StepContext, optimizer: torch.optim.Optimizer) -> None:  # noqa: B027
        """After ``optimizer.step()`` applied the private gradient."""


class VirtualExamples(PerSampleEngine):
    r"""Per-example gradients given directly, in the engine interface the DP step clips.

    Canaries and probes are *virtual examples*: gradients written by the auditor, not computed
    from data. Handing them to :meth:`~lightning_autodp.mechanism.step.DPStep.clip_and_accumulate`
    as an engine makes them go through the clipping code that the real examples go through, so a
    fault there shows in what the canaries and probes see.

    Each virtual example :math:`j` is a Dirac gradient :math:`g_j = v_j\, e_{c_j}`: value
    :math:`v_j` on one coordinate :math:`c_j` (parameter ``param_index[j]``, flat offset
    ``offset[j]``), zero elsewhere; :math:`\|g_j\| = |v_j|`.
    """

    name = "virtual"

    def __init__(self, params: Sequence[nn.Parameter]) -> None:  # noqa: D107 - no module to attach to
        self.module = None  # type: ignore[assignment]
        self.params = list(params)
        self._capturing = False
        self._expected_batch_size = None
        self._param_index = torch.zeros(0, dtype=torch.long)
        self._offset = torch.zeros(0, dtype=torch.long)
        self._values = torch.zeros(0, dtype=torch.float64)

    @classmethod
    def unsupported_modules(cls, module: nn.Module) -> list[tuple[str, nn.Module]]:
        return []

    def load(self, param_index: Tensor, offset: Tensor, values: Tensor) -> VirtualExamples:
        """The virtual micro-batch: ``values[j]`` on element ``offset[j]`` of ``params[param_index[j]]``."""
        self._param_index, self._offset, self._values = param_index, offset, values.to(torch.float64)
        return self

    @property
    def batch_size(self) -> int:
        return int(self._values.numel())

    def per_sample_squared_norms(self) -> Tensor:
        device = self.params[0].device if self.params else None
        return self._values.square().to(device=device, dtype=torch.float32)

    def accumulate_weighted_sum(self, weights: Tensor, summed: dict[nn.Parameter, Tensor]) -> None:
        contributions = weights.double().cpu() * self._values
        for i, p in enumerate(self.params):
            mask = self._param_index == i
            if not mask.any():
                continue
            target = summed.get(p)
            if target is None or not target.is_contiguous():
                base = torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
                target = summed[p] = base if target is None else target.contiguous()
            flat = target.view(-1)
            flat.index_add_(0, self._offset[mask].to(flat.device), contributions[mask].to(flat))

    def reset(self) -> None:
        self.load(self._param_index[:0], self._offset[:0], self._values[:0])

    def remove(self) -> None:
        """Nothing is attached."""
