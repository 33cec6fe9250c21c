"""Bad inputs a new user meets first: each is answered before training by a message naming the fix."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from scipy import optimize, stats
from torch import nn

from lightning_autodp import DPAutoStrategy, PrivacyBudget
from lightning_autodp.mechanism.accounting import Accountant
from tests.models import Classifier, loader, quiet_trainer


def _fit(n: int = 64, batch: int = 16, net: nn.Module | None = None, callbacks=(), **strategy_kwargs):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 16, generator=g), torch.randint(0, 3, (n,), generator=g)
    strategy = DPAutoStrategy(clipping="psac", **strategy_kwargs)
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, callbacks=list(callbacks))
    trainer.fit(Classifier(net if net is not None else nn.Linear(16, 3)), loader(x, y, batch))
    return strategy


def _opacus_prv(sigma: float, q: float, steps: int, delta: float) -> float:
    accountant = PRVAccountant()
    accountant.history = [(sigma, q, steps)]
    return accountant.get_epsilon(delta=delta)


# ---------------------------------------------------------------------------- small target epsilons


@pytest.mark.parametrize("target", [0.01, 0.05])
def test_prv_calibration_reaches_epsilons_below_the_rdp_floor(target):
    """RDP cannot certify these (its epsilon stays above ~0.1 here), PRV can: the calibration no longer
    depends on RDP's first guess. Checked against Opacus's PRV accountant called directly."""
    q, steps = 0.25, 4
    with pytest.raises(ValueError, match="No noise_multiplier below 1e6"):
        Accountant("rdp", 1e-5).calibrate_noise_multiplier([], q, steps, target)
    strategy = _fit(callbacks=[PrivacyBudget(target_epsilon=target, delta=1e-5)])
    sigma = float(strategy.noise_multiplier)
    assert _opacus_prv(sigma, q, steps, 1e-5) <= target
    if target > 0.01:  # 0.01 sits at PRV's floor (0.00999 for every large sigma): no smallest sigma
        assert _opacus_prv(sigma * 0.97, q, steps, 1e-5) > target  # the smallest such sigma, to 3%


def test_epsilon_below_every_accountant_names_the_fix():
    message = (
        "PrivacyBudget cannot reach target_epsilon=0.001 at delta=1e-05 over 4 steps with q=0.25: No "
        "noise_multiplier below 1e6 reaches epsilon=0.001: the prv accountant reports 0.00999 at delta=1e-05 "
        "even with sigma=1e6. Spend less per run: more training data or a smaller batch (both lower q), "
        "fewer epochs or max_steps, or a larger target_epsilon or delta. Whatever the noise, the PRV "
        "accountant reports no epsilon below about 0.01 and RDP none below about 0.1 at delta=1e-5."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        _fit(callbacks=[PrivacyBudget(target_epsilon=0.001, delta=1e-5)])


# ---------------------------------------------------------------------------- a delta that is too large


def test_large_delta_warns_and_calibrates_without_a_math_error():
    with pytest.warns(UserWarning) as record:
        strategy = _fit(callbacks=[PrivacyBudget(target_epsilon=3.0, delta=0.5)])
    messages = [str(w.message) for w in record]
    assert (
        "PrivacyBudget(delta=0.5) is not below 1/N = 0.0156 (N=64 examples): such a delta allows releasing "
        "whole examples. Choose delta well below 1/N, e.g. 1/(10 N)."
    ) in messages
    assert 0 < _opacus_prv(float(strategy.noise_multiplier), 0.25, 4, 0.5) <= 3.0


@pytest.mark.parametrize("name, raw", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_is_never_negative(name, raw):
    """At a large delta the accountants' conversions go below 0; a mechanism is then (0, delta)-DP."""
    accountant = raw()
    accountant.history = [(16.0, 0.25, 4)]
    assert accountant.get_epsilon(delta=0.5) < 0  # what Opacus returns
    assert Accountant(name, 0.5).epsilon([(16.0, 0.25, 4)]) == 0.0


# ---------------------------------------------------------------------------- nothing to train


def test_model_without_trainable_parameters_is_refused_before_verification():
    net = nn.Linear(16, 3).requires_grad_(False)
    message = (
        "Classifier has no trainable parameter (every parameter has requires_grad=False): dp_auto has "
        "nothing to train privately. Unfreeze the parameters to train (p.requires_grad_(True), e.g. a head "
        "or adapters) before Trainer.fit."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        _fit(net=net)


# ---------------------------------------------------------------------------- q = 1


def _gaussian_mechanism_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon of one Gaussian mechanism with sensitivity 1 (Balle and Wang 2018, Thm. 8)."""

    def excess(eps: float) -> float:
        a = 1 / (2 * sigma)
        return stats.norm.cdf(a - eps * sigma) - math.exp(eps) * stats.norm.cdf(-a - eps * sigma) - delta

    return optimize.brentq(excess, 0.0, 100.0)


@pytest.mark.parametrize("n, batch", [(10, 16), (1, 1)])
def test_q_of_one_warns_that_sampling_does_not_amplify(n, batch):
    message = (
        f"dp_auto: the logical batch (batch_size * accumulate_grad_batches * devices = {batch}) is not "
        f"smaller than the training set (N = {n}), so q = 1: every example enters every step, there is no "
        "amplification by sampling, and each step spends the privacy of the full Gaussian mechanism. Use a "
        "batch_size well below N (q = batch / N of 0.01 or less is usual) or more training data."
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        strategy = _fit(n=n, batch=batch, callbacks=[PrivacyBudget(target_epsilon=3.0, delta=1e-5)])
    texts = [str(w.message) for w in record]
    assert message in texts
    assert not [w for w in record if issubclass(w.category, RuntimeWarning)]  # no numpy divide-by-zero
    # one step at q = 1 is one Gaussian mechanism: the accounted epsilon is its exact epsilon
    sigma = float(strategy.noise_multiplier)
    accounted = Accountant("prv", 1e-5).epsilon([(sigma, 1.0, 1)])
    assert accounted == pytest.approx(_gaussian_mechanism_epsilon(sigma, 1e-5), abs=0.02)
