r"""``nn.MultiheadAttention`` written with public ops, its projections through :class:`LinearFn`.

The captured forward recomputes torch's attention (``F.multi_head_attention_forward``'s math) so
that each projection is a :class:`~.linear.LinearFn` call recording its factors: the q/k/v blocks
of a packed ``in_proj_weight`` are row blocks of one parameter (their cross terms vanish: they
touch disjoint rows), ``kdim``/``vdim`` layers use ``q/k/v_proj_weight``. Masks (``attn_mask``
bool or float, 2-D or per head; ``key_padding_mask``), dropout, ``need_weights`` /
``average_attn_weights``, ``batch_first`` and unbatched inputs keep torch's semantics; the core
is :func:`F.scaled_dot_product_attention`, or an explicit softmax when the weights are returned.
``add_bias_kv`` and ``add_zero_attn`` attention goes to the per-module rule instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_autodp.engines.rule import Handle, LayerRule, overrides_forward, register_rule
from lightning_autodp.engines.rules.linear import LinearFn


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """torch's mask convention: ``True`` (bool) means *not allowed*; float masks are added."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


class _Projections:
    """The q/k/v/out projections of one attention module, each through :class:`LinearFn`."""

    def __init__(self, module: nn.MultiheadAttention, handle: Handle) -> None:
        self.m, self.engine, self.name = module, handle.engine, handle.name

    def _handle(self, weight: nn.Parameter, rows: tuple[int, int] | None, bias_rows: tuple[int, int] | None):
        bias = self.m.in_proj_bias
        return Handle(
            self.engine,
            self.name,
            self.engine.trainable(weight),
            self.engine.trainable(bias),
            0,
            rows,
            bias_rows,
        )

    def _bias(self, k: int) -> Tensor | None:
        e = self.m.embed_dim
        b = self.m.in_proj_bias
        return None if b is None else b[k * e : (k + 1) * e]

    def qkv(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m, e = self.m, self.m.embed_dim
        blocks = [(k * e, (k + 1) * e) for k in range(3)]
        if m.in_proj_weight is None:  # kdim/vdim differ from embed_dim: separate weights
            weights = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
            return tuple(  # type: ignore[return-value]
                LinearFn.apply(x, w, self._bias(k), self._handle(w, None, blocks[k]))
                for k, (x, w) in enumerate(zip((query, key, value), weights))
            )
        w = m.in_proj_weight
        if query is key and key is value:  # self-attention: one packed projection, as torch does
            return LinearFn.apply(query, w, m.in_proj_bias, self._handle(w, None, None)).split(e, dim=-1)
        return tuple(  # type: ignore[return-value]
            LinearFn.apply(x, w[r[0] : r[1]], self._bias(k), self._handle(w, r, r))
            for k, (x, r) in enumerate(zip((query, key, value), blocks))
        )

    def out(self, x: Tensor) -> Tensor:
        o = self.m.out_proj
        handle = Handle(
            self.engine, self.name, self.engine.trainable(o.weight), self.engine.trainable(o.bias)
        )
        return LinearFn.apply(x, o.weight, o.bias, handle)


def attention_forward(
    m: nn.MultiheadAttention,
    proj: _Projections,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention.forward`` (without bias_k/v, zero attention) on public ops."""
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    batched = query.dim() == 3
    self_attention = query is key and key is value
    if not batched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    elif not m.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    if self_attention:  # one packed projection, as torch does
        key = value = query
    q, k, v = proj.qkv(query, key, value)
    b, tq, e = q.shape
    h = m.num_heads
    hd = e // h
    q, k, v = (t.reshape(b, t.shape[1], h, hd).transpose(1, 2) for t in (q, k, v))
    mask = _merged_mask(attn_mask, key_padding_mask, b, h, tq, k.shape[2], q.dtype)
    p = m.dropout if m.training else 0.0
    weights = None
    if need_weights:
        scores = torch.matmul(q * math.sqrt(1.0 / hd), k.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if p > 0.0:
            weights = F.dropout(weights, p=p)
        out = torch.matmul(weights, v)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
    out = proj.out(out.transpose(1, 2).reshape(b, tq, e))
    if not batched:
        return out.squeeze(0), (weights.squeeze(0) if weights is not None else None)
    return (out if m.batch_first else out.transpose(0, 1)), weights


def _merged_mask(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    b: int,
    h: int,
    tq: int,
    tk: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """``attn_mask`` ((L, S) or (B*H, L, S)) plus ``key_padding_mask`` ((B, S)) as (B, H|1, L, S)."""
    mask = _float_mask(attn_mask, dtype)
    if mask is not None:
        mask = mask.view(1, 1, tq, tk) if mask.dim() == 2 else mask.view(b, h, tq, tk)
    pad = _float_mask(key_padding_mask, dtype)
    if pad is not None:
        pad = pad.view(b, 1, 1, tk)
        mask = pad if mask is None else mask + pad
    return mask


@register_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(LayerRule):
    def unsupported_reason(self, module: nn.Module) -> str | None:
        assert isinstance(module, nn.MultiheadAttention)
        if overrides_forward(module, nn.MultiheadAttention):
            return "it overrides nn.MultiheadAttention.forward"
        if module.bias_k is not None or module.add_zero_attn:
            return "add_bias_kv / add_zero_attn are not supported by the one-backward rule"
        return None

    def handled_children(self, module: nn.Module) -> list[nn.Module]:
        return [module.out_proj]  # type: ignore[list-item]

    def captured_forward(self, module: nn.Module, handle: Handle) -> Callable[..., Any]:
        assert isinstance(module, nn.MultiheadAttention)
        proj = _Projections(module, handle)

        def forward(query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
            return attention_forward(module, proj, query, key, value, *args, **kwargs)

        return forward
