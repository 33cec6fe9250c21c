"""The accountant wrapper against Opacus's accountants driven step by step, as Opacus users do."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from lightning_autodp.mechanism.accounting import Accountant, merge_segments

OPACUS = {"prv": PRVAccountant, "rdp": RDPAccountant}
DELTA = 1e-5


def opacus_epsilon(name: str, segments: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    """Epsilon from an Opacus accountant that saw every step through ``accountant.step``."""
    accountant = OPACUS[name]()
    for sigma, q, steps in segments:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


@pytest.mark.parametrize("name", ["prv", "rdp"])
@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.0, 0.01, 300), (0.7, 0.05, 120), (2.0, 0.004, 1000)])
def test_epsilon_matches_opacus(name, sigma, q, steps):
    ours = Accountant(name, DELTA).epsilon([(sigma, q, steps)])
    assert ours == pytest.approx(opacus_epsilon(name, [(sigma, q, steps)]), rel=1e-9)


@pytest.mark.parametrize("name", ["prv", "rdp"])
def test_history_with_changing_sigma_and_q_matches_opacus(name):
    segments = [(1.0, 0.02, 50), (1.3, 0.02, 40), (1.3, 0.05, 30)]
    ours = Accountant(name, DELTA).epsilon(segments)
    assert ours == pytest.approx(opacus_epsilon(name, segments), rel=1e-9)


def test_prv_is_tighter_than_rdp():
    # Two accountants of different construction must agree on the order of magnitude, PRV tighter.
    segments = [(1.0, 0.01, 500)]
    prv, rdp = Accountant("prv").epsilon(segments), Accountant("rdp").epsilon(segments)
    assert 0.5 * rdp < prv < rdp


def test_split_history_is_accounted_like_the_uninterrupted_one():
    assert merge_segments([(1.0, 0.1, 5), (1.0, 0.1, 0), (1.0, 0.1, 7)]) == [(1.0, 0.1, 12)]
    acc = Accountant("prv")
    assert acc.epsilon([(1.0, 0.1, 5), (1.0, 0.1, 7)]) == acc.epsilon([(1.0, 0.1, 12)])


def test_no_noise_is_infinite_and_no_step_is_zero():
    acc = Accountant("rdp")
    assert acc.epsilon([]) == 0.0
    assert acc.epsilon([(1.0, 0.1, 0)]) == 0.0
    assert math.isinf(acc.epsilon([(0.0, 0.1, 3)]))


@pytest.mark.parametrize("name", ["prv", "rdp"])
def test_max_steps_is_the_last_step_within_target(name):
    sigma, q, target = 1.0, 0.02, 1.5
    t = Accountant(name, DELTA).max_steps([], sigma, q, target, horizon=5000)
    assert 0 < t < 5000
    assert opacus_epsilon(name, [(sigma, q, t)]) <= target < opacus_epsilon(name, [(sigma, q, t + 1)])


def test_max_steps_counts_what_was_spent_before():
    acc = Accountant("rdp", DELTA)
    done = [(1.5, 0.02, 200)]
    t = acc.max_steps(done, 1.0, 0.02, 2.0, horizon=5000)
    assert (
        opacus_epsilon("rdp", [*done, (1.0, 0.02, t)])
        <= 2.0
        < opacus_epsilon("rdp", [*done, (1.0, 0.02, t + 1)])
    )
    assert t < acc.max_steps([], 1.0, 0.02, 2.0, horizon=5000)


@pytest.mark.parametrize("name", ["prv", "rdp"])
@pytest.mark.parametrize(("target", "q", "steps"), [(3.0, 0.01, 600), (1.0, 0.05, 100), (8.0, 0.004, 2000)])
def test_calibration_lands_within_one_percent_under_target(name, target, q, steps):
    sigma = Accountant(name, DELTA).calibrate_noise_multiplier([], q=q, steps=steps, target_epsilon=target)
    reached = opacus_epsilon(name, [(sigma, q, steps)])
    assert 0.99 * target <= reached <= target


def test_calibration_refuses_a_spent_budget():
    acc = Accountant("rdp", DELTA)
    done = [(0.8, 0.1, 500)]
    with pytest.raises(ValueError, match="already spent"):
        acc.calibrate_noise_multiplier(done, q=0.1, steps=10, target_epsilon=acc.epsilon(done) * 0.5)


def test_bad_accountant_and_delta():
    with pytest.raises(ValueError, match="Unknown accountant"):
        Accountant("gdp")
    with pytest.raises(ValueError, match=r"delta must lie in \(0, 1\)"):
        Accountant("rdp", delta=1.0)
