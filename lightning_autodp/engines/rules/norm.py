r"""``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm`` and their subclasses that keep their forward.

The layer is split into the parameter-free normalisation :math:`\hat x` (computed by torch's own
functional op) and the elementwise affine :math:`y = \hat x \odot w + b`, whose per-example
gradients are :math:`\sum (\partial L/\partial y)_i \odot \hat x_i` and :math:`\sum (\partial L/\partial y)_i`
over every dim ``w`` does not span: ``(B, *w.shape)``, computed in backward.

Norm classes of other libraries compute their own forward: transformers' ``LlamaRMSNorm`` family
has its own rule (:mod:`.hf_rmsnorm`, checked against the class's source); others (Gemma's
``x * (1 + w)``) get the exact per-module rule of :mod:`.module` instead of a rule guessed from
their name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_autodp.engines.contributions import up
from lightning_autodp.engines.rule import Handle, LayerRule, overrides_forward, register_rule

_RMSNorm = getattr(nn, "RMSNorm", None)
NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm) + ((_RMSNorm,) if _RMSNorm else ())


class AffineFn(torch.autograd.Function):
    """``y = xhat * w + b`` (norm layers' elementwise affine), recording per-example ``dw``, ``db``.

    ``view``: the shape ``w`` is broadcast with (batch first); the per-example gradient sums
    ``dL/dy * xhat`` over the broadcast dims other than the batch.
    """

    @staticmethod
    def forward(
        ctx: Any, xhat: Tensor, weight: Tensor | None, bias: Tensor | None, view: tuple, handle: Handle
    ) -> Tensor:
        ctx.save_for_backward(xhat, weight)
        ctx.view, ctx.handle = view, handle
        y = xhat if weight is None else xhat * weight.view(view)
        return y if bias is None else y + bias.view(view)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        xhat, weight = ctx.saved_tensors
        handle: Handle = ctx.handle
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out if weight is None else grad_out * weight.view(ctx.view)
        # Summing over every broadcast dim but the batch leaves the batch first: (B, *w.shape).
        reduce_dims = [d for d, size in enumerate(ctx.view) if size == 1 and d != handle.batch_dim]

        def per_example(t: Tensor) -> Tensor:
            t = up(t)
            return t.sum(reduce_dims) if reduce_dims else t  # sum([]) would sum everything

        if handle.weight is not None:
            handle.record_vector(handle.weight, None, per_example(up(grad_out) * up(xhat)))
        if handle.bias is not None:
            handle.record_vector(handle.bias, None, per_example(grad_out))
        return grad_x, None, None, None, None


@register_rule(*NORMS)
class NormRule(LayerRule):
    def unsupported_reason(self, module: nn.Module) -> str | None:
        return "it overrides the norm layer's forward" if overrides_forward(module, *NORMS) else None

    def captured_forward(self, module: nn.Module, handle: Handle) -> Callable[..., Any]:
        def forward(x: Tensor) -> Tensor:
            bias = getattr(module, "bias", None)
            if isinstance(module, nn.GroupNorm):
                xhat = F.group_norm(x, module.num_groups, None, None, module.eps)
                view = (1, module.num_channels) + (1,) * (x.dim() - 2)
            else:
                shape = tuple(module.normalized_shape)  # type: ignore[arg-type]
                if isinstance(module, nn.LayerNorm):
                    xhat = F.layer_norm(x, shape, None, None, module.eps)
                else:
                    xhat = F.rms_norm(x, shape, None, module.eps)  # type: ignore[arg-type]
                view = (1,) * (x.dim() - len(shape)) + shape
            return AffineFn.apply(xhat, module.weight, bias, view, handle)

        return forward
