r"""transformers' ``LlamaRMSNorm`` and its verbatim copies (Mistral, Mixtral, Qwen2, Qwen3, Phi-3).

.. math:: y = w \odot \mathrm{cast}\big(x_{32} / \sqrt{\mathrm{mean}(x_{32}^2) + \epsilon}\big)

where :math:`x_{32}` is the input in float32 and the cast returns to the input's dtype, as the
class computes it. The normalisation :math:`\hat x` is parameter-free, so the layer is the
norm rule's elementwise affine (:class:`.norm.AffineFn`) without bias: the per-example gradient of
``w`` is :math:`\sum_t (\partial L/\partial y)_{i,t} \odot \hat x_{i,t}`, in the same backward.

The rule applies only to classes whose ``forward`` is, token for token, the one this file
reproduces (:data:`LLAMA_RMSNORM_FORWARD`); any other version or relative (Gemma's ``x (1 + w)``, a
future change of the class) gets the exact per-module rule of :mod:`.module` instead.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_autodp.engines.rule import Handle, LayerRule, register_rule
from lightning_autodp.engines.rules.norm import AffineFn

#: the forward the rule reproduces (transformers' LlamaRMSNorm, 4.x to 5.x)
LLAMA_RMSNORM_FORWARD = """
def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)
"""

_FAMILIES = (
    ("llama", "Llama"),
    ("mistral", "Mistral"),
    ("mixtral", "Mixtral"),
    ("qwen2", "Qwen2"),
    ("qwen3", "Qwen3"),
    ("phi3", "Phi3"),
)


def _normalized_source(fn: Any) -> str | None:
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None
    return "\n".join(line.rstrip() for line in source.strip().splitlines() if line.strip())


_EXPECTED = "\n".join(line.rstrip() for line in LLAMA_RMSNORM_FORWARD.strip().splitlines() if line.strip())


@register_rule(*(f"transformers.models.{m}.modeling_{m}.{c}RMSNorm" for m, c in _FAMILIES))
class LlamaRMSNormRule(LayerRule):
    def unsupported_reason(self, module: nn.Module) -> str | None:
        if _normalized_source(type(module).forward) != _EXPECTED:
            return "its forward is not the LlamaRMSNorm forward this rule reproduces"
        return None

    def captured_forward(self, module: nn.Module, handle: Handle) -> Callable[..., Any]:
        def forward(hidden_states: Tensor) -> Tensor:
            input_dtype = hidden_states.dtype
            h = hidden_states.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
            xhat = h.to(input_dtype)
            view = (1,) * (xhat.dim() - 1) + (xhat.shape[-1],)
            return AffineFn.apply(xhat, module.weight, None, view, handle)

        return forward
