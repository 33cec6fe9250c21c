r"""``nn.Embedding``: the per-example gradient is :math:`G_i = \mathrm{onehot}(ids_i)^\top b_i`.

Shared ids. transformers' GPT-2 and BERT look their position embeddings up with ids of shape
``(1, T)`` and let the output broadcast over the batch when it is added to the token embeddings.
The gradient reaching the table is then already summed over the examples: no per-example
attribution is possible after the fact. When the engine knows the micro-batch size ``B``
(the strategy passes it, see :meth:`~lightning_autodp.engines.base.PerSampleEngine.expect_batch_size`),
ids with batch dim 1 are expanded to ``B`` *before* the lookup: the output is ``(B, T, d)`` and
every later broadcast against a ``(B, T, d)`` tensor gives the same values, while backward now sees
one output gradient per example. Without ``B`` the engine refuses (naming the layer) rather than
attribute the summed gradient to one example.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_autodp.engines.contributions import Contribution, as_btn, to_batch_first
from lightning_autodp.engines.rule import Handle, LayerRule, overrides_forward, register_rule


class EmbeddingFn(torch.autograd.Function):
    """Embedding lookup whose backward records ``(ids, dL/dy)``; ``W`` gets no ``.grad``."""

    @staticmethod
    def forward(ctx: Any, ids: Tensor, weight: Tensor, padding_idx: int | None, handle: Handle) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.handle = padding_idx, handle
        handle.count_use(handle.weight)
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[None, None, None, None]:
        (ids,) = ctx.saved_tensors
        handle: Handle = ctx.handle
        bd = handle.batch_dim
        ids_b = to_batch_first(ids, bd)
        ids_b = ids_b.reshape(ids_b.shape[0], -1)
        grad_b = as_btn(grad_out, bd)
        if ctx.padding_idx is not None:
            # The padding row never receives gradient.
            grad_b = grad_b.masked_fill((ids_b == ctx.padding_idx).unsqueeze(-1), 0.0)
        handle.record_weight(handle.weight, Contribution(ids_b, grad_b))  # type: ignore[arg-type]
        return None, None, None, None


def expand_shared_ids(ids: Tensor, batch_dim: int, batch_size: int | None) -> Tensor:
    """Ids with batch dim 1, shared by all ``batch_size`` examples, expanded to one row each."""
    if batch_size is None or batch_size == 1 or ids.dim() < 2 or ids.shape[batch_dim] != 1:
        return ids
    shape = list(ids.shape)
    shape[batch_dim] = batch_size
    return ids.expand(shape)


@register_rule(nn.Embedding)
class EmbeddingRule(LayerRule):
    def unsupported_reason(self, module: nn.Module) -> str | None:
        assert isinstance(module, nn.Embedding)
        if overrides_forward(module, nn.Embedding):
            return "it overrides nn.Embedding.forward"
        if module.max_norm is not None or module.sparse or module.scale_grad_by_freq:
            return "max_norm, sparse and scale_grad_by_freq are not supported by the one-backward rule"
        return None

    def rows_are_examples(
        self, module: nn.Module, args: tuple, kwargs: dict, batch_dim: int, batch: int
    ) -> bool:
        ids = args[0] if args else next(iter(kwargs.values()))
        # Ids shared by the batch (batch dim 1) are expanded to it before the lookup.
        shared = ids.dim() >= 2 and ids.shape[batch_dim] == 1
        return shared or super().rows_are_examples(module, args, kwargs, batch_dim, batch)

    def captured_forward(self, module: nn.Module, handle: Handle) -> Callable[..., Any]:
        def forward(ids: Tensor) -> Tensor:
            ids = expand_shared_ids(ids, handle.batch_dim, handle.engine.expected_batch_size)
            return EmbeddingFn.apply(ids, module.weight, module.padding_idx, handle)

        return forward
