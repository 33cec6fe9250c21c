"""The start and end-of-fit lines, and PrivacyBudget's messages about the run length and an early stop.

Every epsilon printed is checked against Opacus's accountant stepped here (tests.test_accounting).
"""

from __future__ import annotations

import logging
import math
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_autodp import DPAutoStrategy, PrivacyBudget
from lightning_autodp.integration import summary
from tests.models import Classifier, loader, make_case, quiet_trainer
from tests.test_accounting import opacus_epsilon

N, BATCH = 64, 8  # q = 1/8, 8 steps per epoch
Q = BATCH / N


def _fit(budget=None, sigma=1.0, monkeypatch=None, **trainer_kwargs):
    """Fit a tiny model under dp_auto; returns (strategy, lines printed by integration.summary)."""
    lines: list[str] = []
    if monkeypatch is not None:
        monkeypatch.setattr(summary, "rank_zero_info", lines.append)
    L.seed_everything(0, verbose=False)
    torch.manual_seed(0)
    net, x, y = make_case("linear", n=N)
    strategy = DPAutoStrategy(noise_multiplier=sigma)
    trainer = quiet_trainer(
        strategy=strategy,
        callbacks=[budget] if budget is not None else [],
        precision="64-true",
        **trainer_kwargs,
    )
    trainer.fit(Classifier(net.double(), lr=0.5), loader(x.double(), y, batch_size=BATCH))
    return strategy, lines


def test_without_budget_the_end_line_states_epsilon_at_the_default_delta(monkeypatch):
    strategy, lines = _fit(sigma=1.0, monkeypatch=monkeypatch, max_epochs=2)
    assert strategy.steps == 16
    start, end = lines
    assert start.startswith("dp_auto: sigma=1, q=0.125, N=64, 16 steps planned")
    expected = opacus_epsilon("prv", [(1.0, Q, 16)], delta=1e-5)  # N = 64 < 10,000: delta 1e-5
    eps = float(end.split("epsilon=")[1].split(" ")[0])
    assert eps == pytest.approx(expected, rel=1e-3)  # printed with 4 significant digits
    assert "fit ended after 16 steps (max_epochs=2 reached): sigma=1, q=0.125" in end
    assert "at delta=1e-05 (prv accountant, default delta" in end


def test_with_budget_the_end_line_is_the_budgets_and_says_it_stopped_training(monkeypatch):
    # A target between the epsilons after 13 and 14 steps, with 80 planned: the budget ends the run.
    at_13, at_14 = (opacus_epsilon("rdp", [(1.0, Q, t)], delta=1e-6) for t in (13, 14))
    target = 0.5 * (at_13 + at_14)
    budget = PrivacyBudget(target_epsilon=target, delta=1e-6, accountant="rdp")
    with pytest.warns(UserWarning, match="stopping after step 13 of 80 planned"):
        strategy, lines = _fit(budget, sigma=1.0, monkeypatch=monkeypatch, max_epochs=10)
    assert strategy.steps == 13 and budget.stopped_by_budget
    end = lines[-1]
    assert (
        f"fit ended after 13 steps (PrivacyBudget: one more step would exceed target_epsilon={target:g})"
        in end
    )
    eps = float(end.split("epsilon=")[2].split(" ")[0])  # the first 'epsilon=' is the target's
    assert eps == pytest.approx(at_13, rel=1e-3)
    assert "at delta=1e-06 (PrivacyBudget, rdp accountant)" in end


def test_max_steps_is_named_as_the_reason(monkeypatch):
    budget = PrivacyBudget(delta=1e-5, accountant="rdp")  # accounts only, no target
    strategy, lines = _fit(budget, sigma=2.0, monkeypatch=monkeypatch, max_epochs=5, max_steps=3)
    assert "fit ended after 3 steps (max_steps=3 reached): sigma=2" in lines[-1]
    assert not budget.stopped_by_budget


def test_format_fit_summary_special_cases():
    line = summary.format_fit_summary(
        summary.FitSummary(0.0, 0.01, 10, math.inf, 1e-5, "max_epochs=1 reached", poisson_sampling=False)
    )
    assert "epsilon=inf (no noise: no privacy)" in line
    assert "does not hold for poisson_sampling=False" in line
    unknown = summary.format_fit_summary(
        summary.FitSummary(1.0, None, 10, None, 1e-5, "max_steps=10 reached")
    )
    assert "q=unknown, epsilon not accounted" in unknown


