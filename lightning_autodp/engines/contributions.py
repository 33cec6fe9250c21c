r"""The shared math of the one-backward engines: norms and weighted sums from ``L^T R`` factors.

Every trainable weight's per-example gradient in a micro-batch is a sum of contributions
:math:`G_i = \sum_k L^{k\top}_i R^k_i` (one per use of the weight), with ``L``: ``(B, T, rows)``
and ``R``: ``(B, T, cols)`` (for an embedding ``L`` is the one-hot matrix of the token ids, kept as
the ids). Then

.. math:: \|g_i\|^2 = \sum_{k, l} \langle L^k_i L^{l\top}_i,\ R^k_i R^{l\top}_i \rangle

(ghost norm, cost :math:`T^2 (rows + cols)`, cross terms included for shared weights) or, where
cheaper, the per-example gradient of one layer materialised at a time (cost :math:`T\,rows\,cols`,
memory :math:`B\,rows\,cols`, freed at once). Once the weights :math:`w_i` are known the weighted
sum is one contraction per use, :math:`\sum_i w_i G_i = (w \odot L)^\top R`.

Small parameters (biases, norm weights, class tokens) have their per-example gradients
``(B, *shape)`` computed in backward; :func:`vector_grads` sums their uses.

Nothing here depends on Lightning or on how the factors were captured: the functions take
tensors and return tensors, and are tested against a per-example loop in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

# ---------------------------------------------------------------------------------- records


@dataclass
class Contribution:
    """One use of a weight in the micro-batch: its gradient is ``L^T R`` summed over ``T``.

    ``left``: ``(B, T, rows)`` dense, or ``(B, T)`` integer ids of a one-hot ``L`` (embedding).
    ``right``: ``(B, T, cols)``. ``rows``: the block of rows of the parameter it touches (the
    q/k/v blocks of ``in_proj_weight``), ``None`` for all.
    """

    left: Tensor
    right: Tensor
    rows: tuple[int, int] | None = None

    @property
    def index(self) -> bool:
        return not self.left.is_floating_point()

    def materialise(self, n_rows: int) -> Tensor:
        """Per-example gradients ``(B, rows, cols)`` (a temporary, freed by the caller)."""
        if self.index:
            cols = self.right.shape[-1]
            right = up(self.right)
            out = right.new_zeros(right.shape[0], n_rows, cols)
            return out.scatter_add_(1, self.left.unsqueeze(-1).expand(-1, -1, cols), right)
        return torch.bmm(up(self.left).transpose(1, 2), up(self.right))


@dataclass
class ParamRecords:
    weights: list[Contribution] = field(default_factory=list)
    # small per-example gradients computed in backward: (rows, (B, *shape))
    vectors: list[tuple[tuple[int, int] | None, Tensor]] = field(default_factory=list)


def to_batch_first(t: Tensor, batch_dim: int) -> Tensor:
    return t if batch_dim == 0 else t.movedim(batch_dim, 0)


def as_btn(t: Tensor, batch_dim: int) -> Tensor:
    """``(..., n)`` with the batch at ``batch_dim`` -> ``(B, T, n)`` (``T`` = all other dims)."""
    t = to_batch_first(t, batch_dim)
    return t.reshape(t.shape[0], -1, t.shape[-1])


def norm_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def up(t: Tensor) -> Tensor:
    """Floating factors in at least float32: under bf16/fp16 autocast the recorded activations and
    output gradients are half precision, but norms, clipping weights and clipped sums are not
    (a bf16 sum over ``T`` loses the digits the clipping factor depends on)."""
    return t.to(norm_dtype(t)) if t.is_floating_point() else t


def _gram(f1: Tensor, f2: Tensor) -> Tensor:
    """``F1 F2^T`` per example, ``(B, T1, T2)``; integer factors are one-hot rows."""
    idx1, idx2 = not f1.is_floating_point(), not f2.is_floating_point()
    if not idx1 and not idx2:
        return torch.bmm(f1, f2.transpose(1, 2))
    if idx1 and idx2:
        return (f1.unsqueeze(2) == f2.unsqueeze(1)).to(torch.float32)
    if idx1:  # onehot(f1) @ f2^T: f2[b, t, f1[b, s]]
        return torch.gather(f2, 2, f1.unsqueeze(1).expand(-1, f2.shape[1], -1)).transpose(1, 2)
    return _gram(f2, f1).transpose(1, 2)


def _inner(c1: Contribution, c2: Contribution) -> Tensor:
    r"""``<L1^T R1, L2^T R2>`` per example = :math:`\sum_{s,t} (L_1 L_2^\top)_{st} (R_1 R_2^\top)_{st}`."""
    dtype = norm_dtype(c1.right)
    if c1.left.dim() == 3 and c2.left.dim() == 3 and c1.left.shape[1] == 1 and c2.left.shape[1] == 1:
        # T = 1 (an MLP): the Gram matrices are scalars.
        left = (up(c1.left) * up(c2.left)).sum((1, 2), dtype=dtype)
        return left * (up(c1.right) * up(c2.right)).sum((1, 2), dtype=dtype)
    gl = _gram(up(c1.left), up(c2.left)).to(dtype)
    gr = _gram(up(c1.right), up(c2.right)).to(dtype)
    return (gl * gr).sum((1, 2))


def _ghost_cost(c1: Contribution, c2: Contribution, n_rows: int, n_cols: int) -> int:
    t1, t2 = c1.right.shape[1], c2.right.shape[1]
    left = 1 if c1.index or c2.index else n_rows
    return t1 * t2 * (left + n_cols)


def squared_norms_of_weight(param: nn.Parameter, contributions: list[Contribution]) -> Tensor:
    """Per-example ``||g_i[param]||^2``: ghost norms or per-layer materialisation, by cost."""
    n_rows = param.shape[0]
    n_cols = math.prod(param.shape[1:])  # from the shape: no element of a sharded (DTensor) parameter is read
    row_blocks = {c.rows for c in contributions}
    blocks_overlap = len(row_blocks) > 1 and (
        None in row_blocks or _overlapping(sorted(r for r in row_blocks if r is not None))
    )
    if blocks_overlap:
        # Rare (one parameter used whole and in blocks): build the per-example gradient once.
        full = None
        for c in contributions:
            rows = c.rows or (0, n_rows)
            g = c.materialise(rows[1] - rows[0])
            if full is None:
                full = g.new_zeros(g.shape[0], n_rows, g.shape[-1], dtype=norm_dtype(g))
            full[:, rows[0] : rows[1]] += g
        assert full is not None
        return full.pow(2).sum((1, 2))
    total: Tensor | None = None
    for block in row_blocks:
        group = [c for c in contributions if c.rows == block]
        rows = (block[1] - block[0]) if block is not None else n_rows
        ghost = sum(_ghost_cost(c1, c2, rows, n_cols) for c1 in group for c2 in group)
        dense = all(not c.index for c in group)
        materialised = sum(c.right.shape[1] for c in group) * rows * n_cols
        if dense and materialised < ghost:
            g = group[0].materialise(rows)
            for c in group[1:]:
                g = g + c.materialise(rows)
            sq = g.to(norm_dtype(g)).pow(2).sum((1, 2))
        else:
            sq = None
            for k, c1 in enumerate(group):
                for c2 in group[k:]:
                    term = _inner(c1, c2) * (1.0 if c2 is c1 else 2.0)
                    sq = term if sq is None else sq + term
        total = sq if total is None else total + sq
    assert total is not None
    return total


def _overlapping(blocks: list[tuple[int, int]]) -> bool:
    return any(a[1] > b[0] for a, b in zip(blocks, blocks[1:]))


def _weighted_sum_of(c: Contribution, weights: Tensor, n_rows: int) -> Tensor:
    r""":math:`\sum_i w_i L_i^\top R_i = (w \odot L)^\top R` as one contraction, shape ``(rows, cols)``."""
    right = up(c.right)
    w = weights.to(device=right.device, dtype=right.dtype).view(-1, 1, 1)
    if c.index:
        out = right.new_zeros(n_rows, right.shape[-1])
        return out.index_add_(0, c.left.reshape(-1), (right * w).reshape(-1, right.shape[-1]))
    left = up(c.left)
    # Fold the weights into the smaller factor.
    if left.shape[-1] <= right.shape[-1]:
        left = left * w
    else:
        right = right * w
    return left.reshape(-1, left.shape[-1]).t().mm(right.reshape(-1, right.shape[-1]))


def weighted_sum_of_weight(param: nn.Parameter, contributions: list[Contribution], weights: Tensor) -> Tensor:
    r""":math:`\sum_i w_i g_i[param]` over all the uses of ``param``, shaped like ``param``."""
    acc = None
    for c in contributions:
        rows = c.rows or (0, param.shape[0])
        g = _weighted_sum_of(c, weights, rows[1] - rows[0])
        if c.rows is None and acc is None:
            acc = g.to(norm_dtype(g))
            continue
        if acc is None:
            acc = torch.zeros(param.shape[0], g.shape[-1], dtype=norm_dtype(g), device=g.device)
        acc[rows[0] : rows[1]] += g
    assert acc is not None
    return acc.view(param.shape)


def vector_grads(param: nn.Parameter, vectors: list[tuple[tuple[int, int] | None, Tensor]]) -> Tensor:
    """Sum of the small per-example gradients of ``param``, ``(B, *param.shape)``."""
    if all(rows is None for rows, _ in vectors):
        g = vectors[0][1]
        for _, v in vectors[1:]:
            g = g + v
        return g.to(norm_dtype(g)).reshape(g.shape[0], *param.shape)
    b = vectors[0][1].shape[0]
    full = vectors[0][1].new_zeros(b, *param.shape, dtype=norm_dtype(vectors[0][1]))
    for rows, v in vectors:
        if rows is None:
            full += v.view_as(full)
        else:
            full[:, rows[0] : rows[1]] += v
    return full
