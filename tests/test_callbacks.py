"""PrivacyBudget in real Lightning runs, each number checked against Opacus's accountants called here."""

from __future__ import annotations

import csv
import glob
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_autodp import DPAutoStrategy, PrivacyBudget
from lightning_autodp.mechanism.calibration import NoiseCalibrator
from tests.models import Classifier, loader, make_case, quiet_trainer
from tests.test_accounting import opacus_epsilon

N, BATCH = 64, 8  # q = 1/8, 8 steps per epoch


def _data():
    torch.manual_seed(0)
    net, x, y = make_case("linear", n=N)
    return net, x, y


def _fit(budget, sigma=1.0, accumulate=1, seed=0, **trainer_kwargs):
    L.seed_everything(seed, verbose=False)
    net, x, y = _data()
    model = Classifier(net.double(), lr=0.5)
    strategy = DPAutoStrategy(noise_multiplier=sigma)
    trainer_kwargs.setdefault("max_epochs", 10)
    trainer = quiet_trainer(
        strategy=strategy,
        callbacks=[budget, *trainer_kwargs.pop("callbacks", [])],
        precision="64-true",
        accumulate_grad_batches=accumulate,
        **trainer_kwargs,
    )
    trainer.fit(model, loader(x.double(), y, batch_size=BATCH // accumulate))
    return trainer, strategy, model


@pytest.mark.parametrize(("accountant", "accumulate"), [("rdp", 1), ("prv", 1), ("rdp", 2)])
def test_stops_at_the_last_step_within_the_target(accountant, accumulate):
    q = BATCH / N
    # A target between the epsilons after 13 and 14 steps: 13 is mid-epoch (8 steps per epoch).
    target = 0.5 * (opacus_epsilon(accountant, [(1.0, q, 13)]) + opacus_epsilon(accountant, [(1.0, q, 14)]))
    budget = PrivacyBudget(target_epsilon=target, delta=1e-5, accountant=accountant)
    trainer, strategy, _ = _fit(budget, accumulate=accumulate)
    assert strategy.steps == trainer.global_step == budget.steps
    final = opacus_epsilon(accountant, [(1.0, q, strategy.steps)])
    assert budget.epsilon == pytest.approx(final, rel=1e-9)
    assert final <= target < opacus_epsilon(accountant, [(1.0, q, strategy.steps + 1)])


def test_a_spent_budget_takes_no_step():
    budget = PrivacyBudget(target_epsilon=1e-3, delta=1e-5, accountant="rdp")
    with pytest.warns(UserWarning, match="stops before the first step"):
        trainer, strategy, _ = _fit(budget)
    assert strategy.steps == 0 and budget.epsilon == 0.0


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrates_sigma_for_the_planned_run(accountant):
    budget = PrivacyBudget(target_epsilon=2.0, delta=1e-5, accountant=accountant)
    L.seed_everything(0, verbose=False)
    net, x, y = _data()
    strategy = DPAutoStrategy()  # noise_multiplier="auto": the callback calibrates it
    trainer = quiet_trainer(strategy=strategy, callbacks=[budget], max_epochs=3, precision="64-true")
    trainer.fit(Classifier(net.double()), loader(x.double(), y, batch_size=BATCH))
    assert strategy.steps == 3 * N // BATCH
    assert budget.noise_multiplier == strategy.noise_multiplier
    reached = opacus_epsilon(accountant, [(strategy.noise_multiplier, BATCH / N, strategy.steps)])
    assert 0.99 * 2.0 <= reached <= 2.0
    assert budget.epsilon == pytest.approx(reached, rel=1e-9)


class SigmaReader(Callback):
    """A user's callback that reads sigma where users do: when training starts."""

    def __init__(self):
        self.seen = []

    def on_train_start(self, trainer, pl_module):
        self.seen.append(trainer.strategy.noise_multiplier)


class CountingBudget(PrivacyBudget):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests = []

    def calibrate_noise_multiplier(self, request):
        self.requests.append(request)
        return super().calibrate_noise_multiplier(request)


def _calibrated_fit(reader_first: bool):
    L.seed_everything(0, verbose=False)
    net, x, y = _data()
    budget, reader = CountingBudget(target_epsilon=2.0, delta=1e-5, accountant="rdp"), SigmaReader()
    callbacks = [reader, budget] if reader_first else [budget, reader]
    strategy = DPAutoStrategy()  # "auto": the budget calibrates sigma
    trainer = quiet_trainer(strategy=strategy, callbacks=callbacks, max_epochs=2)
    trainer.fit(Classifier(net), loader(x, y, batch_size=BATCH))
    return strategy, budget, reader


def test_calibration_does_not_depend_on_the_order_of_the_callbacks():
    runs = [_calibrated_fit(reader_first) for reader_first in (True, False)]
    sigmas = []
    for strategy, budget, reader in runs:
        (sigma,) = reader.seen  # the user's callback saw the calibrated sigma, before or after the budget
        assert isinstance(sigma, float)
        assert sigma == strategy.noise_multiplier == budget.noise_multiplier
        assert {s for s, _, _ in strategy.ledger.segments} == {sigma}  # every step ran with it
        (request,) = budget.requests  # asked exactly once, with what the run then did
        assert (request.sample_rate, request.planned_steps, request.spent) == (BATCH / N, 2 * N // BATCH, ())
        assert strategy.steps == request.planned_steps
        reached = opacus_epsilon("rdp", [(sigma, BATCH / N, strategy.steps)])  # an independent accountant
        assert 0.99 * 2.0 <= reached <= 2.0
        sigmas.append(sigma)
    assert sigmas[0] == sigmas[1]


def test_a_reader_before_the_budget_needs_the_strategy_to_settle_sigma(monkeypatch):
    # Mutation of the test above: without the strategy settling sigma for its first reader, a user's
    # callback listed before the budget sees "auto" (the hook-order dependence this design removes).
    monkeypatch.setattr(DPAutoStrategy, "_training_data_ready", lambda self: False)
    _, budget, reader = _calibrated_fit(reader_first=True)
    assert reader.seen == ["auto"] and isinstance(budget.noise_multiplier, float)


class HalfPlanCalibrator(Callback):
    """Any callback implementing the NoiseCalibrator protocol is asked, not only PrivacyBudget."""

    def calibrate_noise_multiplier(self, request):
        return 0.5 + request.planned_steps / 100


def test_the_strategy_asks_any_noise_calibrator():
    assert isinstance(PrivacyBudget(), NoiseCalibrator) and isinstance(HalfPlanCalibrator(), NoiseCalibrator)
    net, x, y = _data()
    strategy = DPAutoStrategy(noise_multiplier=None)
    quiet_trainer(strategy=strategy, callbacks=[HalfPlanCalibrator()], max_steps=5).fit(
        Classifier(net), loader(x, y, batch_size=BATCH)
    )
    assert strategy.ledger.segments == [(0.55, BATCH / N, 5)]


def test_history_has_one_entry_per_epoch_and_the_csv_logger_gets_epsilon(tmp_path):
    budget = PrivacyBudget(delta=1e-5, accountant="rdp")  # no target: account and log only
    logger = CSVLogger(tmp_path, name="run")
    _fit(budget, max_epochs=3, logger=logger)
    q = BATCH / N
    assert [(e, s) for e, s, _ in budget.history] == [(0, 8), (1, 16), (2, 24)]
    for _, steps, eps in budget.history:
        assert eps == pytest.approx(opacus_epsilon("rdp", [(1.0, q, steps)]), rel=1e-9)
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        logged = [float(row["epsilon"]) for row in csv.DictReader(f) if row.get("epsilon")]
    assert logged == pytest.approx([eps for _, _, eps in budget.history], rel=1e-6)


def test_resumed_mid_epoch_run_ends_like_the_uninterrupted_one(tmp_path):
    reference_budget = PrivacyBudget(delta=1e-5, accountant="prv")
    _, reference_strategy, reference = _fit(reference_budget, max_epochs=3)

    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=10, save_top_k=-1)
    _fit(
        PrivacyBudget(delta=1e-5, accountant="prv"),
        max_epochs=3,
        callbacks=[checkpoints],
        enable_checkpointing=True,
    )
    (mid_epoch,) = glob.glob(str(tmp_path / "*step=10.ckpt"))  # epoch 1 has steps 9..16

    resumed_budget = PrivacyBudget(delta=1e-5, accountant="prv")
    # the resumed process is seeded differently on purpose: the streams' seed comes from the checkpoint
    L.seed_everything(123, verbose=False)
    net, x, y = _data()
    resumed = Classifier(net.double(), lr=0.5)
    trainer = quiet_trainer(
        strategy=DPAutoStrategy(noise_multiplier=1.0),
        callbacks=[resumed_budget],
        max_epochs=3,
        precision="64-true",
    )
    trainer.fit(resumed, loader(x.double(), y, batch_size=BATCH), ckpt_path=mid_epoch)

    assert trainer.global_step == reference_strategy.steps == 24
    assert resumed_budget.steps == reference_budget.steps
    assert resumed_budget.epsilon == reference_budget.epsilon
    for p, q in zip(resumed.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_checkpoint_with_another_delta_is_refused():
    budget = PrivacyBudget(delta=1e-5)
    state = PrivacyBudget(delta=1e-6).state_dict()
    with pytest.raises(ValueError, match=r"resume with PrivacyBudget\(delta=1e-06\)"):
        budget.load_state_dict(state)


def test_needs_a_dp_strategy():
    net, x, y = _data()
    trainer = quiet_trainer(callbacks=[PrivacyBudget(target_epsilon=1.0)], max_epochs=1)
    with pytest.raises(TypeError, match="strategy='dp_auto'"):
        trainer.fit(Classifier(net), loader(x, y, batch_size=BATCH))


def test_warns_when_delta_is_not_below_one_over_n():
    with pytest.warns(UserWarning, match="not below 1/N"):
        _fit(PrivacyBudget(delta=0.05, accountant="rdp"), max_epochs=1)


def test_stops_exactly_without_a_planned_length():
    q = BATCH / N
    target = 0.5 * (opacus_epsilon("rdp", [(1.0, q, 21)]) + opacus_epsilon("rdp", [(1.0, q, 22)]))
    budget = PrivacyBudget(target_epsilon=target, delta=1e-5, accountant="rdp")
    _, strategy, _ = _fit(budget, max_epochs=-1)  # no max_epochs, no max_steps: only the budget stops it
    assert strategy.steps == 21
