"""Per-example clipping factors.

Given the per-example gradient norms ``||g_i||`` over all trainable parameters together, each
example's gradient is scaled by a factor ``C_i`` so that ``||C_i g_i|| <= R`` (``R`` is
``max_grad_norm``). The clipped sum ``sum_i C_i g_i`` then changes by at most ``R`` when one
example is added or removed, which is what Gaussian noise of standard deviation ``sigma * R`` is
calibrated for: the privacy accounting is the same for every mode below.

=========  ===================================  =====================================================
mode       ``C_i``                              notes
=========  ===================================  =====================================================
auto_s     ``R / (||g_i|| + gamma)``            Bu et al. 2023 ("automatic clipping", stable);
                                                gamma 0.01 unless given.
psac       ``R / (||g_i|| + r_i)`` with         Xia et al. 2023 (DP-PSAC, per-sample adaptive
           ``r_i = gamma / (||g_i|| + gamma)``  clipping); gamma is the paper's r, default 1.
                                                The package's default mode.
auto_v     ``R / ||g_i||``                      Every example normalised to norm ``R``; 0 where
                                                g_i = 0.
abadi      ``min(1, R / (||g_i|| + 1e-6))``     Abadi et al. 2016, the classic threshold, in
                                                Opacus's form (the 1e-6 keeps ``||C_i g_i|| < R``
                                                and guards ``g_i = 0``).
=========  ===================================  =====================================================

Under AUTO-S, PSAC and AUTO-V every factor is proportional to ``R``: with Adam-type optimisers ``R``
drops out of the update, with SGD it folds into the learning rate. ``gamma`` keeps examples with
tiny gradients from being blown up to norm ``R`` (and gives the convergence guarantee).

PSAC is AUTO-S with a stability constant that depends on the example's own norm,
``r_i = gamma / (||g_i|| + gamma)``: close to 1 for an example whose gradient is far below
``gamma`` (a fitted example keeps a small gradient, ``||C_i g_i|| ~ R ||g_i||``, instead of being
blown up to norm ``R`` with a direction that carries little signal), close to 0 for one far above
it (normalised to norm ``R`` as under AUTO-V). The bound holds for every norm because
``r_i > 0``: ``||C_i g_i|| = R ||g_i|| / (||g_i|| + r_i) < R``. ``r_i`` is a function of example
``i``'s own gradient only, like every factor here, so the sensitivity (and the accounting) is
that of every other mode.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

ClippingMode = Literal["auto_s", "psac", "auto_v", "abadi"]
CLIPPING_MODES: tuple[str, ...] = ("auto_s", "psac", "auto_v", "abadi")
#: the clipping of ``DPAutoStrategy()`` when none is named. PSAC (r = 1) rather than AUTO-S (gamma 0.01):
#: in ``benchmarks/utility.py``'s study (8 settings, learning rates chosen on a validation split and
#: scored out of sample) PSAC is within 2 standard errors of a tuned Abadi threshold in all 8, while
#: AUTO-S falls 1.9 +- 0.6 points short at epsilon 1, batch 256 on digits. Both need no threshold.
DEFAULT_CLIPPING: ClippingMode = "psac"
#: ``gamma`` when none is given. AUTO-S's is Bu et al.'s. PSAC's r = 1 was measured against r = 0.1 on
#: seven settings (``benchmarks/utility.py --grid psac_r``): 1.2 points better at epsilon 1 on digits,
#: a tie in five, 0.13 perplexity worse on the char LM (whose examples are never fit); its worst
#: shortfall against a tuned Abadi threshold is the smaller one.
DEFAULT_GAMMA: dict[str, float] = {"auto_s": 0.01, "psac": 1.0}


def resolve_gamma(clipping: str, gamma: float | None) -> float:
    """``gamma`` as given, or the mode's default when it is ``None`` (0.01 for modes without one)."""
    if gamma is not None:
        return gamma
    return DEFAULT_GAMMA.get(clipping, 0.01)


def validate_clipping(clipping: str, max_grad_norm: float, gamma: float) -> None:
    """Raise a ``ValueError`` naming the fix for an unusable clipping configuration."""
    if clipping not in CLIPPING_MODES:
        raise ValueError(
            f"Unknown clipping={clipping!r}. Use one of {', '.join(map(repr, CLIPPING_MODES))}: "
            "'psac' (default, R/(||g||+gamma/(||g||+gamma))), 'auto_s' (R/(||g||+gamma)), "
            "'auto_v' (R/||g||) or 'abadi' (min(1, R/||g||))."
        )
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}. It is the clipping bound R.")
    if clipping in DEFAULT_GAMMA and not gamma > 0:
        raise ValueError(
            f"gamma must be > 0 with clipping={clipping!r}, got {gamma}. Use the default "
            f"gamma={DEFAULT_GAMMA[clipping]:g}, or clipping='auto_v' for pure normalisation without a "
            "stability constant."
        )


def clip_factors(norms: Tensor, clipping: ClippingMode, max_grad_norm: float, gamma: float = 0.01) -> Tensor:
    """The factors ``C_i`` for per-example gradient norms ``norms`` (shape ``(b,)``).

    Example::

        >>> clip_factors(torch.tensor([0.5, 2.0]), "abadi", 1.0)
        tensor([1.0000, 0.5000])
    """
    norms = norms.to(torch.promote_types(norms.dtype, torch.float32))  # float64 norms stay float64
    if clipping == "auto_s":
        return max_grad_norm / (norms + gamma)
    if clipping == "psac":
        return max_grad_norm / (norms + gamma / (norms + gamma))
    if clipping == "auto_v":
        # An example with exactly zero gradient contributes nothing, not R/0.
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        return torch.where(norms > 0, max_grad_norm / safe, torch.zeros_like(norms))
    if clipping == "abadi":
        # Same form as Opacus's DPOptimizer.clip_and_accumulate.
        return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    raise ValueError(f"Unknown clipping mode {clipping!r}")