def test_default_delta_stays_well_below_one_over_n():
    assert summary.default_delta(1_000) == 1e-5
    assert summary.default_delta(None) == 1e-5
    for n in (10_001, 60_000, 10**7):
        assert summary.default_delta(n) == pytest.approx(1 / (10 * n))
        assert summary.default_delta(n) < 1 / n


class _StopHere(Exception):
    pass


class _StopAfterCalibration(Callback):
    """Ends the fit after on_train_start: the warning is all these tests need, not 1000 epochs."""

    def on_train_start(self, trainer, pl_module):
        raise _StopHere


def _calibrate_only(**trainer_kwargs) -> list[str]:
    net, x, y = make_case("linear", n=N)
    budget = PrivacyBudget(target_epsilon=3.0, accountant="rdp")
    trainer = quiet_trainer(strategy="dp_auto", callbacks=[budget, _StopAfterCalibration()], **trainer_kwargs)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(_StopHere):
        warnings.simplefilter("always")
        trainer.fit(Classifier(net), loader(x, y, batch_size=BATCH))
    return [str(w.message) for w in caught if "Lightning's default" in str(w.message)]


def test_calibrating_for_an_unchosen_run_length_warns_and_names_the_fix():
    (message,) = _calibrate_only()  # neither max_epochs nor max_steps
    assert "Trainer(max_epochs=...)" in message and "max_epochs=-1" in message
    assert _calibrate_only(max_epochs=5) == []
    assert _calibrate_only(max_steps=20) == []


def test_calibrating_without_a_planned_length_names_what_the_user_wrote():
    net, x, y = make_case("linear", n=N)
    trainer = quiet_trainer(
        strategy="dp_auto", callbacks=[PrivacyBudget(target_epsilon=3.0, accountant="rdp")], max_epochs=-1
    )
    with pytest.raises(ValueError, match=r"max_epochs=-1\) plans none") as err:
        trainer.fit(Classifier(net), loader(x, y, batch_size=BATCH))
    assert "noise_multiplier=None" not in str(err.value)  # the user never wrote it
    assert "DPAutoStrategy(noise_multiplier=1.0)" in str(err.value)


def test_an_unreachable_target_says_what_to_change():
    net, x, y = make_case("linear", n=N)
    trainer = quiet_trainer(
        strategy="dp_auto", callbacks=[PrivacyBudget(target_epsilon=0.01, accountant="rdp")], max_epochs=2
    )
    with pytest.raises(ValueError, match="more training data") as err:
        trainer.fit(Classifier(net), loader(x, y, batch_size=BATCH))
    assert "No noise_multiplier below 1e6" in str(err.value)  # the accountant's own reason is kept


def test_calibrating_without_a_target_names_both_fixes():
    net, x, y = make_case("linear", n=N)
    trainer = quiet_trainer(strategy="dp_auto", callbacks=[PrivacyBudget(accountant="rdp")], max_epochs=1)
    with pytest.raises(ValueError, match=r"PrivacyBudget\(target_epsilon=...\)") as err:
        trainer.fit(Classifier(net), loader(x, y, batch_size=BATCH))
    assert "DPAutoStrategy(noise_multiplier=1.0)" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({}, "clipping=psac, max_grad_norm=1, gamma=1,"),
        ({"clipping": "auto_s"}, "clipping=auto_s, max_grad_norm=1, gamma=0.01,"),
        ({"clipping": "abadi", "max_grad_norm": 0.5}, "clipping=abadi, max_grad_norm=0.5, poisson"),
    ],
)
def test_the_start_line_names_the_clipping_and_its_gamma_where_it_has_one(kwargs, shown):
    line = summary.format_start_line(DPAutoStrategy(noise_multiplier=1.0, **kwargs), 10)
    assert shown in line


def test_the_start_line_names_the_engine_auto_chose(caplog):
    net, x, y = make_case("linear", n=N)
    trainer = quiet_trainer(strategy=DPAutoStrategy(noise_multiplier=1.0), max_steps=1)
    with caplog.at_level(logging.INFO):
        trainer.fit(Classifier(net), loader(x, y, batch_size=BATCH))
    started = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dp_auto: sigma=1,")]
    assert len(started) == 1 and "; engine=bk, clipping=psac" in started[0]
