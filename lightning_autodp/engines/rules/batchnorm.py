r"""``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` in eval mode: a per-channel affine map of each example.

With running statistics and in eval mode, BatchNorm computes

.. math:: \hat x = \frac{x - \mu_{run}}{\sqrt{\sigma^2_{run} + \epsilon}}, \qquad y = \hat x \odot w + b

per channel, with constants :math:`\mu_{run}, \sigma^2_{run}`: example :math:`i`'s output depends on
its own input only, and its gradients are those of the norm layers' affine map
(:class:`~.norm.AffineFn`): :math:`\sum_{\text{spatial}} (\partial L/\partial y)_i \odot \hat x_i` and
:math:`\sum_{\text{spatial}} (\partial L/\partial y)_i`, shape ``(B, C)``.

In train mode (or without running statistics) :math:`\mu, \sigma^2` are the batch's own: examples mix,
and no per-example gradient exists. A layer without running statistics is refused when the engine
is built; one called in train mode raises :class:`~lightning_autodp.safeguards.batchnorm.BatchNormModeError`
at that call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_autodp.engines.rule import Handle, LayerRule, overrides_forward, register_rule
from lightning_autodp.engines.rules.norm import AffineFn
from lightning_autodp.safeguards.batchnorm import check_per_example

BATCH_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def normalised_with_running_statistics(module: nn.Module, x: Tensor) -> Tensor:
    r""":math:`\hat x` of an eval-mode BatchNorm: torch's own op with the running statistics, no affine."""
    return F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)


def channel_view(module: nn.Module, x: Tensor) -> tuple[int, ...]:
    """The shape a per-channel parameter is broadcast with: ``(1, C, 1, ...)``."""
    return (1, module.num_features) + (1,) * (x.dim() - 2)


@register_rule(*BATCH_NORMS)
class EvalBatchNormRule(LayerRule):
    def unsupported_reason(self, module: nn.Module) -> str | None:
        if overrides_forward(module, *BATCH_NORMS):
            return "it overrides BatchNorm's forward"
        if module.running_mean is None or module.running_var is None:
            return "it has no running statistics (track_running_stats=False): batch statistics in every mode"
        return None

    def captured_forward(self, module: nn.Module, handle: Handle) -> Callable[..., Any]:
        def forward(x: Tensor) -> Tensor:
            check_per_example(handle.name, module)  # train mode: the batch's statistics mix examples
            xhat = normalised_with_running_statistics(module, x)
            return AffineFn.apply(xhat, module.weight, module.bias, channel_view(module, x), handle)

        return forward
