"""Run-time checks of the first optimizer step: each one fails on a deliberately broken run."""

from __future__ import annotations

import math
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from lightning_autodp import DistributedPoissonBatchSampler, DPAutoStrategy, PrivacyBudget
from lightning_autodp.mechanism.noise import NoiseSource
from lightning_autodp.mechanism.step import PrivacyLedger
from lightning_autodp.safeguards.checks import (
    PrivacyCheckError,
    check_batch_size_plausible,
    check_noise_scale,
    check_rates_agree,
    noise_scale_interval,
)
from tests.models import Classifier, loader, quiet_trainer


def _data(n: int = 64, d: int = 16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 3))  # 1283 coordinates


def _fit(
    model: L.LightningModule,
    strategy: DPAutoStrategy | None = None,
    batch_size: int = 16,
    callbacks=(),
    n: int = 64,
    **trainer_kwargs,
) -> DPAutoStrategy:
    strategy = strategy or DPAutoStrategy(noise_multiplier=1.0)
    x, y = _data(n)
    trainer = quiet_trainer(strategy=strategy, max_steps=2, callbacks=list(callbacks), **trainer_kwargs)
    trainer.fit(model, loader(x, y, batch_size))
    return strategy


def test_correct_run_passes_all_checks():
    strategy = _fit(
        Classifier(_net()), callbacks=[PrivacyBudget(target_epsilon=50.0, delta=1e-5, accountant="rdp")]
    )
    assert strategy._checks is not None and strategy._checks.done


def test_small_noise_beside_large_clipped_sums_passes():
    """The noise is measured net of the clipped sum (here much larger than the noise)."""
    strategy = _fit(Classifier(_net()), DPAutoStrategy(noise_multiplier=0.01), batch_size=64)
    assert strategy._checks is not None and strategy._checks.done


# ---------------------------------------------------------------------------- 1. every trainable parameter


class UnfreezesAfterSetup(Classifier):
    """The adapter bug: a parameter frozen when dp_auto attached, unfrozen when training starts."""

    def __init__(self) -> None:
        net = _net()
        net[0].weight.requires_grad_(False)
        super().__init__(net)

    def on_train_start(self) -> None:
        self.net[0].weight.requires_grad_(True)


def test_parameter_unfrozen_after_setup_is_refused():
    with pytest.raises(PrivacyCheckError, match=r"'net\.0\.weight' is trainable.*neither clips nor noises"):
        _fit(UnfreezesAfterSetup())


def test_unused_parameter_without_noise_warns():
    model = Classifier(_net())
    model.unused = nn.Linear(2, 2)
    with pytest.warns(UserWarning, match=r"\['unused\.weight', 'unused\.bias'\] received no clipped"):
        _fit(model, DPAutoStrategy(noise_multiplier=0.0))


# ---------------------------------------------------------------------------- 2. the noise's scale


@pytest.mark.parametrize("factor", [0.0, 0.1, math.sqrt(2)])
def test_noise_of_the_wrong_scale_is_refused(monkeypatch, factor):
    """0: noise drawn but lost; 0.1: noise scaled down 10x; sqrt(2): a second rank's draw entering too."""
    gaussian = NoiseSource.gaussian
    monkeypatch.setattr(NoiseSource, "gaussian", lambda self, std, like: gaussian(self, std * factor, like))
    with pytest.raises(
        PrivacyCheckError, match=r"noise that entered the first step has std .* expected sigma \* R"
    ):
        _fit(Classifier(_net()))


def test_noise_scale_interval_matches_wilson_hilferty():
    """The chi-square interval against the Wilson-Hilferty normal approximation (independent)."""
    z = 4.8916  # two-sided 1e-6 normal quantile
    for n in (1000, 100_000):
        low, high = noise_scale_interval(n)
        c = 2 / (9 * n)
        assert low**2 == pytest.approx((1 - c - z * math.sqrt(c)) ** 3, rel=2e-3)
        assert high**2 == pytest.approx((1 - c + z * math.sqrt(c)) ** 3, rel=2e-3)
    rng = np.random.default_rng(0)
    draw = rng.standard_normal(10_000) * 2.0
    check_noise_scale(float((draw**2).sum()), draw.size, expected_std=2.0)
    with pytest.raises(PrivacyCheckError):
        check_noise_scale(float((draw**2).sum()), draw.size, expected_std=2.0 * 1.1)


# ---------------------------------------------------------------------------- 3. the parameters changed


class NoStepSGD(torch.optim.SGD):
    """An optimizer that runs the closure but never applies the update."""

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            return closure() if closure is not None else None


class NeverSteps(Classifier):
    def configure_optimizers(self):
        return NoStepSGD(self.parameters(), lr=0.1)


def test_update_that_changes_nothing_is_refused():
    with pytest.raises(
        PrivacyCheckError, match=r"'net\.0\.weight' received a private gradient.*did not change"
    ):
        _fit(NeverSteps(_net()))


def test_zero_learning_rate_is_not_an_error():
    _fit(Classifier(_net(), lr=0.0))


# ---------------------------------------------------------------------------- 4. the sampling rate


def test_sampler_that_ignores_q_is_refused(monkeypatch):
    """The sampler reports rate q but draws at q/4."""

    def quarter_rate(self):
        for _ in range(self.steps_per_epoch):
            yield self._shard[torch.rand(len(self._shard)) < self.sample_rate / 4].tolist()

    monkeypatch.setattr(DistributedPoissonBatchSampler, "__iter__", quarter_rate)
    with pytest.raises(
        PrivacyCheckError, match=r"the first step used \d+ examples.*does not draw at the accounted"
    ):
        _fit(Classifier(_net()), batch_size=100, n=400)


def test_accounted_rate_must_be_the_sampled_one(monkeypatch):
    """The accountant is told another q than the one the sampler uses."""

    record = PrivacyLedger.record

    def record_half_the_rate(self, sigma, q):
        record(self, sigma, q / 2)

    monkeypatch.setattr(PrivacyLedger, "record", record_half_the_rate)
    budget = PrivacyBudget(target_epsilon=50.0, delta=1e-5, accountant="rdp")
    with pytest.raises(PrivacyCheckError, match=r"accountant records \(sigma=1, q=0\.125\).*q=0\.25"):
        _fit(Classifier(_net()), callbacks=[budget])


def test_rate_and_batch_size_functions():
    check_rates_agree(0.25, 0.25, [(1.0, 0.25)], 1.0)
    with pytest.raises(PrivacyCheckError, match="sampler draws at rate 0.5"):
        check_rates_agree(0.25, 0.5, [], 1.0)
    with pytest.raises(PrivacyCheckError, match=r"sigma=2"):
        check_rates_agree(0.25, 0.25, [(2.0, 0.25)], 1.0)
    check_batch_size_plausible(100, 400, 0.25)  # the mean
    check_batch_size_plausible(70, 400, 0.25)  # 3.5 standard deviations
    with pytest.raises(PrivacyCheckError):
        check_batch_size_plausible(50, 400, 0.25)  # 5.8 standard deviations


def test_checks_can_be_turned_off(monkeypatch):
    gaussian = NoiseSource.gaussian
    monkeypatch.setattr(NoiseSource, "gaussian", lambda self, std, like: gaussian(self, std * 0.1, like))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy = _fit(Classifier(_net()), DPAutoStrategy(noise_multiplier=1.0, run_checks=False))
    assert strategy._checks is None
