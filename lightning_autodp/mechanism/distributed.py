"""The collectives the DP mechanism uses, and whether there is anyone to run them with.

One place for the questions every distributed path asks (is a process group up, how many ranks,
which one is this) and for the two reductions the mechanism runs: the all-reduce of the clipped,
noised sums (:func:`all_reduce_sum`) and the reduce-scatter of the sharded step
(:func:`reduce_scatter_sum`). Framework-free: only ``torch.distributed``.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def initialized() -> bool:
    """True when torch.distributed is built in and a default process group exists (any size)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the default group; 1 without one."""
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    """This process's rank in the default group; 0 without one."""
    return dist.get_rank() if initialized() else 0


def is_distributed() -> bool:
    """True when a process group of more than one process exists: collectives reach other ranks."""
    return world_size() > 1


def all_reduce_sum(tensor: Tensor, group: dist.ProcessGroup | None = None) -> None:
    """Sum ``tensor`` over the ranks of ``group`` (default: all), in place, on every rank."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def reduce_scatter_sum(output: Tensor, input: Tensor, group: dist.ProcessGroup | None = None) -> None:
    r"""Sum ``input`` over the ranks and keep this rank's slice: ``output = (\sum_r input_r)[k c:(k+1) c]``.

    ``input`` has ``world_size`` times ``output``'s elements, rank ``k`` receives chunk ``k`` of
    the sum (``c = output.numel()``). torch 2.13 renamed ``reduce_scatter_tensor`` (now a
    deprecated alias that warns on every call) to ``reduce_scatter_single``, with the same
    semantics; older torch versions have only the former.
    """
    collective = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    collective(output, input, op=dist.ReduceOp.SUM, group=group)


__all__ = ["all_reduce_sum", "initialized", "is_distributed", "rank", "reduce_scatter_sum", "world_size"]
