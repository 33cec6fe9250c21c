"""DPAdamBC: Adam with the DP noise variance subtracted from its second moment."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_autodp import DPAutoStrategy
from lightning_autodp.mechanism.optim import DPAdamBC
from tests.models import Classifier, loader, make_case, quiet_trainer

BETAS = (0.9, 0.999)


def _gradients(steps: int, shape: tuple[int, ...], s: float, seed: int = 0) -> list[torch.Tensor]:
    """Noisy gradients as a DP step hands them over: a small signal plus N(0, s^2) per coordinate."""
    g = torch.Generator().manual_seed(seed)
    signal = 0.3 * s * torch.randn(shape, generator=g, dtype=torch.float64)
    signal[0] = 3 * s  # one coordinate whose signal exceeds the noise: the floor does not bind there
    return [signal + s * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(steps)]


def _reference(grads, lr, s, kappa, eps=1e-8):
    """The update rule, written out per coordinate in float64 (a plain loop over scalars)."""
    theta = [0.0] * grads[0].numel()
    m = [0.0] * len(theta)
    v = [0.0] * len(theta)
    floored = set()
    for t, grad in enumerate(grads, start=1):
        for j, gj in enumerate(grad.flatten().tolist()):
            m[j] = BETAS[0] * m[j] + (1 - BETAS[0]) * gj
            v[j] = BETAS[1] * v[j] + (1 - BETAS[1]) * gj * gj
            m_hat, v_hat = m[j] / (1 - BETAS[0] ** t), v[j] / (1 - BETAS[1] ** t)
            corrected = v_hat - s * s
            if corrected < kappa * s * s:
                corrected = kappa * s * s
                floored.add(j)
            theta[j] -= lr * m_hat / (math.sqrt(corrected) + eps)
    return torch.tensor(theta, dtype=torch.float64).reshape(grads[0].shape), floored


def _run(grads, **kwargs) -> torch.Tensor:
    p = torch.nn.Parameter(torch.zeros_like(grads[0]))
    opt = DPAdamBC([p], **kwargs)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("s", [0.05, 2.0])
def test_update_equals_the_rule_written_out_per_coordinate(s):
    grads = _gradients(30, (40,), s)
    expected, floored = _reference(grads, lr=1e-2, s=s, kappa=0.01)
    assert 0 < len(floored) < 40  # the floor binds for some coordinates, not for all
    got = _run(grads, noise_std=s, lr=1e-2, min_variance_ratio=0.01)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)


def test_without_the_subtraction_the_update_differs(monkeypatch):
    # Mutation: an optimizer that forgets to take the noise variance out (plain Adam) is caught.
    grads = _gradients(30, (40,), 0.5)
    expected, _ = _reference(grads, lr=1e-2, s=0.5, kappa=0.01)
    monkeypatch.setattr(DPAdamBC, "noise_variance", lambda self: 0.0)
    got = _run(grads, noise_std=0.5, lr=1e-2, min_variance_ratio=0.01)
    assert not torch.allclose(got, expected, rtol=1e-3)


def test_without_noise_it_is_torch_adam():
    grads = _gradients(20, (3, 5), 0.1)
    p = torch.nn.Parameter(torch.zeros(3, 5, dtype=torch.float64))
    adam = torch.optim.Adam([p], lr=1e-2, betas=BETAS, eps=1e-8)
    for g in grads:
        p.grad = g.clone()
        adam.step()
    torch.testing.assert_close(_run(grads, noise_std=0.0, lr=1e-2), p.detach(), rtol=1e-12, atol=1e-14)


def test_the_update_does_not_depend_on_the_scale_r():
    # Under automatic clipping gradient and noise both scale with R; Adam's update does not, nor this one.
    grads = _gradients(25, (30,), 0.2)
    one = _run(grads, noise_std=0.2, lr=1e-2, eps=0.0)
    hundred = _run([100 * g for g in grads], noise_std=20.0, lr=1e-2, eps=0.0)
    torch.testing.assert_close(one, hundred, rtol=1e-9, atol=0)


def test_a_callable_noise_std_is_read_at_every_step():
    calls = []
    p = torch.nn.Parameter(torch.zeros(4))
    opt = DPAdamBC([p], noise_std=lambda: calls.append(1) or 0.1, lr=1e-3)
    for _ in range(3):
        p.grad = torch.ones(4)
        opt.step()
    assert len(calls) == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_std": -1.0}, "noise_std must be a number >= 0"),
        ({"noise_std": "auto"}, "noise_std=lambda: trainer.strategy.noise_std"),
        ({"noise_std": 0.1, "min_variance_ratio": 0.0}, "min_variance_ratio must be > 0"),
        ({"noise_std": 0.1, "lr": 0.0}, "lr must be > 0"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPAdamBC([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_a_callable_returning_no_number_is_refused_at_the_step():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = DPAdamBC([p], noise_std=lambda: None, lr=1e-3)
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="noise_std must be a number"):
        opt.step()


class _BCClassifier(Classifier):
    def configure_optimizers(self):
        self.bc = DPAdamBC(self.parameters(), noise_std=lambda: self.trainer.strategy.noise_std, lr=1e-2)
        return self.bc


def test_with_dp_auto_the_optimizer_sees_sigma_r_over_b():
    net, x, y = make_case("linear", n=64)
    strategy = DPAutoStrategy(noise_multiplier=1.3, max_grad_norm=0.5)
    with pytest.raises(RuntimeError, match="noise_std is known once sigma is"):
        _ = DPAutoStrategy().noise_std  # sigma not resolved before the fit
    model = _BCClassifier(net)
    quiet_trainer(strategy=strategy, max_steps=2).fit(model, loader(x, y, batch_size=16))
    # Poisson sampling at q = 16 / 64: B = qN = 16 (an independent computation of sigma R / B)
    assert strategy.noise_std == pytest.approx(1.3 * 0.5 / 16)
    assert model.bc.noise_variance() == pytest.approx((1.3 * 0.5 / 16) ** 2)
    assert all(model.bc.state[p]["step"] == 2 for p in model.parameters())
