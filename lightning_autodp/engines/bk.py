r"""Book-keeping engine: per-example norms and the clipped sum from one backward pass.

Opacus's hooks materialise one gradient per example (``b`` times the parameter memory). Automatic
clipping only needs the per-example norms :math:`\|g_i\|` and the weighted sum
:math:`\sum_i w_i g_i`, and both follow from what a single backward pass already sees: each
layer's input ``a`` and output gradient ``b`` (Li et al. 2022 "ghost norm"; Bu et al. 2023
"book-keeping").

For a linear layer :math:`y = a W^\top` over a sequence (``a_i``: ``(T, d)``, ``b_i``: ``(T, p)``)
the per-example weight gradient is :math:`G_i = b_i^\top a_i`. Its squared norm is either

* ghost: :math:`\|G_i\|^2 = \langle a_i a_i^\top, b_i b_i^\top \rangle` (cost :math:`T^2 (d + p)`), or
* materialised one layer at a time: :math:`\|b_i^\top a_i\|^2` (cost :math:`T d p`, memory
  :math:`B d p`, freed at once),

whichever is cheaper for that layer. Once the clipping weights :math:`w_i` are known, the
weighted sum is one contraction per layer, :math:`\sum_i w_i G_i = (w \odot b)^\top a`, from the
stored ``a`` and ``b``: no second backward pass and no per-example gradient kept.

Speed: the handled layers run through custom :class:`torch.autograd.Function` s whose backward
returns only the input gradient; autograd never computes the (non-private, immediately
discarded) ``p.grad`` of a handled parameter, so the contraction it would have cost is spent on
the weighted sum instead. Handled parameters keep ``p.grad = None`` after backward.

Every contribution is written as :math:`G = L^\top R` with ``L``: ``(B, T, rows)`` and ``R``:
``(B, T, cols)``, so that one routine covers all layers, including a parameter used by several
layers (tied weights, a module called twice): its per-example gradient is the sum of the
contributions and

.. math:: \|g_i\|^2 = \sum_{k, l} \langle L^k_i L^{l\top}_i,\ R^k_i R^{l\top}_i \rangle

includes the cross terms. For an embedding ``L`` is the one-hot matrix of token ids, kept as the
ids themselves. Norm layers and biases have small per-example gradients (``(B, C)``); those are
computed during backward.

Memory: book-keeping holds every handled layer's ``a`` and ``b`` until backward ends (about twice
the activation memory). :class:`GhostClippingEngine` (``engine="ghost"``) is the same arithmetic
in two backward passes, norms in the first and the weighted sums in the second, each layer's
factors dropped as soon as they are used: peak memory close to non-private training, for a
second backward pass.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_autodp.engines.base import PerSampleEngine, add_into

# The builtins themselves: the MHA capture swaps ``torch.nn.functional.linear`` while it runs.
_linear = torch._C._nn.linear
_RMSNorm = getattr(nn, "RMSNorm", None)
_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm) + ((_RMSNorm,) if _RMSNorm else ())
_TRANSFORMER_CONTAINERS = (
    nn.Transformer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


# ---------------------------------------------------------------------------------- records


@dataclass
class _Contribution:
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
            right = _up(self.right)
            out = right.new_zeros(right.shape[0], n_rows, cols)
            return out.scatter_add_(1, self.left.unsqueeze(-1).expand(-1, -1, cols), right)
        return torch.bmm(_up(self.left).transpose(1, 2), _up(self.right))


@dataclass
class _ParamRecords:
    weights: list[_Contribution] = field(default_factory=list)
    # small per-example gradients computed in backward: (rows, (B, *shape))
    vectors: list[tuple[tuple[int, int] | None, Tensor]] = field(default_factory=list)


def _to_batch_first(t: Tensor, batch_dim: int) -> Tensor:
    return t if batch_dim == 0 else t.movedim(batch_dim, 0)


def _as_btn(t: Tensor, batch_dim: int) -> Tensor:
    """``(..., n)`` with the batch at ``batch_dim`` -> ``(B, T, n)`` (``T`` = all other dims)."""
    t = _to_batch_first(t, batch_dim)
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _norm_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _up(t: Tensor) -> Tensor:
    """Floating factors in at least float32: under bf16/fp16 autocast the recorded activations and
    output gradients are half precision, but norms, clipping weights and clipped sums are not
    (a bf16 sum over ``T`` loses the digits the clipping factor depends on)."""
    return t.to(_norm_dtype(t)) if t.is_floating_point() else t


def _autocast(*ts: Tensor | None) -> list[Tensor | None]:
    """Cast a captured layer's floating inputs as autocast would cast the layer (linear, conv).

    A custom ``autograd.Function`` sees autocast enabled in ``forward`` but not in ``backward``;
    casting here and saving the cast tensors makes backward see one dtype (and saves the same
    half-precision activation autocast would have saved).
    """
    x = ts[0]
    assert x is not None
    dev = x.device.type
    if not (x.is_floating_point() and torch.is_autocast_enabled(dev)):
        return list(ts)
    dtype = torch.get_autocast_dtype(dev)
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in ts]


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


def _inner(c1: _Contribution, c2: _Contribution) -> Tensor:
    r"""``<L1^T R1, L2^T R2>`` per example = :math:`\sum_{s,t} (L_1 L_2^\top)_{st} (R_1 R_2^\top)_{st}`."""
    dtype = _norm_dtype(c1.right)
    if c1.left.dim() == 3 and c2.left.dim() == 3 and c1.left.shape[1] == 1 and c2.left.shape[1] == 1:
        # T = 1 (an MLP): the Gram matrices are scalars.
        left = (_up(c1.left) * _up(c2.left)).sum((1, 2), dtype=dtype)
        return left * (_up(c1.right) * _up(c2.right)).sum((1, 2), dtype=dtype)
    gl = _gram(_up(c1.left), _up(c2.left)).to(dtype)
    gr = _gram(_up(c1.right), _up(c2.right)).to(dtype)
    return (gl * gr).sum((1, 2))


def _ghost_cost(c1: _Contribution, c2: _Contribution, n_rows: int, n_cols: int) -> int:
    t1, t2 = c1.right.shape[1], c2.right.shape[1]
    left = 1 if c1.index or c2.index else n_rows
    return t1 * t2 * (left + n_cols)


def _squared_norms_of_weight(param: nn.Parameter, contributions: list[_Contribution]) -> Tensor:
    """Per-example ``||g_i[param]||^2``: ghost norms or per-layer materialisation, by cost."""
    n_rows = param.shape[0]
    n_cols = param[0].numel() if param.dim() > 1 else 1
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
                full = g.new_zeros(g.shape[0], n_rows, g.shape[-1], dtype=_norm_dtype(g))
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
            sq = g.to(_norm_dtype(g)).pow(2).sum((1, 2))
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


def _weighted_sum_of(c: _Contribution, weights: Tensor, n_rows: int) -> Tensor:
    r""":math:`\sum_i w_i L_i^\top R_i = (w \odot L)^\top R` as one contraction, shape ``(rows, cols)``."""
    right = _up(c.right)
    w = weights.to(device=right.device, dtype=right.dtype).view(-1, 1, 1)
    if c.index:
        out = right.new_zeros(n_rows, right.shape[-1])
        return out.index_add_(0, c.left.reshape(-1), (right * w).reshape(-1, right.shape[-1]))
    left = _up(c.left)
    # Fold the weights into the smaller factor.
    if left.shape[-1] <= right.shape[-1]:
        left = left * w
    else:
        right = right * w
    return left.reshape(-1, left.shape[-1]).t().mm(right.reshape(-1, right.shape[-1]))


def _weighted_sum_of_weight(
    param: nn.Parameter, contributions: list[_Contribution], weights: Tensor
) -> Tensor:
    r""":math:`\sum_i w_i g_i[param]` over all the uses of ``param``, shaped like ``param``."""
    acc = None
    for c in contributions:
        rows = c.rows or (0, param.shape[0])
        g = _weighted_sum_of(c, weights, rows[1] - rows[0])
        if c.rows is None and acc is None:
            acc = g.to(_norm_dtype(g))
            continue
        if acc is None:
            acc = torch.zeros(param.shape[0], g.shape[-1], dtype=_norm_dtype(g), device=g.device)
        acc[rows[0] : rows[1]] += g
    assert acc is not None
    return acc.view(param.shape)


# ------------------------------------------------------------------- autograd functions


@dataclass
class _Handle:
    """What a captured layer call records into: the engine and the (trainable) parameters."""

    engine: BookKeepingEngine
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    batch_dim: int = 0
    weight_rows: tuple[int, int] | None = None
    bias_rows: tuple[int, int] | None = None


class _LinearFn(torch.autograd.Function):
    """``y = x W^T + b`` whose backward gives only ``dL/dx`` and records ``(b, x)`` per example."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, handle: _Handle) -> Tensor:
        x, weight, bias = _autocast(x, weight, bias)  # type: ignore[assignment]
        ctx.save_for_backward(x, weight)
        ctx.handle = handle
        handle.engine._count_use(handle.weight)
        return _linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:
        x, weight = ctx.saved_tensors
        handle: _Handle = ctx.handle
        grad_out = grad_out.to(weight.dtype)
        grad_x = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None
        bd = handle.batch_dim
        if handle.weight is not None:
            # x is the tensor autograd saved anyway: no second copy of the activation.
            contribution = _Contribution(_as_btn(grad_out, bd), _as_btn(x, bd), handle.weight_rows)
            handle.engine._record_weight(handle.weight, contribution)
        if handle.bias is not None:
            grad_b = _as_btn(grad_out, bd).sum(1, dtype=_norm_dtype(grad_out))
            handle.engine._record_vector(handle.bias, handle.bias_rows, grad_b)
        return grad_x, None, None, None


