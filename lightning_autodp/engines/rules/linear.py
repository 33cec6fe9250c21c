r"""``nn.Linear`` (any number of leading dims), transformers' ``Conv1D`` (GPT-2) and ``FalconLinear``.

``nn.Linear``: :math:`y = x W^\top + b`, ``W``: ``(out, in)``; the per-example weight gradient is
:math:`G_i = b_i^\top a_i` (``L`` = output gradient, ``R`` = input).
``Conv1D``: :math:`y = x W + b`, ``W``: ``(in, out)``; :math:`G_i = a_i^\top b_i` (``L`` = input,
``R`` = output gradient). Bias: :math:`\sum_t b_{i,t}`.
``FalconLinear`` (Falcon) overrides ``nn.Linear.forward`` with ``input @ weight.T (+ bias)``, the same
map: it gets the ``nn.Linear`` rule only while its forward is, token for token, that one
(:data:`FALCON_LINEAR_FORWARD`); any other version gets the exact per-module rule.

The backward returns only the input gradient: autograd never forms the non-private ``W.grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_autodp import _compat
from lightning_autodp.engines.contributions import Contribution, as_btn, norm_dtype
from lightning_autodp.engines.rule import (
    Handle,
    LayerRule,
    autocast_like_layer,
    overrides_forward,
    register_rule,
)


class LinearFn(torch.autograd.Function):
    """``x W^T + b`` (or ``x W + b`` with ``in_out=True``) recording ``(b, x)`` in backward."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, handle: Handle, in_out: bool = False
    ) -> Tensor:
        x, weight, bias = autocast_like_layer(x, weight, bias)  # type: ignore[assignment]
        ctx.save_for_backward(x, weight)
        ctx.handle, ctx.in_out = handle, in_out
        handle.count_use(handle.weight)
        out = F.linear(x, weight.t() if in_out else weight, bias)
        # With a bias and an input of more than two dims, F.linear returns a view of its matrix product
        # (addmm, then view). Autograd forbids modifying in place a view made inside a custom Function,
        # and models do modify layer outputs in place (Wav2Vec2 zeroes its padded frames with
        # `hidden_states[~mask] = 0`): the output gets storage of its own.
        return out.clone() if _compat.is_view(out) else out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        x, weight = ctx.saved_tensors
        handle: Handle = ctx.handle
        grad_out = grad_out.to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight.t() if ctx.in_out else weight)
        bd = handle.batch_dim
        if handle.weight is not None:
            # x is the tensor autograd saved anyway: no second copy of the activation.
            g, a = as_btn(grad_out, bd), as_btn(x, bd)
            left, right = (a, g) if ctx.in_out else (g, a)
            handle.record_weight(handle.weight, Contribution(left, right, handle.weight_rows))
        if handle.bias is not None:
            grad_b = as_btn(grad_out, bd).sum(1, dtype=norm_dtype(grad_out))
            handle.record_vector(handle.bias, handle.bias_rows, grad_b)
        return grad_x, None, None, None, None


@register_rule(nn.Linear)
class LinearRule(LayerRule):
    def unsupported_reason(self, module: nn.Module) -> str | None:
        return "it overrides nn.Linear.forward" if overrides_forward(module, nn.Linear) else None

    def captured_forward(self, module: nn.Module, handle: Handle) -> Callable[..., Any]:
        def forward(x: Tensor) -> Tensor:
            return LinearFn.apply(x, module.weight, module.bias, handle)

        return forward


@register_rule("transformers.pytorch_utils.Conv1D")
class HFConv1DRule(LayerRule):
    """transformers' ``Conv1D``: ``addmm(bias, x.view(-1, in), weight).view(..., out)``."""

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if type(module).forward is not _conv1d_class(module).forward:
            return "it overrides Conv1D.forward"
        if module.weight.dim() != 2 or module.bias is None:
            return "its weight/bias are not those of transformers' Conv1D"
        return None

    def captured_forward(self, module: nn.Module, handle: Handle) -> Callable[..., Any]:
        def forward(x: Tensor) -> Tensor:
            return LinearFn.apply(x, module.weight, module.bias, handle, True)

        return forward


#: the forward of transformers' FalconLinear (4.x to 5.x) that the nn.Linear rule reproduces
FALCON_LINEAR_FORWARD = """
def forward(self, input: torch.Tensor) -> torch.Tensor:
    hidden_states = input @ self.weight.T
    if self.bias is None:
        return hidden_states
    return hidden_states + self.bias
"""
_FALCON_EXPECTED = "\n".join(
    line.rstrip() for line in FALCON_LINEAR_FORWARD.strip().splitlines() if line.strip()
)


@register_rule("transformers.models.falcon.modeling_falcon.FalconLinear")
class FalconLinearRule(LinearRule):
    def unsupported_reason(self, module: nn.Module) -> str | None:
        from lightning_autodp.engines.rules.hf_rmsnorm import _normalized_source

        if _normalized_source(type(module).forward) != _FALCON_EXPECTED:
            return "its forward is not the FalconLinear forward the nn.Linear rule reproduces"
        return None


def _conv1d_class(module: nn.Module) -> type:
    for cls in type(module).__mro__:
        if f"{cls.__module__}.{cls.__qualname__}" == "transformers.pytorch_utils.Conv1D":
            return cls
    return type(None)
