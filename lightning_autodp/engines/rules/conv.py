r"""``nn.Conv1d`` / ``nn.Conv2d`` (any stride, padding, dilation, groups; any memory format).

With the input unfolded into patches ``U_i``: ``(L, C_in/g * k)`` (``F.unfold``, a public op that
reads channels-last inputs correctly) and the output gradient ``b_i``: ``(L, C_out)``:

* ``groups == 1``: :math:`G_i = b_i^\top U_i`, a contribution like a linear layer's (ghost norm or
  materialised, by cost);
* ``groups = g > 1`` (grouped, depthwise): per group ``j`` :math:`G_{i,j} = b_{i,j}^\top U_{i,j}`,
  materialised for all groups at once, ``(B, C_out, C_in/g * k)`` (a grouped weight is small).

Bias: :math:`\sum_l b_{i,l}`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_autodp.engines.contributions import Contribution, norm_dtype, up
from lightning_autodp.engines.rule import (
    Handle,
    LayerRule,
    autocast_like_layer,
    overrides_forward,
    register_rule,
)


class ConvFn(torch.autograd.Function):
    """Convolution whose backward gives ``dL/dx`` and records the unfolded input."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, conv: tuple, handle: Handle
    ) -> Tensor:
        stride, padding, dilation, groups = conv
        x, weight, bias = autocast_like_layer(x, weight, bias)  # type: ignore[assignment]
        ctx.save_for_backward(x, weight)
        ctx.conv, ctx.handle = conv, handle
        handle.count_use(handle.weight)
        fn = F.conv1d if x.dim() == 3 else F.conv2d
        return fn(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        x, weight = ctx.saved_tensors
        handle: Handle = ctx.handle
        stride, padding, dilation, groups = ctx.conv
        grad_out = grad_out.to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv1d_input if x.dim() == 3 else torch.nn.grad.conv2d_input
            grad_x = grad_x(x.shape, weight, grad_out, stride, padding, dilation, groups)
        b = x.shape[0]
        left = grad_out.reshape(b, grad_out.shape[1], -1).transpose(1, 2)  # (B, L, Cout)
        if handle.weight is not None:
            cols = _unfold(x, weight, stride, padding, dilation).transpose(1, 2)  # (B, L, Cin*k)
            if groups == 1:
                handle.record_weight(handle.weight, Contribution(left, cols))
            else:
                handle.record_vector(handle.weight, None, _grouped_per_example(left, cols, groups))
        if handle.bias is not None:
            handle.record_vector(handle.bias, None, left.sum(1, dtype=norm_dtype(left)))
        return grad_x, None, None, None, None


def _unfold(x: Tensor, weight: Tensor, stride: tuple, padding: tuple, dilation: tuple) -> Tensor:
    """Patches ``(B, C_in * k, L)`` in the channel-major order of ``weight.view(C_out, -1)``."""
    if x.dim() == 3:
        k = weight.shape[-1]
        return F.unfold(
            x.unsqueeze(2), (1, k), dilation=(1, dilation[0]), padding=(0, padding[0]), stride=(1, stride[0])
        )
    return F.unfold(x, weight.shape[-2:], dilation=dilation, padding=padding, stride=stride)


def _grouped_per_example(left: Tensor, cols: Tensor, groups: int) -> Tensor:
    """Per-example grouped-conv weight gradients ``(B, C_out, C_in/g * k)`` from all groups at once."""
    b, length, c_out = left.shape
    per_group_cols = cols.shape[-1] // groups
    g_out = up(left).view(b, length, groups, c_out // groups)
    g_in = up(cols).view(b, length, groups, per_group_cols)
    return torch.einsum("blgo,blgk->bgok", g_out, g_in).reshape(b, c_out, per_group_cols)


@register_rule(nn.Conv1d, nn.Conv2d)
class ConvRule(LayerRule):
    def unsupported_reason(self, module: nn.Module) -> str | None:
        assert isinstance(module, (nn.Conv1d, nn.Conv2d))
        if overrides_forward(module, nn.Conv1d, nn.Conv2d):
            return "it overrides the convolution's forward"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported by the one-backward rule"
        return None

    def captured_forward(self, module: nn.Module, handle: Handle) -> Callable[..., Any]:
        assert isinstance(module, (nn.Conv1d, nn.Conv2d))
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
            conv = (tuple(module.stride), tuple(padding), tuple(module.dilation), module.groups)
            return ConvFn.apply(x, module.weight, module.bias, conv, handle)

        return forward
