"""Independent references for the privacy-relevant math: one backward per example."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn


def per_example_gradients(
    net: nn.Module, per_example_loss: Callable[[nn.Module, int], Tensor], n: int
) -> list[list[Tensor]]:
    """``g_i`` for ``i < n``: the gradient of example ``i``'s own loss, one backward each.

    ``per_example_loss(net, i)`` returns the scalar loss of example ``i`` alone.
    """
    net = copy.deepcopy(net)
    params = [p for p in net.parameters() if p.requires_grad]
    grads = []
    for i in range(n):
        loss = per_example_loss(net, i)
        g = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)])
    return grads


def reference_factors(norms: Tensor, clipping: str, max_grad_norm: float, gamma: float) -> Tensor:
    """Clipping factors written out from the paper's formulas, independently of the package."""
    out = []
    for norm in norms.tolist():
        if clipping == "auto_s":
            out.append(max_grad_norm / (norm + gamma))
        elif clipping == "psac":  # Xia et al. 2023, Algorithm 1: C / (||g|| + r / (||g|| + r))
            out.append(max_grad_norm / (norm + gamma / (norm + gamma)))
        elif clipping == "auto_v":
            out.append(0.0 if norm == 0 else max_grad_norm / norm)
        elif clipping == "abadi":
            out.append(min(1.0, max_grad_norm / norm) if norm > 0 else 1.0)
        else:
            raise ValueError(f"no reference for clipping={clipping!r}")
    return torch.tensor(out, dtype=torch.float64)


def reference_clipped_mean(
    grads: list[list[Tensor]], clipping: str, max_grad_norm: float, gamma: float, batch_size: float
) -> list[Tensor]:
    """``(1/B) sum_i C_i g_i`` from per-example gradients."""
    norms = torch.stack([torch.sqrt(sum((g.double() ** 2).sum() for g in gi)) for gi in grads])
    factors = reference_factors(norms, clipping, max_grad_norm, gamma)
    return [
        sum(c * gi[k].double() for c, gi in zip(factors, grads)) / batch_size for k in range(len(grads[0]))
    ]
