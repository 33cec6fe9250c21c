"""BatchNorm in eval mode (frozen or not) trains exactly under any engine; mixing examples is refused."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from models import Classifier, loader, quiet_trainer
from reference import per_example_gradients, reference_clipped_mean
from torch import nn

from lightning_autodp import DPAutoStrategy, EngineVerificationError
from lightning_autodp.engines import hooks, make_engine
from lightning_autodp.engines.rules import batchnorm as bn_rule
from lightning_autodp.safeguards import batchnorm
from lightning_autodp.safeguards.batchnorm import BatchNormModeError

ENGINES = ["auto", "bk", "ghost", "hooks"]

TRAIN_MODE_MESSAGE = (
    "Layer 'net.1' (BatchNorm2d) ran in train mode in a training step: it normalises with the statistics of "
    "the batch, which mix the examples (and updates its running statistics from them), so the per-example "
    "gradients and the DP guarantee would not hold. Keep it in eval mode for the whole fit, so it applies "
    "its running statistics (a pretrained model's): call `net.1.eval()` in the LightningModule's "
    "on_train_epoch_start (after anything that calls .train(), e.g. model.train() in a hook or callback); "
    "or replace it with nn.GroupNorm (a model trained from scratch; opacus.validators.ModuleValidator."
    "fix(model) does this). See docs/how-to/frozen-batchnorm.md."
)


def _backbone(seed: int = 0) -> nn.Sequential:
    """Conv -> BatchNorm2d (pretrained-like running statistics) -> ReLU -> Linear head."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    ).double()
    bn = net[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(4, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(4, dtype=torch.float64) + 0.5)
        bn.weight.copy_(torch.rand(4, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(4, dtype=torch.float64))
    return net


def _freeze(net: nn.Module) -> nn.Module:
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(False)
            m.eval()
    return net


def _data(n: int = 8):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _expected(net: nn.Module, x, y, max_grad_norm: float) -> list[torch.Tensor]:
    """The clipped mean from one backward per example, the BatchNorm applying its running statistics."""
    ref = _freeze(copy.deepcopy(net))

    def loss_i(m, i):
        return F.cross_entropy(m(x[i : i + 1]), y[i : i + 1])

    grads = per_example_gradients(ref, loss_i, len(x))
    return reference_clipped_mean(grads, "abadi", max_grad_norm, 0.01, batch_size=len(x))


def _fit(model: L.LightningModule, x, y, engine: str, max_steps: int = 1, callbacks=(), **strategy_kwargs):
    strategy = DPAutoStrategy(
        noise_multiplier=0.0,
        clipping="abadi",
        max_grad_norm=0.5,
        poisson_sampling=False,
        engine=engine,
        **strategy_kwargs,
    )
    trainer = quiet_trainer(
        strategy=strategy, precision="64-true", max_steps=max_steps, callbacks=list(callbacks)
    )
    trainer.fit(model, loader(x, y, batch_size=len(x)))
    return strategy


def _trainable(net: nn.Module) -> list[nn.Parameter]:
    return [p for p in net.parameters() if p.requires_grad]


def _assert_update(before: list[torch.Tensor], net: nn.Module, expected: list[torch.Tensor]) -> None:
    update = [b - a.detach() for b, a in zip(before, _trainable(net))]
    assert len(update) == len(expected)
    for u, e in zip(update, expected):
        err = (u - e).norm() / e.norm()
        assert err < 1e-5, f"relative error {err:.2e}"


class FreezeBatchNormEachEpoch(Classifier):
    """The usual fine-tuning recipe: BatchNorm frozen and put in eval mode at every epoch start."""

    def on_train_epoch_start(self) -> None:
        _freeze(self.net)


@pytest.mark.parametrize("engine", ENGINES)
def test_frozen_eval_batchnorm_matches_per_example_loop(engine):
    """Frozen + eval mode from the start (Lightning keeps each submodule's mode): exact, verified."""
    net, (x, y) = _freeze(_backbone()), _data()
    expected = _expected(net, x, y, 0.5)
    model = Classifier(net)
    before = [p.detach().clone() for p in _trainable(model.net)]
    running = net[1].running_mean.clone()
    strategy = _fit(model, x, y, engine)
    assert strategy.steps == 1
    _assert_update(before, model.net, expected)
    assert torch.equal(net[1].running_mean, running)  # statistics stay the public, pretrained ones


@pytest.mark.parametrize("engine", ["auto", "hooks"])
def test_batchnorm_frozen_in_on_train_epoch_start(engine):
    """Frozen at each epoch start (after anything that switched the model to train mode)."""
    net, (x, y) = _backbone(), _data()
    net.train()
    net[1].requires_grad_(False)
    expected = _expected(net, x, y, 0.5)
    model = FreezeBatchNormEachEpoch(net)
    before = [p.detach().clone() for p in _trainable(model.net)]
    _fit(model, x, y, engine)
    _assert_update(before, model.net, expected)


@pytest.mark.parametrize("engine", ENGINES)
def test_frozen_batchnorm_in_train_mode_is_refused_at_the_step(engine):
    """Verification runs parameter-free modules in eval mode, so only the step-time guard sees this."""
    net, (x, y) = _backbone(), _data()
    net[1].requires_grad_(False)  # frozen, but left in train mode: batch statistics
    model = Classifier(net)
    before = [p.detach().clone() for p in _trainable(model.net)]
    with pytest.raises(BatchNormModeError) as info:
        _fit(model, x, y, engine)
    assert str(info.value) == TRAIN_MODE_MESSAGE
    assert all(torch.equal(b, p) for b, p in zip(before, _trainable(model.net)))  # no update was taken


def test_without_the_guard_the_update_silently_mixes_examples(monkeypatch):
    """Mutation: with the step-time check switched off, the same run trains and its update is wrong."""
    monkeypatch.setattr(batchnorm, "uses_batch_statistics", lambda layer: False)
    net, (x, y) = _backbone(), _data()
    net[1].requires_grad_(False)
    expected = _expected(net, x, y, 0.5)
    model = Classifier(net)
    before = [p.detach().clone() for p in _trainable(model.net)]
    _fit(model, x, y, "auto")
    with pytest.raises(AssertionError, match="relative error"):
        _assert_update(before, model.net, expected)


class SwitchBackToTrain(L.Callback):
    """A callback that puts the whole model in train mode before the second step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1:
            pl_module.train()


@pytest.mark.parametrize("engine", ["auto", "hooks"])
def test_batchnorm_switched_back_to_train_mode_mid_run_is_caught(engine):
    net, (x, y) = _freeze(_backbone()), _data()
    model = Classifier(net)
    with pytest.raises(BatchNormModeError, match=r"^Layer 'net\.1' \(BatchNorm2d\) ran in train mode"):
        _fit(model, x, y, engine, max_steps=3, callbacks=[SwitchBackToTrain()])
    assert model.trainer.strategy.steps == 1  # the first step trained; the second was refused


@pytest.mark.parametrize("engine", ENGINES)
def test_trainable_batchnorm_in_eval_mode_matches_per_example_loop(engine):
    """Eval mode, affine parameters trainable (running statistics frozen): the per-channel affine rule."""
    net, (x, y) = _backbone(), _data()
    net[1].eval()
    ref = copy.deepcopy(net)

    def loss_i(m, i):
        return F.cross_entropy(m(x[i : i + 1]), y[i : i + 1])

    expected = reference_clipped_mean(per_example_gradients(ref, loss_i, len(x)), "abadi", 0.5, 0.01, len(x))
    model = Classifier(net)
    before = [p.detach().clone() for p in _trainable(model.net)]
    assert len(before) == 6  # conv weight and bias, BatchNorm weight and bias, head weight and bias
    _fit(model, x, y, engine)
    _assert_update(before, model.net, expected)


@pytest.mark.parametrize("engine", ["bk", "hooks"])
def test_verification_catches_a_wrong_batchnorm_rule(engine, monkeypatch):
    """Mutation: the rule normalises with nothing (xhat = x): verification refuses before any update."""
    monkeypatch.setattr(bn_rule, "normalised_with_running_statistics", lambda module, x: x)
    monkeypatch.setattr(hooks, "normalised_with_running_statistics", lambda module, x: x)
    net, (x, y) = _backbone(), _data()
    net[1].eval()
    model = Classifier(net)
    before = [p.detach().clone() for p in _trainable(model.net)]
    with pytest.raises(EngineVerificationError):
        _fit(model, x, y, engine)
    assert all(torch.equal(b, p) for b, p in zip(before, _trainable(model.net)))


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("engine", ENGINES)
def test_trainable_batchnorm_in_train_mode_is_refused_before_any_update(engine, verify):
    """A model built for training has its BatchNorm in train mode: refused at the first step."""
    net, (x, y) = _backbone(), _data()
    model = Classifier(net)
    before = [p.detach().clone() for p in _trainable(model.net)]
    with pytest.raises(BatchNormModeError) as info:
        _fit(model, x, y, engine, verify=verify)
    assert str(info.value) == TRAIN_MODE_MESSAGE
    assert all(torch.equal(b, p) for b, p in zip(before, _trainable(model.net)))


def test_batchnorm_without_running_statistics_is_refused():
    net = _backbone()
    net[1] = nn.BatchNorm2d(4, track_running_stats=False, affine=False).double().eval()
    with pytest.raises(ValueError) as info:
        _fit(Classifier(net), *_data(), "auto")
    assert str(info.value) == (
        "Layer 'net.1' (BatchNorm2d) has track_running_stats=False: it normalises with the statistics of the "
        "batch even in eval mode, which mix the examples, so per-example gradients and DP do not exist for "
        "it. Replace it with nn.GroupNorm (e.g. opacus.validators.ModuleValidator.fix(model)), or use a "
        "BatchNorm with running statistics in eval mode (see docs/how-to/frozen-batchnorm.md)."
    )


def test_uses_batch_statistics_follows_torch():
    """The guard's condition against torch's own: batch statistics change the output with the batch."""
    x = torch.randn(6, 3, dtype=torch.float64)
    for training in (True, False):
        for track in (True, False):
            bn = nn.BatchNorm1d(3, track_running_stats=track).double().train(training)
            with torch.no_grad():
                whole = bn(x)[:2]
                alone = torch.cat([bn(x[:2]), bn(x[2:])])[:2]  # the same rows in another batch
            mixes = not torch.allclose(whole, alone)
            assert batchnorm.uses_batch_statistics(bn) == mixes


class FineTune(L.LightningModule):
    """A pretrained backbone fine-tuned with its BatchNorm frozen in configure_model, and a new head."""

    def __init__(self, retrain: bool = False) -> None:
        super().__init__()
        self.backbone = _backbone()[:3]
        self.head = nn.Linear(4 * 4 * 4, 3).double()
        self.retrain = retrain

    def configure_model(self) -> None:
        _freeze(self.backbone)

    def on_train_epoch_start(self) -> None:
        if self.retrain:  # the mutation: a hook that puts the whole model back in train mode
            self.train()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.backbone(x).flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


@pytest.mark.parametrize("retrain", [False, True])
def test_fine_tuning_under_dp_auto_with_verification(retrain):
    """The real path: strategy='dp_auto' with its defaults (noise, Poisson sampling, verification on)."""
    model = FineTune(retrain=retrain)
    x, y = _data(32)
    bn = model.backbone[1]
    state = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    frozen = [t.detach().clone() for t in state]
    conv = model.backbone[0].weight.detach().clone()
    trainer = quiet_trainer(strategy="dp_auto", precision="64-true", max_epochs=2)
    if retrain:
        refused = r"^Layer 'backbone\.1' \(BatchNorm2d\) ran in train mode"
        with pytest.raises(BatchNormModeError, match=refused):
            trainer.fit(model, loader(x, y, batch_size=8))
        assert trainer.strategy.steps == 0
        return
    trainer.fit(model, loader(x, y, batch_size=8))
    assert trainer.strategy.steps == 8
    assert all(torch.equal(a, b) for a, b in zip(frozen, state))  # parameters and statistics
    assert not torch.equal(conv, model.backbone[0].weight)  # the convolution before it was fine-tuned


@pytest.mark.parametrize("engine", ["bk", "ghost", "hooks"])
@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 5), (6, 4, 3, 3, 3)])
def test_eval_batchnorm_rule_per_example_norms(shape, engine):
    """The engines alone: per-example norms of a trainable eval-mode BatchNorm1d/3d on 2-5 dim inputs."""
    torch.manual_seed(0)
    bn = (nn.BatchNorm3d if len(shape) == 5 else nn.BatchNorm1d)(4)
    net = nn.Sequential(nn.Linear(shape[-1], shape[-1]), bn).double()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    bn.eval()
    x = torch.randn(*shape, dtype=torch.float64)
    grads = per_example_gradients(net, lambda m, i: (m(x[i : i + 1]) ** 2).sum(), shape[0])
    expected = torch.stack([sum((g**2).sum() for g in gi) for gi in grads])
    engine_ = make_engine(engine, net)
    with engine_.capturing():
        loss = (net(x) ** 2).sum()
        loss.backward(retain_graph=engine_.needs_backward_root)
        if engine_.needs_backward_root:
            engine_.set_backward_root(loss)
    got = engine_.per_sample_squared_norms()
    engine_.remove()
    assert torch.allclose(got, expected, rtol=1e-12, atol=0)
