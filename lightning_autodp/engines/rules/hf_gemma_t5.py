r"""transformers' Gemma and T5 layers that are a norm-layer affine or an embedding, checked by source.

* ``GemmaRMSNorm`` (Gemma, Gemma 2, Gemma 3):
  :math:`y = \mathrm{cast}\big(\hat x_{32} \odot (1 + w_{32})\big)` with
  :math:`\hat x_{32} = x_{32} / \sqrt{\mathrm{mean}(x_{32}^2) + \epsilon}`. Since
  :math:`\partial y / \partial w = \hat x`, the per-example gradient of ``w`` is
  :math:`\sum_t (\partial L / \partial y)_{i,t} \odot \hat x_{i,t}`: the norm rule's affine
  (:class:`.norm.AffineFn`) applied with the factor ``1 + w``.
* ``T5LayerNorm`` (T5, mT5, UMT5, LongT5): :math:`y = w \odot \hat x`, the same affine without bias.
* ``GemmaTextScaledWordEmbedding`` (Gemma, Gemma 2, Gemma 3): :math:`y = E[\text{ids}] \cdot s`
  with a constant ``s``: the embedding rule's lookup (whose backward receives the gradient already
  multiplied by ``s``). Tied to ``lm_head`` (a Linear), both uses are factors of one parameter, so
  its norm includes their cross term (:mod:`..contributions`).

Each rule applies only where the class's ``forward`` (and helpers) is, token for token, the source
this file reproduces; any other version gets the exact per-module rule of :mod:`.module` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_autodp.engines.rule import Handle, LayerRule, register_rule
from lightning_autodp.engines.rules.embedding import EmbeddingFn, EmbeddingRule, expand_shared_ids
from lightning_autodp.engines.rules.hf_rmsnorm import _normalized_source
from lightning_autodp.engines.rules.norm import AffineFn


def _normalize(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines() if line.strip())


#: the sources the rules reproduce (transformers 4.x to 5.x), comments removed
GEMMA_RMSNORM = (
    """
def _norm(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
""",
    """
def forward(self, x):
    output = self._norm(x.float())
    # Llama does x.to(float16) * w whilst Gemma is (x * w).to(float16)
    # See https://github.com/huggingface/transformers/pull/29402
    output = output * (1.0 + self.weight.float())
    return output.type_as(x)
""",
)
T5_LAYERNORM = """
def forward(self, hidden_states):
    # T5 uses a layer_norm which only scales and doesn't shift, which is also known as Root Mean
    # Square Layer Normalization https://huggingface.co/papers/1910.07467 thus variance is calculated
    # w/o mean and there is no bias. Additionally we want to make sure that the accumulation for
    # half-precision inputs is done in fp32
    variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    # convert into half-precision if necessary
    if self.weight.dtype in [torch.float16, torch.bfloat16]:
        hidden_states = hidden_states.to(self.weight.dtype)
    return self.weight * hidden_states
"""
GEMMA_EMBEDDING = """
def forward(self, input_ids: torch.Tensor):
    return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)
"""


def _view(xhat: Tensor) -> tuple[int, ...]:
    return (1,) * (xhat.dim() - 1) + (xhat.shape[-1],)


@register_rule(
    "transformers.models.gemma.modeling_gemma.GemmaRMSNorm",
    "transformers.models.gemma2.modeling_gemma2.Gemma2RMSNorm",
    "transformers.models.gemma3.modeling_gemma3.Gemma3RMSNorm",
)
class GemmaRMSNormRule(LayerRule):
    def unsupported_reason(self, module: nn.Module) -> str | None:
        cls = type(module)
        got = (_normalized_source(getattr(cls, "_norm", None)), _normalized_source(cls.forward))
        if got != tuple(_normalize(s) for s in GEMMA_RMSNORM):
            return "its forward is not the GemmaRMSNorm forward this rule reproduces"
        return None

    def captured_forward(self, module: nn.Module, handle: Handle) -> Callable[..., Any]:
        def forward(x: Tensor) -> Tensor:
            h = x.float()
            xhat = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.eps)
            # d y / d w = xhat: the affine's per-example gradient, with the factor (1 + w).
            scale = 1.0 + module.weight.float()
            return AffineFn.apply(xhat, scale, None, _view(xhat), handle).type_as(x)

        return forward


@register_rule(
    "transformers.models.t5.modeling_t5.T5LayerNorm",
    "transformers.models.mt5.modeling_mt5.MT5LayerNorm",
    "transformers.models.umt5.modeling_umt5.UMT5LayerNorm",
    "transformers.models.longt5.modeling_longt5.LongT5LayerNorm",
)
class T5LayerNormRule(LayerRule):
    def unsupported_reason(self, module: nn.Module) -> str | None:
        if _normalized_source(type(module).forward) != _normalize(T5_LAYERNORM):
            return "its forward is not the T5LayerNorm forward this rule reproduces"
        return None

    def captured_forward(self, module: nn.Module, handle: Handle) -> Callable[..., Any]:
        def forward(hidden_states: Tensor) -> Tensor:
            variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
            xhat = hidden_states * torch.rsqrt(variance + module.variance_epsilon)
            if module.weight.dtype in (torch.float16, torch.bfloat16):
                xhat = xhat.to(module.weight.dtype)
            return AffineFn.apply(xhat, module.weight, None, _view(xhat), handle)

        return forward


@register_rule(
    "transformers.models.gemma.modeling_gemma.GemmaTextScaledWordEmbedding",
    "transformers.models.gemma2.modeling_gemma2.Gemma2TextScaledWordEmbedding",
    "transformers.models.gemma3.modeling_gemma3.Gemma3TextScaledWordEmbedding",
)
class ScaledEmbeddingRule(EmbeddingRule):
    def unsupported_reason(self, module: nn.Module) -> str | None:
        assert isinstance(module, nn.Embedding)
        if _normalized_source(type(module).forward) != _normalize(GEMMA_EMBEDDING):
            return "its forward is not the scaled-embedding forward this rule reproduces"
        if module.max_norm is not None or module.sparse or module.scale_grad_by_freq:
            return "max_norm, sparse and scale_grad_by_freq are not supported by the one-backward rule"
        return None

    def captured_forward(self, module: nn.Module, handle: Handle) -> Callable[..., Any]:
        def forward(input_ids: Tensor) -> Tensor:
            ids = expand_shared_ids(input_ids, handle.batch_dim, handle.engine.expected_batch_size)
            looked_up = EmbeddingFn.apply(ids, module.weight, module.padding_idx, handle)
            return looked_up * module.embed_scale.to(module.weight.dtype)

        return forward
