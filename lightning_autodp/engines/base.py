"""The contract between :class:`~lightning_autodp.DPAutoStrategy` and a per-sample engine.

An engine attaches to the user's module *in place* (no wrapper, so ``state_dict`` keys stay
unchanged) and, for each micro-batch, turns what one backward pass saw into

* the per-example squared gradient norms ``||g_i||^2`` over every trainable parameter, and
* the weighted sum ``sum_i w_i g_i`` for weights ``w_i`` that the strategy chooses after seeing
  the norms (the clipping factors, rescaled for the loss reduction).

Engines know nothing about clipping, noise or loss reduction: ``g_i`` is the *raw* per-example
gradient of whatever scalar was backpropagated (a mean loss divided by ``accumulate_grad_batches``
and possibly multiplied by a GradScaler). The strategy owns the rescaling, so every engine is
exact under the same arithmetic and can be tested against the same per-example loop.

The life cycle of one micro-batch::

    engine.expect_batch_size(b)       # optional: the micro-batch size, taken from the batch
    with engine.capturing():          # forward + backward of the training step
        loss.backward()
    sq_norms = engine.per_sample_squared_norms()      # (b,)
    weights = clip_factors(...) / scale               # strategy
    engine.accumulate_weighted_sum(weights, summed)   # summed[p] += sum_i w_i g_i[p]
    engine.reset()                                     # free activations / per-sample state
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import Tensor, nn


class PerSampleEngine(ABC):
    """Per-example gradient norms and weighted gradient sums for one module.

    Args:
        module: the module to attach to, in place. Only parameters with ``requires_grad=True``
            at construction time are handled; frozen ones get no per-sample work and no noise.
    """

    #: short name used by ``DPAutoStrategy(engine=...)``
    name: str = "base"
    #: True for engines that backpropagate the loss a second time (the strategy then keeps the
    #: graph of the first backward and passes the loss with :meth:`set_backward_root`)
    needs_backward_root: bool = False

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.params: list[nn.Parameter] = [p for p in module.parameters() if p.requires_grad]
        self._capturing = False
        self._expected_batch_size: int | None = None

    @classmethod
    @abstractmethod
    def unsupported_modules(cls, module: nn.Module) -> list[tuple[str, nn.Module]]:
        """Submodules with trainable parameters of their own that this engine cannot handle.

        Returned as ``(qualified_name, submodule)`` pairs; an empty list means the engine can
        handle every trainable parameter of ``module``.
        """

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """Record activations and output gradients only inside this context (training steps)."""
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False

    def expect_batch_size(self, batch_size: int | None) -> None:
        """The number of examples of the micro-batch about to be captured, if the caller knows it.

        Engines that can use it (the one-backward engines expand ids shared by the batch, e.g.
        position ids of shape ``(1, T)``, to one row per example, and name any layer whose batch
        dimension differs) read it from :attr:`expected_batch_size`; :meth:`reset` forgets it.
        """
        self._expected_batch_size = batch_size

    @property
    def expected_batch_size(self) -> int | None:
        return self._expected_batch_size

    def set_backward_root(self, root: Tensor) -> None:  # noqa: B027 - optional hook
        """Receive the scalar that was backpropagated (only for ``needs_backward_root`` engines)."""

    def explain_error(self, err: BaseException) -> Exception | None:
        """An error naming the layer and the fix for ``err``, raised in a step this engine captured.

        For exceptions this engine's machinery causes in the user's own code (outside its hooks);
        ``None``: ``err`` is not the engine's doing and is re-raised as it is.
        """
        return None

    @property
    @abstractmethod
    def batch_size(self) -> int:
        """Number of examples (rows) in the micro-batch captured since the last :meth:`reset`."""

    @abstractmethod
    def per_sample_squared_norms(self) -> Tensor:
        """``||g_i||^2`` summed over all trainable parameters, shape ``(batch_size,)``.

        In at least float32 (float64 for a float64 model), whatever the autocast dtype.
        """

    @abstractmethod
    def accumulate_weighted_sum(self, weights: Tensor, summed: dict[nn.Parameter, Tensor]) -> None:
        """Add ``sum_i weights[i] * g_i[p]`` into ``summed[p]`` for each trainable parameter ``p``.

        ``summed`` holds tensors shaped like the parameters in at least float32; missing entries
        are created (see :func:`add_into`).
        """

    def weighted_sums_in_order(
        self, weights: Tensor, params: list[nn.Parameter]
    ) -> Iterator[tuple[nn.Parameter, Tensor | None]]:
        """``(p, sum_i weights[i] * g_i[p])`` for each ``p`` of ``params``, in that order (None: no gradient).

        For callers that must treat the parameters in an order shared by all ranks (a collective per
        parameter, as the sharded step's reduce-scatter). The default computes every sum first
        (:meth:`accumulate_weighted_sum`) and hands them out one by one; engines that can compute one
        parameter's sum at a time override it, so only one full-size sum exists at once.
        """
        summed: dict[nn.Parameter, Tensor] = {}
        self.accumulate_weighted_sum(weights, summed)
        for p in params:
            yield p, summed.pop(p, None)

    @abstractmethod
    def reset(self) -> None:
        """Drop everything captured for the current micro-batch."""

    @abstractmethod
    def remove(self) -> None:
        """Detach from the module (remove hooks, restore patched forwards)."""


def add_into(summed: dict[nn.Parameter, Tensor], param: nn.Parameter, value: Tensor) -> None:
    """``summed[param] += value`` in at least float32, creating the entry on first use."""
    value = value.to(torch.promote_types(value.dtype, torch.float32))
    if param in summed:
        summed[param].add_(value)
    else:
        summed[param] = value.clone()
