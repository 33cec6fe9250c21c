"""Faults planted in the code that trains, and what catches each: verification, run-time checks, audit.

Each fault is applied by monkeypatching the mechanism's own code (the code the update uses), so a
test passes only if a safeguard sees the fault in what the update really did:

* ``noise_x0.1_from_step_2``: ``NoiseSource.gaussian`` draws a tenth of the noise from the second
  step of the run on;
* ``clip_weights_x10``: ``DPStep.clip_weights`` returns ten times the clipping weights;
* ``sampler_at_1.25q``: ``DistributedPoissonBatchSampler.inclusion_mask`` draws at 1.25 q while the
  sampler (and the accountant) report q.

The table of docs/concepts/safeguards.md is read from these tests.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_autodp import DistributedPoissonBatchSampler, DPAutoStrategy
from lightning_autodp.mechanism.noise import NoiseSource
from lightning_autodp.mechanism.step import DPStep
from lightning_autodp.safeguards.checks import PrivacyCheckError, RunTimeChecks
from tests.models import Classifier, loader, quiet_trainer
from tests.test_audit import _claimed_epsilon, audited_run

FAULTS = ("noise_x0.1_from_step_2", "clip_weights_x10", "sampler_at_1.25q")


def plant(monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    if fault == "noise_x0.1_from_step_2":
        gaussian = NoiseSource.gaussian

        def weak_after_first(self, std, like):
            return gaussian(self, std * (0.1 if self._step >= 1 else 1.0), like)

        monkeypatch.setattr(NoiseSource, "gaussian", weak_after_first)
    elif fault == "clip_weights_x10":
        clip_weights = DPStep.clip_weights
        monkeypatch.setattr(DPStep, "clip_weights", lambda self, *a, **k: 10 * clip_weights(self, *a, **k))
    elif fault == "sampler_at_1.25q":

        def fast(self, generator, size=None):
            size = len(self._shard) if size is None else size
            return torch.rand(size, generator=generator) < 1.25 * self.sample_rate

        monkeypatch.setattr(DistributedPoissonBatchSampler, "inclusion_mask", fast)
    else:
        raise KeyError(fault)


def _checked_fit(steps: int = 31, n: int = 512, batch: int = 64) -> DPAutoStrategy:
    """A run with the run-time checks on, a look every 10 steps: qN = 64 per step, sigma = 1, psac."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 16, generator=g), torch.randint(0, 3, (n,), generator=g)
    net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 3))
    checks = RunTimeChecks(check_every=10)
    strategy = DPAutoStrategy(noise_multiplier=1.0, clipping="psac", seed=0, run_checks=checks)
    quiet_trainer(strategy=strategy, max_steps=steps).fit(Classifier(net), loader(x, y, batch))
    return strategy


#: the message each fault stops a checked run with (the step is where it is seen)
CHECK_MESSAGES = {
    "noise_x0.1_from_step_2": r"noise that entered step 11 of this fit has std .* 0\.1\d* times the expected",
    "clip_weights_x10": r"an example with gradient norm .* enters the clipped sum with norm .* above the "
    r"clipping bound R = 1",
    "sampler_at_1.25q": r"the 11 steps so far drew \d+ examples, a rate of 0\.1[4-6]\d* per example and "
    r"step, but the accounted q = 0\.125",
}


def test_a_correct_run_passes_every_look():
    strategy = _checked_fit()
    checks = strategy.mechanism.checks
    assert checks is not None and checks.done
    assert checks.noise_looks == 3 and checks.sample_looks == 3  # steps 11, 21, 31


@pytest.mark.parametrize("fault", FAULTS)
def test_run_time_checks_catch(monkeypatch, fault):
    plant(monkeypatch, fault)
    with pytest.raises(PrivacyCheckError, match=CHECK_MESSAGES[fault]):
        _checked_fit()


@pytest.mark.parametrize("fault", FAULTS)
def test_the_audit_catches(monkeypatch, fault):
    """The audit alone (verification and run-time checks off): its canaries are clipped, noised and
    sampled by the same code as the data, so each fault shows in the canaries."""
    audit = audited_run(monkeypatch, mutation=None, plant=lambda: plant(monkeypatch, fault))
    result = audit.result
    assert result is not None
    if fault == "sampler_at_1.25q":
        assert result.sampling_violated and result.sampled_rate > 1.15 * result.accounted_rate
        assert "sampler: canaries drawn at rate" in result.summary() and "VIOLATED" in result.summary()
    else:
        assert result.epsilon_lower_bound > _claimed_epsilon()


@pytest.mark.parametrize("verify, run_checks", [(True, False), (False, True)])
def test_verification_and_checks_each_probe_the_clipping_weights(monkeypatch, verify, run_checks):
    """Beside the engine, verification probes the step's own clip_weights before the first update;
    with verification off, the first step's checks do, before the noise: nothing is released."""
    plant(monkeypatch, "clip_weights_x10")
    strategy = DPAutoStrategy(
        noise_multiplier=1.0, clipping="psac", seed=0, verify=verify, run_checks=run_checks
    )
    x, y = torch.randn(64, 16), torch.randint(0, 3, (64,))
    with pytest.raises(PrivacyCheckError, match=CHECK_MESSAGES["clip_weights_x10"]):
        quiet_trainer(strategy=strategy, max_steps=2).fit(Classifier(nn.Linear(16, 3)), loader(x, y, 16))
    assert strategy.steps == 0
    assert strategy.verification_pending is verify  # verification raised before it was done


def test_default_checks_catch_a_sampler_at_one_and_a_quarter_q_at_digits_size(monkeypatch):
    """At the audit example's size (N = 1437, batch 128, qN = 128) and the default look every 25 steps,
    a sampler at 1.25 q is stopped at the first look."""
    plant(monkeypatch, "sampler_at_1.25q")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1437, 64, generator=g), torch.randint(0, 10, (1437,), generator=g)
    net = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
    strategy = DPAutoStrategy(noise_multiplier=1.0, clipping="psac", seed=0)
    with pytest.raises(PrivacyCheckError, match=r"the 26 steps so far drew \d+ examples"):
        quiet_trainer(strategy=strategy, max_steps=60).fit(Classifier(net), loader(x, y, 128))
    assert strategy.steps == 26
