r"""The DP step over sharded parameters (FSDP2), without Lightning.

Under ``fully_shard`` every trainable parameter is a DTensor split along dim 0 over the ranks of
a 1-D device mesh; each rank owns one shard. The gradient handed to the optimizer is the same as
:class:`~lightning_autodp.mechanism.step.DPStep`'s,

.. math::

    \tilde g = \frac{1}{B}\Big(\sum_{r} \sum_{i \in S_r} C_i\, g_i + \sigma R\, z\Big),

computed shard by shard so that no rank ever holds a full-size gradient of the whole model:

* :meth:`ShardedDPStep.clip_and_accumulate`: the per-example norms (hence :math:`C_i`) come from
  each layer's input and output gradient, which a rank has in full for its own examples, so no
  per-example gradient is gathered. Then, parameter by parameter in the order of ``params`` (the
  same on every rank, because each step is a collective), the micro-batch's full-size
  :math:`\sum_i C_i g_i[p]` (zeros where this rank has none, e.g. an empty Poisson micro-batch) is
  reduce-scattered (summed over ranks) to the shard this rank owns and added to the step's local
  sum. With the one-backward engine only one parameter's full-size sum exists at a time.
* :meth:`ShardedDPStep.privatize`: every rank adds :math:`\sigma R z` to the shard it owns, from
  its own noise stream (the rank is part of the stream's domain). The shards are disjoint, so each
  coordinate receives noise exactly once (:math:`\sigma R`, not :math:`\sqrt{W}\sigma R`, never 0),
  and no rank draws noise for coordinates it does not own.

Meshes with a replicated dimension (HSDP) are refused: a coordinate owned by several replicas would
need the same noise on each of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Partial, Shard

from lightning_autodp.engines.base import PerSampleEngine
from lightning_autodp.mechanism import distributed
from lightning_autodp.mechanism.clipping import ClippingMode
from lightning_autodp.mechanism.step import DEFAULT_BUCKET_MB, DPStep


def local_part(tensor: Tensor) -> Tensor:
    """The shard this rank owns of a DTensor; any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def check_shardable(params: Sequence[nn.Parameter], names: dict[int, str]) -> None:
    """Every DTensor parameter must be sharded on every mesh dimension (no replicated copies)."""
    for p in params:
        if isinstance(p, DTensor) and not all(isinstance(pl, Shard) for pl in p.placements):
            raise ValueError(
                f"dp_fsdp: parameter {names.get(id(p), '?')!r} has placements {p.placements}; only "
                "parameters sharded on every mesh dimension (fully_shard on a 1-D mesh) are supported, "
                "because a replicated coordinate would need identical noise on every replica. Use a 1-D mesh "
                "(fully_shard(module, mesh=init_device_mesh(device, (world_size,))))."
            )


def reduce_scatter_to_shard(full: Tensor, param: Tensor) -> Tensor:
    """Sum ``full`` (shaped like ``param``'s global shape) over ranks; return this rank's shard of it.

    The shard has the layout of ``param`` (its DTensor placements), so it adds to ``param``'s own
    local shard elementwise. A plain tensor parameter (nothing sharded) gets ``full`` back.
    """
    if not isinstance(param, DTensor):
        return full
    mesh = param.device_mesh
    full = full.contiguous()
    partial = DTensor.from_local(
        full, mesh, [Partial("sum")] * mesh.ndim, run_check=False, shape=param.shape, stride=full.stride()
    )
    return partial.redistribute(mesh, param.placements).to_local()


def _dim0_sharded(param: Tensor) -> bool:
    return (
        isinstance(param, DTensor)
        and param.device_mesh.ndim == 1
        and tuple(param.placements) == (Shard(0),)
        and param.dim() > 0
    )


