r"""A cap on the physical batch: ``DPAutoStrategy(max_physical_batch_size=...)``.

A Poisson batch has no upper bound: its size is Binomial(:math:`N`, :math:`q`), so a configuration
that fits in memory at the expected batch can run out of memory on a large draw. With a cap
:math:`P`, each micro-batch Lightning hands to ``training_step`` (one logical Poisson batch, or one
of its ``accumulate_grad_batches`` parts) is cut into physical batches of at most :math:`P`
examples, each run through forward, backward and the per-example clipping on its own, inside the
same optimizer step (the name is that of Opacus's ``BatchMemoryManager``).

Why the update does not change: the clipped sum is a sum over examples,

.. math::

    \sum_{i \in S} C_i\, g_i = \sum_{k} \sum_{i \in S_k} C_i\, g_i,
    \qquad S = S_1 \cup \dots \cup S_K \text{ (disjoint)},

and each :math:`C_i g_i` depends on example :math:`i` alone. Every physical batch goes through the
path of an ``accumulate_grad_batches`` micro-batch (:meth:`DPAutoStrategy.backward` and
:meth:`~lightning_autodp.mechanism.step.DPStep.clip_and_accumulate`, with the raw-gradient scale of
its own size), so only the order of floating-point additions differs. The noise, the divisor
:math:`B = qN` and the ledger entry belong to the optimizer step, which happens once: the privacy
accounting is the uncapped run's.

Memory: activations and per-example quantities are those of at most :math:`P` examples; the step
keeps one clipped sum the size of the trainable parameters, as without the cap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lightning_autodp.mechanism.batches import size_or_reason, slice_batch
from lightning_autodp.mechanism.sampling import EmptyBatch

if TYPE_CHECKING:
    from lightning_autodp.integration.strategy import DPAutoStrategy


def check_max_physical_batch_size(value: object) -> None:
    """Refuse anything but None or an integer >= 1, naming the fix."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"max_physical_batch_size must be an integer >= 1 (the most examples run through forward and "
            f"backward at once) or None (no cap), got {value!r}."
        )


def split_batch(batch: Any, cap: int) -> list[Any]:
    """``batch`` cut along dim 0 into consecutive pieces of at most ``cap`` examples (in order).

    Raises ``ValueError`` when the batch cannot be cut into examples (e.g. a list of strings beside
    the tensors): silently running it whole would break the memory bound the user asked for.
    """
    size, reason = size_or_reason(batch)
    if size is None:
        raise ValueError(
            f"DPAutoStrategy(max_physical_batch_size={cap}) cuts every batch into pieces along dim 0 of "
            f"its tensors, but this batch cannot be cut: {reason}. Make every per-example field a tensor "
            "with the batch dimension first, or remove max_physical_batch_size and lower the "
            "DataLoader's batch_size."
        )
    if size <= cap:
        return [batch]
    return [slice_batch(batch, start, min(start + cap, size)) for start in range(0, size, cap)]


def closure_loss(output: Any) -> Tensor:
    """The loss Lightning backpropagates from a ``training_step`` output (a tensor or ``{"loss": ...}``)."""
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, Tensor):
        raise ValueError(
            "Under DPAutoStrategy(max_physical_batch_size=...) training_step must return the loss (a tensor "
            f"or a dict with 'loss') for every physical batch, got {type(output).__name__}: skipping part "
            "of a logical batch is not supported. Return a loss, or remove max_physical_batch_size."
        )
    return loss


def run_leading_physical_batches(strategy: DPAutoStrategy, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Train on all physical batches of this micro-batch but the last; return the arguments of the last.

    Each leading piece goes through ``strategy.training_step`` (capture, engine verification on the
    first piece of a fit) and ``strategy.backward`` (clip, add to the step's sum), the loss divided by
    ``accumulate_grad_batches`` as Lightning's closure divides it. The last piece is left to
    Lightning's own closure, so its output is the step's output (logging, progress bar, callbacks).
    """
    cap = strategy.max_physical_batch_size
    batch = args[0] if args else kwargs.get("batch")
    if cap is None or isinstance(batch, EmptyBatch):
        return args, kwargs
    pieces = split_batch(batch, cap)
    if len(pieces) == 1:
        return args, kwargs
    if getattr(strategy, "is_sharded", False):
        raise ValueError(
            "max_physical_batch_size is not supported yet under dp_fsdp on more than one process: the ranks' "
            "Poisson batches differ in size, so they would run different numbers of sharded forward passes. "
            "Lower the DataLoader's batch_size (and raise accumulate_grad_batches) instead."
        )
    trainer = strategy.lightning_module.trainer
    for piece in pieces[:-1]:
        piece_args, piece_kwargs = _with_batch(args, kwargs, piece)
        loss = closure_loss(strategy.training_step(*piece_args, **piece_kwargs))
        strategy.backward(loss / trainer.accumulate_grad_batches, None)
    return _with_batch(args, kwargs, pieces[-1])


def _with_batch(args: tuple, kwargs: dict, batch: Any) -> tuple[tuple, dict]:
    if args:
        return (batch, *args[1:]), kwargs
    return args, {**kwargs, "batch": batch}