class _EmbeddingFn(torch.autograd.Function):
    """Embedding lookup whose backward records ``(ids, dL/dy)``; ``W`` gets no ``.grad``."""

    @staticmethod
    def forward(ctx: Any, ids: Tensor, weight: Tensor, padding_idx: int | None, handle: _Handle) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.handle = padding_idx, handle
        handle.engine._count_use(handle.weight)
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[None, None, None, None]:
        (ids,) = ctx.saved_tensors
        handle: _Handle = ctx.handle
        bd = handle.batch_dim
        ids_b = _to_batch_first(ids, bd)
        ids_b = ids_b.reshape(ids_b.shape[0], -1)
        grad_b = _as_btn(grad_out, bd)
        if ctx.padding_idx is not None:
            # The padding row never receives gradient.
            grad_b = grad_b.masked_fill((ids_b == ctx.padding_idx).unsqueeze(-1), 0.0)
        handle.engine._record_weight(handle.weight, _Contribution(ids_b, grad_b))  # type: ignore[arg-type]
        return None, None, None, None


class _ConvFn(torch.autograd.Function):
    """Convolution (``groups=1``) whose backward gives ``dL/dx`` and records the unfolded input."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, conv: tuple, handle: _Handle
    ) -> Tensor:
        stride, padding, dilation = conv
        x, weight, bias = _autocast(x, weight, bias)  # type: ignore[assignment]
        ctx.save_for_backward(x, weight)
        ctx.conv, ctx.handle = conv, handle
        handle.engine._count_use(handle.weight)
        fn = F.conv1d if x.dim() == 3 else F.conv2d
        return fn(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        x, weight = ctx.saved_tensors
        handle: _Handle = ctx.handle
        stride, padding, dilation = ctx.conv
        grad_out = grad_out.to(weight.dtype)
        n = x.dim() - 2
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, stride, padding, dilation, False, [0] * n, 1, [True, False, False]
            )[0]
        b = x.shape[0]
        left = grad_out.reshape(b, grad_out.shape[1], -1).transpose(1, 2)  # (B, L, Cout)
        if handle.weight is not None:
            if n == 1:
                k = weight.shape[-1]
                cols = F.unfold(
                    x.unsqueeze(2),
                    (1, k),
                    dilation=(1, dilation[0]),
                    padding=(0, padding[0]),
                    stride=(1, stride[0]),
                )
            else:
                cols = F.unfold(x, weight.shape[-2:], dilation=dilation, padding=padding, stride=stride)
            handle.engine._record_weight(handle.weight, _Contribution(left, cols.transpose(1, 2)))
        if handle.bias is not None:
            handle.engine._record_vector(handle.bias, None, left.sum(1, dtype=_norm_dtype(left)))
        return grad_x, None, None, None, None


class _AffineFn(torch.autograd.Function):
    """``y = xhat * w + b`` (norm layers' elementwise affine), recording per-example ``dw``, ``db``.

    ``channel_dims``: the dims of ``xhat`` (batch first) that ``w`` spans; the per-example
    gradient sums ``dL/dy * xhat`` over all the others.
    """

    @staticmethod
    def forward(
        ctx: Any, xhat: Tensor, weight: Tensor | None, bias: Tensor | None, view: tuple, handle: _Handle
    ) -> Tensor:
        ctx.save_for_backward(xhat, weight)
        ctx.view, ctx.handle = view, handle
        y = xhat if weight is None else xhat * weight.view(view)
        return y if bias is None else y + bias.view(view)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        xhat, weight = ctx.saved_tensors
        handle: _Handle = ctx.handle
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out if weight is None else grad_out * weight.view(ctx.view)
        # Summing over every broadcast dim but the batch leaves the batch first: (B, *w.shape).
        reduce_dims = [d for d, size in enumerate(ctx.view) if size == 1 and d != handle.batch_dim]

        def per_example(t: Tensor) -> Tensor:
            t = _up(t)
            return t.sum(reduce_dims) if reduce_dims else t  # sum([]) would sum everything

        if handle.weight is not None:
            handle.engine._record_vector(handle.weight, None, per_example(_up(grad_out) * _up(xhat)))
        if handle.bias is not None:
            handle.engine._record_vector(handle.bias, None, per_example(grad_out))
        return grad_x, None, None, None, None


# --------------------------------------------------------------------- captured forwards


def _trainable(p: nn.Parameter | None, params: set[int]) -> nn.Parameter | None:
    return p if p is not None and id(p) in params else None


def _linear_forward(engine: BookKeepingEngine, module: nn.Linear, handle: _Handle) -> Callable:
    def forward(x: Tensor) -> Tensor:
        return _LinearFn.apply(x, module.weight, module.bias, handle)

    return forward


def _embedding_forward(engine: BookKeepingEngine, module: nn.Embedding, handle: _Handle) -> Callable:
    def forward(ids: Tensor) -> Tensor:
        return _EmbeddingFn.apply(ids, module.weight, module.padding_idx, handle)

    return forward


def _conv_forward(engine: BookKeepingEngine, module: nn.Conv1d | nn.Conv2d, handle: _Handle) -> Callable:
    n = 1 if isinstance(module, nn.Conv1d) else 2

    def forward(x: Tensor) -> Tensor:
        padding = module.padding
        if isinstance(padding, str):
            # 'same'/'valid': pad explicitly (possibly asymmetrically) so unfold sees plain zeros.
            if padding == "same":
                pads: list[int] = []
                for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
                    total = d * (k - 1)
                    pads += [total // 2, total - total // 2]
                x = F.pad(x, pads)
            padding = (0,) * n
        conv = (tuple(module.stride), tuple(padding), tuple(module.dilation))
        return _ConvFn.apply(x, module.weight, module.bias, conv, handle)

    return forward


def _norm_forward(engine: BookKeepingEngine, module: nn.Module, handle: _Handle) -> Callable:
    def forward(x: Tensor) -> Tensor:
        bias = getattr(module, "bias", None)
        if isinstance(module, nn.GroupNorm):
            xhat = F.group_norm(x, module.num_groups, None, None, module.eps)
            view = (1, module.num_channels) + (1,) * (x.dim() - 2)
        else:
            shape = tuple(module.normalized_shape)
            if isinstance(module, nn.LayerNorm):
                xhat = F.layer_norm(x, shape, None, None, module.eps)
            else:
                xhat = F.rms_norm(x, shape, None, module.eps)
            view = (1,) * (x.dim() - len(shape)) + shape
        return _AffineFn.apply(xhat, module.weight, bias, view, handle)

    return forward


class _MHACapture:
    """Routes ``nn.MultiheadAttention``'s projections through :class:`_LinearFn`.

    ``nn.MultiheadAttention.forward`` calls ``F.multi_head_attention_forward`` with
    ``in_proj_weight`` (or blocks of it, for cross-attention) and ``out_proj.weight`` directly.
    While it runs, ``torch.nn.functional.linear`` (the name that function looks up) is swapped
    for one that recognises those parameters, so masks, dropout, ``need_weights`` and
    ``batch_first`` keep torch's own semantics. Inside, tensors are ``(T, B, E)``.
    """

    def __init__(self, engine: BookKeepingEngine, module: nn.MultiheadAttention, trainable: set[int]) -> None:
        self.engine, self.module, self.trainable = engine, module, trainable
        self.calls = 0

    def _owner(self, t: Tensor | None) -> tuple[nn.Parameter | None, tuple[int, int] | None, bool]:
        """(trainable parameter, row block, is one of ours) for a weight or bias argument."""
        if t is None:
            return None, None, True
        m = self.module
        candidates = [m.in_proj_weight, m.in_proj_bias, m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
        candidates += [m.out_proj.weight, m.out_proj.bias]
        for p in candidates:
            if p is None:
                continue
            if t is p:
                return _trainable(p, self.trainable), None, True
            if t._base is p:
                start = (t.storage_offset() - p.storage_offset()) // p.stride(0)
                return _trainable(p, self.trainable), (start, start + t.shape[0]), True
        return None, None, False

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """Stands in for ``F.linear`` inside ``F.multi_head_attention_forward``."""
        w, w_rows, ours_w = self._owner(weight)
        b, b_rows, ours_b = self._owner(bias)
        if not (ours_w and ours_b):
            raise RuntimeError(
                "engine='bk' found an unexpected linear call inside nn.MultiheadAttention; this torch "
                "version computes attention differently. Use engine='hooks'."
            )
        self.calls += 1
        handle = _Handle(self.engine, w, b, batch_dim=1, weight_rows=w_rows, bias_rows=b_rows)
        if x.dim() == 2:
            # The output projection's input is (T*B, E) with rows ordered t*B + b.
            out = _LinearFn.apply(x.view(-1, self._bsz, x.shape[-1]), weight, bias, handle)
            return out.flatten(0, 1)
        return _LinearFn.apply(x, weight, bias, handle)

    def forward(self, original: Callable) -> Callable:
        def forward(query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
            if query.dim() == 3:
                self._bsz = query.shape[0 if self.module.batch_first else 1]
            else:
                self._bsz = 1
            self.calls = 0
            saved = F.linear
            F.linear = self.linear  # type: ignore[assignment]
            try:
                out = original(query, key, value, *args, **kwargs)
            finally:
                F.linear = saved  # type: ignore[assignment]
            if self.calls < 2:
                raise RuntimeError(
                    "engine='bk' could not capture nn.MultiheadAttention's projections with this torch "
                    "version. Use engine='hooks'."
                )
            return out

        return forward


# ---------------------------------------------------------------------------------- engine


class BookKeepingEngine(PerSampleEngine):
    """Per-example norms and clipped sums from a single backward pass, no per-example gradients.

    Handles ``nn.Linear`` (any number of leading dims), ``nn.Embedding``, ``nn.Conv1d``,
    ``nn.Conv2d`` (``groups=1``), ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm`` and
    ``nn.MultiheadAttention`` (without ``add_bias_kv``), and parameters shared by several of them.
    Dim 0 is the batch, except inside ``nn.Transformer*`` modules with ``batch_first=False``.
    Anything else with trainable parameters is reported by :meth:`unsupported_modules`.

    Example::

        engine = BookKeepingEngine(model)
        with engine.capturing():
            F.cross_entropy(model(x), y, reduction="sum").backward()
        norms = engine.per_sample_squared_norms().sqrt()          # ||g_i||
        summed = {}
        engine.accumulate_weighted_sum(1.0 / (norms + 0.01), summed)  # sum_i C_i g_i
        engine.reset()
    """

    name = "bk"

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        unsupported = self.unsupported_modules(module)
        if unsupported:
            names = ", ".join(f"{n} ({type(m).__name__})" for n, m in unsupported)
            raise ValueError(
                f"engine='bk' does not support these trainable layers: {names}. "
                "Use engine='hooks' (Opacus per-sample gradients) or engine='auto'."
            )
        self._records: dict[nn.Parameter, _ParamRecords] = {}
        self._patched: list[tuple[nn.Module, Any]] = []
        self._leaked: set[str] = set()
        self._hooks: list[Any] = []
        self._batch_size: int | None = None
        self._had_grad: set[int] = set()
        trainable = {id(p) for p in self.params}
        names = {id(p): n for n, p in module.named_parameters()}
        seq_first = _seq_first_modules(module)
        out_projs = _mha_out_projs(module)
        for mod in module.modules():
            own = [p for p in mod.parameters(recurse=False) if id(p) in trainable]
            if isinstance(mod, nn.MultiheadAttention):
                own += [p for p in mod.out_proj.parameters() if id(p) in trainable]
            if not own or id(mod) in out_projs:
                continue
            batch_dim = 1 if id(mod) in seq_first else 0
            if isinstance(mod, nn.MultiheadAttention):
                forward = _MHACapture(self, mod, trainable).forward(mod.forward)
            else:
                handle = _Handle(
                    self,
                    _trainable(mod.weight, trainable),
                    _trainable(getattr(mod, "bias", None), trainable),
                    batch_dim,
                )
                if isinstance(mod, nn.Linear):
                    forward = _linear_forward(self, mod, handle)
                elif isinstance(mod, nn.Embedding):
                    forward = _embedding_forward(self, mod, handle)
                elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
                    forward = _conv_forward(self, mod, handle)
                else:
                    forward = _norm_forward(self, mod, handle)
            self._patch(mod, forward)
        for p in self.params:
            self._hooks.append(p.register_post_accumulate_grad_hook(self._leak_hook(names.get(id(p), "?"))))

    # ---------------------------------------------------------------- attach / detach

    def _patch(self, mod: nn.Module, captured: Callable) -> None:
        had_own = "forward" in mod.__dict__
        previous = mod.__dict__.get("forward")
        original = mod.forward
        engine = self

        def forward(self_: nn.Module, *args: Any, **kwargs: Any) -> Any:
            # Only training steps are captured; eval, validation and no_grad run the original.
            if engine._capturing and torch.is_grad_enabled():
                return captured(*args, **kwargs)
            return original(*args, **kwargs)

        mod.forward = types.MethodType(forward, mod)  # type: ignore[method-assign]
        self._patched.append((mod, previous if had_own else None))

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        self._had_grad = {id(p) for p in self.params if p.grad is not None}
        with super().capturing():
            yield

    def _leak_hook(self, name: str) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            # The hook also runs when the captured layers gave no gradient (p.grad stays None);
            # a gradient that was already there before the capture started is not ours to judge.
            if self._capturing and p.grad is not None and id(p) not in self._had_grad:
                self._leaked.add(name)

        return hook

    @classmethod
    def unsupported_modules(cls, module: nn.Module) -> list[tuple[str, nn.Module]]:
        out = []
        out_projs = _mha_out_projs(module)
        for name, mod in module.named_modules():
            if not any(p.requires_grad for p in mod.parameters(recurse=False)) or id(mod) in out_projs:
                continue
            if not _supported(mod):
                out.append((name or type(module).__name__, mod))
        return out

    def remove(self) -> None:
        self.reset()
        for mod, previous in reversed(self._patched):
            if previous is None:
                del mod.forward
            else:
                mod.forward = previous
        self._patched.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # ---------------------------------------------------------------- recording (backward)

    def _check_batch(self, b: int) -> None:
        if self._batch_size is None:
            self._batch_size = b
        elif self._batch_size != b:
            raise RuntimeError(
                f"engine='bk' saw batch sizes {self._batch_size} and {b} in one micro-batch. It takes "
                "dim 0 as the batch dimension (batch_first); use batch_first=True layers or engine='hooks'."
            )

    def _count_use(self, param: nn.Parameter | None) -> None:
        """A captured layer used ``param`` in forward (only :class:`GhostClippingEngine` counts)."""

    def _record_weight(self, param: nn.Parameter, contribution: _Contribution) -> None:
        if not self._capturing:
            return
        self._check_batch(contribution.right.shape[0])
        self._records.setdefault(param, _ParamRecords()).weights.append(contribution)

    def _record_vector(self, param: nn.Parameter, rows: tuple[int, int] | None, grads: Tensor) -> None:
        if not self._capturing:
            return
        self._check_batch(grads.shape[0])
        self._records.setdefault(param, _ParamRecords()).vectors.append((rows, grads))

    # ---------------------------------------------------------------- contract

    @property
    def batch_size(self) -> int:
        return self._batch_size or 0

    def per_sample_squared_norms(self) -> Tensor:
        if self._leaked:
            raise RuntimeError(
                f"engine='bk': parameters {sorted(self._leaked)} also received gradient from outside the "
                "layers this engine handles (e.g. a functional call such as F.linear(x, layer.weight)), "
                "so their per-example norms would be incomplete. Route every use through the module, or "
                "use engine='hooks'."
            )
        total: Tensor | None = None
        for param, rec in self._records.items():
            parts = []
            if rec.weights:
                parts.append(_squared_norms_of_weight(param, rec.weights))
            if rec.vectors:
                parts.append(_vector_grads(param, rec.vectors).flatten(1).pow(2).sum(1))
            for sq in parts:
                total = sq if total is None else total + sq.to(total.dtype)
        if total is None:
            return torch.zeros(self.batch_size)
        return total

    def accumulate_weighted_sum(self, weights: Tensor, summed: dict[nn.Parameter, Tensor]) -> None:
        for param, rec in self._records.items():
            acc = _weighted_sum_of_weight(param, rec.weights, weights) if rec.weights else None
            if rec.vectors:
                grads = _vector_grads(param, rec.vectors)
                w = weights.to(device=grads.device, dtype=grads.dtype)
                vec = torch.tensordot(w, grads, dims=1)
                acc = vec if acc is None else acc + vec.view(acc.shape)
            if acc is not None:
                add_into(summed, param, acc.view(param.shape))

    def reset(self) -> None:
        self._records.clear()
        self._leaked.clear()
        self._batch_size = None


class GhostClippingEngine(BookKeepingEngine):
    r"""Per-example norms and clipped sums from two backward passes, memory close to non-private.

    Book-keeping (:class:`BookKeepingEngine`) keeps every layer's ``a`` and ``b`` until the
    clipping weights are known: about twice the activation memory. This engine keeps neither
    (ghost clipping, Li et al. 2022; Opacus's ``grad_sample_mode="ghost"``):

    1. The training step's backward runs with the graph retained. When a weight's last use in the
       micro-batch has passed, its per-example squared norm
       :math:`\sum_{k,l} \langle L^k_i L^{l\top}_i, R^k_i R^{l\top}_i \rangle` is computed and its
       ``(a, b)`` are dropped; only ``(B,)`` norms and the small norm-layer/bias gradients stay.
    2. :meth:`accumulate_weighted_sum` backpropagates the same loss again. Each layer forms
       :math:`(w \odot b)^\top a` as its ``b`` arrives and drops it.

    Peak memory is that of non-private training (the retained graph is what non-private backward
    holds at its start); the price is a second backward pass. Same layers and same exactness as
    ``engine="bk"``. Gradient hooks a user registers on activations run in both passes.

    The strategy passes the backpropagated loss (after any GradScaler scaling) with
    :meth:`set_backward_root`; on its own::

        engine = GhostClippingEngine(model)
        with engine.capturing():
            loss = F.cross_entropy(model(x), y, reduction="sum")
            loss.backward(retain_graph=True)
        engine.set_backward_root(loss)
        norms = engine.per_sample_squared_norms().sqrt()
        summed = {}
        engine.accumulate_weighted_sum(1.0 / (norms + 0.01), summed)   # second backward
        engine.reset()
    """

    name = "ghost"
    needs_backward_root = True

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self._uses: dict[nn.Parameter, int] = {}
        self._pending: dict[nn.Parameter, list[_Contribution]] = {}
        self._weight_sq_norms: Tensor | None = None
        self._root: Tensor | None = None
        self._second_pass: tuple[Tensor, dict[nn.Parameter, Tensor]] | None = None

    def set_backward_root(self, root: Tensor) -> None:
        """The scalar whose (graph-retaining) backward was captured; backpropagated again later."""
        self._root = root

    def _count_use(self, param: nn.Parameter | None) -> None:
        if self._capturing and param is not None and self._second_pass is None:
            self._uses[param] = self._uses.get(param, 0) + 1

    def _record_weight(self, param: nn.Parameter, contribution: _Contribution) -> None:
        if not self._capturing:
            return
        self._check_batch(contribution.right.shape[0])
        pending = self._pending.setdefault(param, [])
        pending.append(contribution)
        # Cross terms need every use of a shared weight at once: finish early only when all the
        # uses counted in forward have arrived, else at the end (_finish_all).
        uses = self._uses.get(param)
        if uses is not None and len(pending) >= uses:
            self._finish(param)

    def _record_vector(self, param: nn.Parameter, rows: tuple[int, int] | None, grads: Tensor) -> None:
        if self._second_pass is None:  # the first pass already recorded these small gradients
            super()._record_vector(param, rows, grads)

    def _finish(self, param: nn.Parameter) -> None:
        contributions = self._pending.pop(param)
        if self._second_pass is None:
            sq = _squared_norms_of_weight(param, contributions)
            self._weight_sq_norms = sq if self._weight_sq_norms is None else self._weight_sq_norms + sq
        else:
            weights, summed = self._second_pass
            add_into(summed, param, _weighted_sum_of_weight(param, contributions, weights))

    def _finish_all(self) -> None:
        # A use whose output never reached the loss has no backward; finish with what came.
        for param in list(self._pending):
            self._finish(param)

    def per_sample_squared_norms(self) -> Tensor:
        self._finish_all()
        vectors = super().per_sample_squared_norms()  # the records hold only vector gradients
        if self._weight_sq_norms is None:
            return vectors
        if not self._records:
            return self._weight_sq_norms
        return self._weight_sq_norms + vectors.to(self._weight_sq_norms.dtype)

    def accumulate_weighted_sum(self, weights: Tensor, summed: dict[nn.Parameter, Tensor]) -> None:
        if self._weight_sq_norms is not None:
            if self._root is None:
                raise RuntimeError(
                    "engine='ghost' needs the loss of the captured backward for its second pass: call "
                    "set_backward_root(loss) after loss.backward(retain_graph=True)."
                )
            self._second_pass = (weights, summed)
            # The plain capture flag: BookKeepingEngine.capturing would also reset the leak check's
            # record of which gradients existed before the first pass.
            try:
                with super(BookKeepingEngine, self).capturing():
                    torch.autograd.backward(self._root)
                self._finish_all()
            finally:
                self._second_pass = None
                self._root = None
        super().accumulate_weighted_sum(weights, summed)  # vector gradients

    def reset(self) -> None:
        super().reset()
        self._uses.clear()
        self._pending.clear()
        self._weight_sq_norms = None
        self._root = None


def _vector_grads(param: nn.Parameter, vectors: list[tuple[tuple[int, int] | None, Tensor]]) -> Tensor:
    """Sum of the small per-example gradients of ``param``, ``(B, *param.shape)``."""
    if all(rows is None for rows, _ in vectors):
        g = vectors[0][1]
        for _, v in vectors[1:]:
            g = g + v
        return g.to(_norm_dtype(g)).reshape(g.shape[0], *param.shape)
    b = vectors[0][1].shape[0]
    full = vectors[0][1].new_zeros(b, *param.shape, dtype=_norm_dtype(vectors[0][1]))
    for rows, v in vectors:
        if rows is None:
            full += v.view_as(full)
        else:
            full[:, rows[0] : rows[1]] += v
    return full


# ------------------------------------------------------------------- module inspection


def _supported(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Linear):
        return type(mod).forward is nn.Linear.forward
    if isinstance(mod, nn.Embedding):
        return (
            type(mod).forward is nn.Embedding.forward
            and mod.max_norm is None
            and not (mod.sparse or mod.scale_grad_by_freq)
        )
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        return (
            type(mod).forward in (nn.Conv1d.forward, nn.Conv2d.forward)
            and mod.groups == 1
            and mod.padding_mode == "zeros"
        )
    if isinstance(mod, _NORMS):
        return type(mod).forward in tuple(t.forward for t in _NORMS)
    if isinstance(mod, nn.MultiheadAttention):
        return type(mod).forward is nn.MultiheadAttention.forward and mod.bias_k is None
    return False


def _mha_out_projs(root: nn.Module) -> set[int]:
    """ids of ``nn.MultiheadAttention.out_proj`` layers: handled by the attention's capture."""
    return {id(m.out_proj) for m in root.modules() if isinstance(m, nn.MultiheadAttention)}


def _seq_first_modules(root: nn.Module) -> set[int]:
    """ids of layers inside ``nn.Transformer*`` containers built with ``batch_first=False``."""
    out: set[int] = set()
    for mod in root.modules():
        if not isinstance(mod, _TRANSFORMER_CONTAINERS):
            continue
        attn = next((m for m in mod.modules() if isinstance(m, nn.MultiheadAttention)), None)
        if attn is not None and not attn.batch_first:
            out.update(id(m) for m in mod.modules())
    return out


__all__ = ["BookKeepingEngine"]
