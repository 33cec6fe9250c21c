r"""DP-Adam with the noise variance taken out of its second moment (opt-in).

Under DP the gradient handed to the optimizer is :math:`\tilde g = \bar g + n` with
:math:`\bar g = \frac1B \sum_i C_i g_i` and noise :math:`n \sim N(0, s^2 I)`, :math:`s = \sigma R / B`,
independent of :math:`\bar g`. Adam's second moment estimates
:math:`E[\tilde g^2] = \bar g^2 + s^2` per coordinate; where :math:`s^2` dominates (as it does for
most coordinates of a DP run) every coordinate's denominator is about :math:`s` and Adam takes the
step of SGD with learning rate :math:`\mathrm{lr}/s`. DP-AdamBC (Tang et al. 2024) subtracts the
known :math:`s^2`:

.. math::

    m_t = \beta_1 m_{t-1} + (1-\beta_1)\tilde g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1-\beta_2)\tilde g_t^2, \qquad
    \hat m_t = \frac{m_t}{1-\beta_1^t}, \quad \hat v_t = \frac{v_t}{1-\beta_2^t}

.. math::

    \theta_t = \theta_{t-1} - \mathrm{lr}\,
        \frac{\hat m_t}{\sqrt{\max(\hat v_t - s^2,\ \kappa s^2)} + \epsilon}

The floor :math:`\kappa s^2` (``min_variance_ratio`` :math:`= \kappa`) bounds the step of a
coordinate whose estimate of :math:`\bar g^2` is at or below the estimate's own noise (at
:math:`\beta_2 = 0.999` the standard deviation of :math:`\hat v_t` is about :math:`0.03\,s^2`),
to :math:`1/\sqrt\kappa` times Adam's. As a multiple of :math:`s^2` it scales with :math:`R^2` like
every other term, so :math:`R` still drops out of the update under automatic clipping. With
:math:`s = 0` this is Adam.

Nothing here touches privacy: the optimizer only post-processes the privatized gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class DPAdamBC(torch.optim.Optimizer):
    """Adam whose second moment has the DP noise variance ``noise_std ** 2`` subtracted.

    Args:
        params: the parameters (or parameter groups) to optimise.
        noise_std: :math:`s = \\sigma R / B`, the standard deviation of the noise per coordinate of
            the gradient the optimizer receives; a float, or a callable returning it at each step
            (``lambda: trainer.strategy.noise_std`` with ``dp_auto``, whose sigma is known only once
            the fit starts).
        lr, betas, eps: as for :class:`torch.optim.Adam`.
        min_variance_ratio: :math:`\\kappa`, the floor of the corrected second moment as a fraction
            of :math:`s^2`.

    Example::

        def configure_optimizers(self):
            return DPAdamBC(self.parameters(), noise_std=lambda: self.trainer.strategy.noise_std, lr=1e-3)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        noise_std: float | Callable[[], float],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        min_variance_ratio: float = 0.01,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}.")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}.")
        if not min_variance_ratio > 0:
            raise ValueError(
                f"min_variance_ratio must be > 0, got {min_variance_ratio}: without a floor a coordinate "
                "whose second moment falls below the noise variance would take an unbounded step."
            )
        if not callable(noise_std):
            _check_noise_std(noise_std)
        self._noise_std = noise_std
        defaults = {"lr": lr, "betas": betas, "eps": eps, "min_variance_ratio": min_variance_ratio}
        super().__init__(params, defaults)

    def noise_variance(self) -> float:
        """:math:`s^2` for the coming step."""
        s = self._noise_std() if callable(self._noise_std) else self._noise_std
        _check_noise_std(s)
        return float(s) ** 2

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        s2 = self.noise_variance()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m / (1 - beta1**t)
                v_hat = v / (1 - beta2**t)
                # max(v_hat - s^2, kappa s^2); with s = 0 the floor is 0 and this is Adam's denominator
                denom = (v_hat - s2).clamp_min(group["min_variance_ratio"] * s2).sqrt_().add_(group["eps"])
                p.addcdiv_(m_hat, denom, value=-group["lr"])
        return loss


def _check_noise_std(s: Any) -> None:
    if not (isinstance(s, (int, float)) and not isinstance(s, bool) and s >= 0):
        raise ValueError(
            f"noise_std must be a number >= 0 (sigma * R / B of the DP step), got {s!r}. With dp_auto pass "
            "noise_std=lambda: trainer.strategy.noise_std (sigma is known once the fit starts)."
        )
