"""Run-time checks of the first optimizer step: each one fails on a deliberately broken run."""

from __future__ import annotations

import math
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from lightning_autodp import (
    DistributedPoissonBatchSampler,
    DPAutoStrategy,
    PrivacyBudget,
    StepContext,
    StepObserver,
)
from lightning_autodp.mechanism.clipping import resolve_gamma
from lightning_autodp.mechanism.noise import NoiseSource
from lightning_autodp.mechanism.step import DPStep, PrivacyLedger
from lightning_autodp.safeguards.checks import (
    PrivacyCheckError,
    RunTimeChecks,
    check_batch_size_plausible,
    check_clipping_bound,
    check_noise_scale,
    check_rates_agree,
    chernoff_p_value,
    look_level,
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
    assert strategy.mechanism.checks is not None and strategy.mechanism.checks.done


def test_small_noise_beside_large_clipped_sums_passes():
    """The noise is measured net of the clipped sum (here much larger than the noise)."""
    strategy = _fit(Classifier(_net()), DPAutoStrategy(noise_multiplier=0.01), batch_size=64)
    assert strategy.mechanism.checks is not None and strategy.mechanism.checks.done


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
    assert strategy.mechanism.checks is None


# ---------------------------------------------------------------------------- later steps (looks)


def test_look_levels_spend_at_most_the_false_alarm_rate():
    """sum_j 6 alpha / (pi^2 j^2) = alpha (Basel): a million looks spend just under alpha."""
    spent = math.fsum(look_level(j, 0.01) for j in range(1, 1_000_001))
    assert 0.01 * (1 - 1e-5) < spent <= 0.01


def _sequential_false_alarm(level, runs=4000, looks=30, every=10, n=1000, q=0.05, seed=0) -> float:
    """Share of correct runs (Poisson sampling at q) that a sequential sample-size test stops."""
    rng = np.random.default_rng(seed)
    draws = rng.binomial(n, q, size=(runs, looks * every)).cumsum(axis=1)[:, every - 1 :: every]
    steps = np.arange(1, looks + 1) * every
    p = np.minimum(
        1.0, 2 * np.minimum(stats.binom.cdf(draws, steps * n, q), stats.binom.sf(draws - 1, steps * n, q))
    )
    levels = np.array([level(j) for j in range(1, looks + 1)])
    return float((p < levels).any(axis=1).mean())


def test_sequential_sample_size_test_keeps_its_false_alarm_bound():
    """Simulated correct runs at alpha = 0.05 (large enough to count): the spent levels stay below
    alpha over 30 looks; testing every look at alpha itself (the mutation) does not."""
    alpha = 0.05
    spent = _sequential_false_alarm(lambda j: look_level(j, alpha))
    assert spent <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / 4000)
    unspent = _sequential_false_alarm(lambda j: alpha)
    assert unspent > 2 * alpha


@pytest.mark.parametrize("clipping", ["auto_s", "psac", "auto_v", "abadi"])
def test_clipping_probe_passes_every_mode_and_catches_unclipped_weights(monkeypatch, clipping):
    params = [nn.Parameter(torch.zeros(4))]
    step = DPStep(params, clipping, max_grad_norm=2.0, gamma=resolve_gamma(clipping, None))
    check_clipping_bound(step, 2.0)
    monkeypatch.setattr(DPStep, "clip_weights", lambda self, engine, scale, check_finite=True: torch.ones(7))
    with pytest.raises(PrivacyCheckError, match=r"gradient norm 2000 enters the clipped sum with norm 2000"):
        check_clipping_bound(step, 2.0)


def _wide_fit(factor: float, steps: int = 81) -> DPAutoStrategy:
    """16-512-3 (10 243 coordinates; a look tests 5122), noise std times ``factor`` from step 2, a look
    every 10 steps."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 512), nn.Tanh(), nn.Linear(512, 3))
    gaussian = NoiseSource.gaussian

    def scaled(self, std, like):
        return gaussian(self, std * (factor if self._step >= 1 else 1.0), like)

    checks = RunTimeChecks(check_every=10)
    strategy = DPAutoStrategy(noise_multiplier=1.0, clipping="psac", seed=0, run_checks=checks)
    x, y = _data(512)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(NoiseSource, "gaussian", scaled)
        quiet_trainer(strategy=strategy, max_steps=steps).fit(Classifier(net), loader(x, y, 64))
    return strategy


def test_a_small_noise_deficit_is_caught_by_the_pooled_looks():
    """Noise 5% short from step 2 on: too little for one look's ~3400 coordinates at its level, caught
    once the looks' evidence is pooled."""
    with pytest.raises(PrivacyCheckError, match=r"noise that entered the \d looks up to step \d+ \(pooled\)"):
        _wide_fit(0.95)


def test_looks_pass_a_correct_run():
    strategy = _wide_fit(1.0)
    assert strategy.mechanism.checks is not None and strategy.mechanism.checks.noise_looks == 8


# ---------------------------------------------------------------------------- the observer protocol


class Recorder(StepObserver):
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.examples: list[int] = []
        self.contexts: list[StepContext] = []

    def on_fit_start(self, ctx):
        self.calls.append("fit")

    def contribute(self, ctx):
        self.calls.append("contribute")
        self.contexts.append(ctx)

    def before_noise(self, ctx):
        self.calls.append("before_noise")

    def on_batch_sampled(self, ctx, examples):
        self.calls.append("sampled")
        self.examples.append(examples)

    def after_privatize(self, ctx, divisor, examples):
        self.calls.append("privatized")

    def after_step(self, ctx, optimizer):
        self.calls.append("stepped")


class CountsExamples(Classifier):
    def __init__(self, net):
        super().__init__(net)
        self.seen = 0

    def training_step(self, batch, batch_idx):
        self.seen += len(batch[0])
        return super().training_step(batch, batch_idx)


def test_observers_see_every_step_in_order():
    recorder = Recorder()
    strategy = DPAutoStrategy(noise_multiplier=1.0, clipping="psac", observers=[recorder], verify=False)
    model = CountsExamples(_net())
    _fit(model, strategy)
    one_step = ["contribute", "before_noise", "sampled", "privatized", "stepped"]
    assert recorder.calls == ["fit", *one_step, *one_step]
    assert sum(recorder.examples) == model.seen  # what the sampler drew is what trained
    ctx = recorder.contexts[-1]
    assert ctx.sampler is strategy.poisson_sampler and ctx.sampler.sample_rate == strategy.sample_rate
    assert (ctx.step, ctx.fit_step, ctx.sigma, ctx.dataset_size) == (1, 1, 1.0, 64)
    assert strategy.observers == [recorder, strategy.mechanism.checks]
    strategy.remove_observer(recorder)
    assert strategy.observers == [strategy.mechanism.checks]


def test_add_observer_takes_step_observers_only():
    with pytest.raises(TypeError, match="add_observer takes a lightning_autodp.StepObserver, got function"):
        DPAutoStrategy(observers=[lambda ctx: None])


def test_chernoff_p_value_bounds_the_exact_binomial_p_value():
    """The cheap bound used at every look is never below scipy's exact two-sided p-value, so testing it
    against a level keeps that level; and it is close enough to catch 1.25q (z ~ 6 here)."""
    trials, q = 10 * 1437, 0.089
    for k in range(900, 1700, 7):
        exact = min(1.0, 2 * min(stats.binom.cdf(k, trials, q), stats.binom.sf(k - 1, trials, q)))
        assert chernoff_p_value(k, trials, q) >= exact * (1 - 1e-9)
    assert chernoff_p_value(round(1.25 * q * trials), trials, q) < look_level(1)