def reduce_scatter_bucket(params: Sequence[Tensor], fulls: Sequence[Tensor]) -> list[Tensor]:
    """:func:`reduce_scatter_to_shard` of several parameters with one collective where possible.

    Parameters sharded along dim 0 on the same 1-D mesh (FSDP2's layout: rank ``r`` owns rows
    ``[r c, min((r+1) c, n))`` with ``c = ceil(n / world)``, as ``torch.chunk``) are packed rank by
    rank into one buffer, padded to ``c`` rows each, and reduce-scattered at once; any other
    parameter goes through :func:`reduce_scatter_to_shard` alone.
    """
    out: list[Tensor | None] = [None] * len(params)
    packed = [i for i, p in enumerate(params) if _dim0_sharded(p)]
    for i, p in enumerate(params):
        if i not in packed:
            out[i] = reduce_scatter_to_shard(fulls[i], p)
    if packed:
        mesh = params[packed[0]].device_mesh  # type: ignore[union-attr]
        groups: dict[tuple[Any, torch.dtype], list[int]] = {}
        for i in packed:
            groups.setdefault((params[i].device_mesh, fulls[i].dtype), []).append(i)  # type: ignore[union-attr]
        for (mesh, _), idx in groups.items():
            world = mesh.size()
            rows = [-(-params[i].shape[0] // world) for i in idx]
            per_rank = []
            for i, c in zip(idx, rows):
                full = fulls[i].reshape(params[i].shape[0], -1)
                padded = full.new_zeros((c * world, full.shape[1]))
                padded[: full.shape[0]] = full
                per_rank.append(padded.view(world, -1))
            flat = torch.cat(per_rank, dim=1).reshape(-1)
            mine = flat.new_empty(flat.numel() // world)
            distributed.reduce_scatter_sum(mine, flat, group=mesh.get_group())
            offset = 0
            for i, c in zip(idx, rows):
                rest = params[i].shape[1:]
                size = c * math.prod(rest)
                local_rows = local_part(params[i]).shape[0]
                out[i] = mine[offset : offset + size].view(c, *rest)[:local_rows]
                offset += size
    return out  # type: ignore[return-value]


class _Bucket:
    def __init__(self) -> None:
        self.params: list[nn.Parameter] = []
        self.fulls: list[Tensor] = []
        self.bytes = 0


def _buckets(sums: Iterator[tuple[nn.Parameter, Tensor | None]], bucket_mb: float) -> Iterator[_Bucket]:
    """Group ``(p, full-size sum)`` in order into buckets of at most ``bucket_mb`` (zeros for None)."""
    limit = max(int(bucket_mb * 2**20), 1)
    bucket = _Bucket()
    for p, full in sums:
        if full is None:
            full = torch.zeros(p.shape, dtype=sum_dtype(p), device=local_part(p).device)
        full = full.to(sum_dtype(p))
        size = full.numel() * full.element_size()
        if bucket.params and bucket.bytes + size > limit:
            yield bucket
            bucket = _Bucket()
        bucket.params.append(p)
        bucket.fulls.append(full)
        bucket.bytes += size
    if bucket.params:
        yield bucket


def as_param_grad(local: Tensor, param: Tensor) -> Tensor:
    """``local`` (this rank's shard) as a gradient for ``param``: a DTensor with its layout."""
    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(
        local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


class ShardedDPStep(DPStep):
    r""":class:`~lightning_autodp.mechanism.step.DPStep` for parameters sharded with FSDP2.

    See the module docstring.

    :attr:`summed` holds, per parameter, this rank's shard of the clipped sum *already summed over
    ranks* (:attr:`sums_are_reduced`). :meth:`~lightning_autodp.mechanism.step.DPStep.privatize` is the same
    as the unsharded step's, with each rank's own ``noise`` stream adding :math:`\sigma R z` to the
    shard it owns (:attr:`every_rank_draws_noise`), only the example count summed over ranks
    (:meth:`reduce_step`) and ``p.grad`` a DTensor with the parameter's layout (:meth:`as_grad`).

    Example (inside a process group, ``model`` after ``fully_shard``)::

        step = ShardedDPStep(engine.params, "auto_s", max_grad_norm=1.0, gamma=0.01)
        with engine.capturing():
            loss_fn(model(x), y).backward()
        step.clip_and_accumulate(engine, scale=1 / len(x))       # a collective per parameter
        step.privatize(sigma=1.0, q=q, noise=NoiseSource(seed, rank), divisor=q * N, ledger=ledger,
                       reduce=distributed.all_reduce_sum)
        optimizer.step()
    """

    strategy_name = "dp_fsdp"
    #: every rank adds noise to the shard it owns (``DPStep``: one rank adds it to the whole sum)
    every_rank_draws_noise = True
    #: :attr:`summed` is already summed over ranks
    sums_are_reduced = True

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        clipping: ClippingMode,
        max_grad_norm: float,
        gamma: float,
        names: dict[int, str] | None = None,
        all_reduce: Callable[[Tensor], None] | None = None,
        bucket_mb: float = DEFAULT_BUCKET_MB,
    ) -> None:
        super().__init__(params, clipping, max_grad_norm, gamma, names, bucket_mb)
        #: the next captured micro-batch is a placeholder run only to join FSDP's collectives (this
        #: rank drew no example): it contributes nothing, exactly (set by the strategy)
        self.discard_next = False
        if all_reduce is None and distributed.is_distributed():
            all_reduce = distributed.all_reduce_sum
        #: sums a tensor over ranks in place (default: ``dist.all_reduce`` when there are several)
        self.all_reduce = all_reduce

    @torch.no_grad()
    def clip_and_accumulate(self, engine: PerSampleEngine, scale: float, check_finite: bool = True) -> None:
        r"""Add the micro-batch's :math:`\sum_r \sum_i C_i g_i`, shard by shard, to the step's local sums.

        Every rank calls this once per micro-batch, also for an empty one: each parameter's
        reduce-scatter is a collective that all ranks enter in the order of :attr:`params`.
        """
        self._refuse_gradients_from_autograd()
        batch_size = 0 if self.discard_next else engine.batch_size
        self.discard_next = False
        if batch_size > 0:
            weights = self.clip_weights(engine, scale, check_finite)
            self.examples += batch_size
            sums = engine.weighted_sums_in_order(weights, self.params)
        else:
            sums = iter([(p, None) for p in self.params])
        for bucket in _buckets(sums, self.bucket_mb):
            for p, shard in zip(bucket.params, reduce_scatter_bucket(bucket.params, bucket.fulls)):
                if p in self.summed:
                    self.summed[p].add_(shard)
                else:
                    self.summed[p] = shard.clone()
        engine.reset()
        for p in self.params:
            p.grad = None

    def _refuse_gradients_from_autograd(self) -> None:
        """The engines' layers give autograd no weight gradient, so FSDP reduce-scatters none: a
        non-zero ``p.grad`` here came from a use of ``p`` outside those layers (e.g. ``F.linear(x,
        layer.weight)``), which the per-example norms miss. (Zeros are what
        ``zero_grad(set_to_none=False)`` leaves.) All ranks decide together: a leaked gradient may
        be zero in one rank's shard only."""
        leaked = [
            self.names.get(id(p), "?")
            for p in self.params
            if p.grad is not None and bool(local_part(p.grad).any())
        ]
        flag = torch.tensor(
            [float(len(leaked))], device=local_part(self.params[0]).device if self.params else None
        )
        if self.all_reduce is not None:
            self.all_reduce(flag)
        if flag.item() > 0:
            raise RuntimeError(
                f"dp_fsdp: parameters {sorted(leaked) or '(on another rank)'} received gradient from "
                "outside the layers the engine captures (e.g. a functional call such as F.linear(x, "
                "layer.weight)), so their per-example norms would be incomplete. Route every use through "
                "the module that owns the parameter (call the layer), or give it a module of its own."
            )

    def zero_sum(self, p: nn.Parameter) -> Tensor:
        """Zeros the size of this rank's shard of ``p``."""
        return torch.zeros_like(local_part(p), dtype=sum_dtype(p))

    def reduce_step(
        self, sums: list[Tensor], reduce: Callable[[Tensor], None] | None, bucket_mb: float
    ) -> float:
        """The sums were reduce-scattered as they were accumulated, and each rank noised its own
        shard: only the example count is summed over ranks here."""
        del sums, bucket_mb
        device = local_part(self.params[0]).device if self.params else torch.device("cpu")
        count = torch.tensor([float(self.examples)], dtype=torch.float64, device=device)
        if reduce is not None:
            reduce(count)
        return float(count.item())

    def as_grad(self, total: Tensor, p: nn.Parameter) -> Tensor:
        """A DTensor with ``p``'s mesh and placements whose local part is ``total``."""
        return as_param_grad(total.to(p.dtype), p)


def sum_dtype(p: Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32)


__all__ = [
    "ShardedDPStep",
    "as_param_grad",
    "check_shardable",
    "local_part",
    "reduce_scatter_to_shard",
    "sum_dtype",
]
