"""The strategy's privacy ledger in real runs: segments, checkpoints, PrivacyBudget reading it."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_autodp import DPAutoStrategy, EmptyBatch, PrivacyBudget
from tests.models import Classifier, loader, make_case, quiet_trainer
from tests.test_accounting import opacus_epsilon

N = 64


def _data():
    torch.manual_seed(0)
    return make_case("linear", n=N)


class ReloadingClassifier(Classifier):
    """Epoch 0 batches of 8 (q = 1/8), later epochs batches of 16 (q = 1/4)."""

    def __init__(self, net, x, y):
        super().__init__(net, lr=0.1)
        self.x, self.y = x, y

    def train_dataloader(self):
        return loader(self.x, self.y, batch_size=8 if self.current_epoch == 0 else 16)


def test_a_reloaded_loader_with_another_q_starts_a_new_accounted_segment():
    net, x, y = _data()
    budget = PrivacyBudget(delta=1e-5, accountant="rdp")
    strategy = DPAutoStrategy(noise_multiplier=1.0)
    trainer = quiet_trainer(
        strategy=strategy, callbacks=[budget], max_epochs=2, reload_dataloaders_every_n_epochs=1
    )
    trainer.fit(ReloadingClassifier(net, x, y))
    # epoch 0: q = 8/64, 8 steps; epoch 1: q = 16/64, 4 steps
    assert strategy.ledger.segments == [(1.0, 8 / N, 8), (1.0, 16 / N, 4)]
    independent = opacus_epsilon("rdp", [(1.0, 8 / N, 8), (1.0, 16 / N, 4)])
    assert budget.epsilon == pytest.approx(independent, rel=1e-9)
    # what the old snapshot of (sigma, q) at on_train_start would have reported
    assert budget.epsilon > opacus_epsilon("rdp", [(1.0, 8 / N, 12)]) * 1.05


def test_the_stopping_plan_follows_a_change_of_q():
    net, x, y = _data()
    q1, q2 = 8 / N, 16 / N
    # a target between 8 + 2 and 8 + 3 steps, the last ones at the reloaded q
    low = opacus_epsilon("rdp", [(1.0, q1, 8), (1.0, q2, 2)])
    high = opacus_epsilon("rdp", [(1.0, q1, 8), (1.0, q2, 3)])
    budget = PrivacyBudget(target_epsilon=0.5 * (low + high), delta=1e-5, accountant="rdp")
    strategy = DPAutoStrategy(noise_multiplier=1.0)
    trainer = quiet_trainer(
        strategy=strategy, callbacks=[budget], max_epochs=3, reload_dataloaders_every_n_epochs=1
    )
    trainer.fit(ReloadingClassifier(net, x, y))
    assert strategy.ledger.segments == [(1.0, q1, 8), (1.0, q2, 2)]


def _fit_and_checkpoint(tmp_path, sigma=2.5, callbacks=(), steps=5):
    L.seed_everything(0, verbose=False)
    net, x, y = _data()
    strategy = DPAutoStrategy(noise_multiplier=sigma)
    trainer = quiet_trainer(strategy=strategy, callbacks=list(callbacks), max_steps=steps)
    trainer.fit(Classifier(net), loader(x, y, batch_size=8))
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    return path, strategy


def test_steps_sigma_and_ledger_are_restored_without_a_callback(tmp_path):
    path, first = _fit_and_checkpoint(tmp_path, sigma=2.5)
    net, x, y = _data()
    resumed = DPAutoStrategy()  # "auto": without a PrivacyBudget this used to mean sigma = 1.0
    trainer = quiet_trainer(strategy=resumed, max_steps=8)
    trainer.fit(Classifier(net), loader(x, y, batch_size=8), ckpt_path=path)
    assert resumed.noise_multiplier == 2.5
    assert resumed.steps == trainer.global_step == 8
    assert resumed.ledger.segments == [(2.5, 8 / N, 8)]
    assert resumed.ledger.epsilon(1e-5, "rdp") == pytest.approx(opacus_epsilon("rdp", [(2.5, 8 / N, 8)]))
    assert resumed.seed == first.seed == 0


def test_a_run_accounted_by_a_budget_cannot_resume_without_one(tmp_path):
    path, _ = _fit_and_checkpoint(tmp_path, callbacks=[PrivacyBudget(delta=1e-5, accountant="rdp")])
    net, x, y = _data()
    trainer = quiet_trainer(strategy=DPAutoStrategy(), max_steps=8)
    with pytest.raises(ValueError, match=r"Add the same PrivacyBudget"):
        trainer.fit(Classifier(net), loader(x, y, batch_size=8), ckpt_path=path)


def test_two_budgets_keep_their_own_state_and_read_one_ledger(tmp_path):
    q = 8 / N
    tight = 0.5 * (opacus_epsilon("rdp", [(1.0, q, 6)]) + opacus_epsilon("rdp", [(1.0, q, 7)]))
    loose = PrivacyBudget(target_epsilon=100.0, delta=1e-5, accountant="rdp")
    strict = PrivacyBudget(target_epsilon=tight, delta=1e-5, accountant="rdp")
    assert loose.state_key != strict.state_key
    path, strategy = _fit_and_checkpoint(tmp_path, sigma=1.0, callbacks=[loose, strict], steps=20)
    assert strategy.steps == 6  # the stricter budget stops
    assert loose.epsilon == strict.epsilon == pytest.approx(opacus_epsilon("rdp", [(1.0, q, 6)]))
    saved = torch.load(path, weights_only=False)["callbacks"]
    assert {loose.state_key, strict.state_key} <= set(saved)
    assert saved[strict.state_key]["target_epsilon"] == tight


class SetSigmaAfterFirstStep(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.strategy.noise_multiplier = 3.0


def test_noise_multiplier_cannot_change_mid_run():
    net, x, y = _data()
    strategy = DPAutoStrategy(noise_multiplier=1.0)
    trainer = quiet_trainer(strategy=strategy, callbacks=[SetSigmaAfterFirstStep()], max_steps=3)
    with pytest.raises(RuntimeError, match="cannot change after the first optimizer step"):
        trainer.fit(Classifier(net), loader(x, y, batch_size=8))
    assert strategy.ledger.segments == [(1.0, 8 / N, 1)]
    # before a fit it may change, and the ledger shows it as a new segment
    strategy.noise_multiplier = 2.0
    assert strategy.noise_multiplier == 2.0


class CountingClassifier(Classifier):
    def __init__(self, net):
        super().__init__(net, lr=0.1)
        self.transferred = []
        self.stepped = 0

    def training_step(self, batch, batch_idx):
        self.stepped += 1
        return super().training_step(batch, batch_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.transferred.append(batch)
        return batch


class BatchSeer(Callback):
    def __init__(self):
        self.empty = 0
        self.placeholder_losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if isinstance(batch, EmptyBatch):
            self.empty += 1
            self.placeholder_losses.append(float(outputs["loss"]))


def test_empty_steps_run_no_user_step_and_no_transfer_hooks():
    L.seed_everything(0, verbose=False)
    net, x, y = _data()
    model, seer = CountingClassifier(net), BatchSeer()
    # verify=False: the verification calls training_step on single examples, which this test counts.
    strategy = DPAutoStrategy(noise_multiplier=1.0, verify=False)
    trainer = quiet_trainer(strategy=strategy, callbacks=[seer], max_epochs=2)
    trainer.fit(model, loader(x, y, batch_size=1))  # q = 1/64: about a third of the steps draw nobody
    assert strategy.steps == 2 * N and 0 < seer.empty < strategy.steps  # empty ones taken, noise only
    assert model.stepped == len(model.transferred) == strategy.steps - seer.empty
    assert not any(isinstance(b, EmptyBatch) for b in model.transferred)
    assert set(seer.placeholder_losses) == {0.0}  # the documented placeholder


@pytest.mark.parametrize(
    "kwargs", [{"find_unused_parameters": True}, {"static_graph": True}, {"ddp_comm_hook": print}]
)
def test_ddp_wrapper_arguments_are_refused(kwargs):
    with pytest.raises(TypeError, match="does not wrap the model in torch's DistributedDataParallel"):
        DPAutoStrategy(**kwargs)
    DPAutoStrategy(process_group_backend="gloo", start_method="popen")  # strategy arguments pass
