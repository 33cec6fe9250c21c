"""Mixed precision against the float32 run, skipped steps still accounted, seeded runs bit-identical."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_autodp import DPAutoStrategy, PrivacyBudget
from tests.models import Classifier, loader, make_case, quiet_trainer
from tests.reference import per_example_gradients


def _sgd_update(
    net, x, y, engine="hooks", clipping="abadi", max_grad_norm=0.05, gamma=0.01, **trainer_kwargs
):
    """The parameter change of one DP-SGD step (lr=1, sigma=0, the whole batch)."""
    model = Classifier(copy.deepcopy(net), lr=1.0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    strategy = DPAutoStrategy(
        noise_multiplier=0.0,
        poisson_sampling=False,
        engine=engine,
        clipping=clipping,
        max_grad_norm=max_grad_norm,
        gamma=gamma,
    )
    trainer = quiet_trainer(strategy=strategy, max_steps=1, **trainer_kwargs)
    trainer.fit(model, loader(x, y, batch_size=len(x)))
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _scaler_plugin(init_scale: float) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def _median_norm(net, x, y) -> float:
    grads = per_example_gradients(net, lambda m, i: F.cross_entropy(m(x[i : i + 1]), y[i : i + 1]), len(x))
    return torch.stack([torch.cat([g.flatten() for g in gi]).norm() for gi in grads]).median().item()


@pytest.mark.parametrize("engine", ["hooks", "ghost"])
@pytest.mark.parametrize("clipping", ["abadi", "auto_s"])
def test_16_mixed_clips_in_true_units_whatever_the_loss_scale(clipping, engine):
    torch.manual_seed(0)
    net, x, y = make_case("linear", n=16)
    bound = _median_norm(net, x, y)  # Abadi clips half of the examples
    # gamma of the order of ||g_i||, so that AUTO-S depends on the units in which it is applied
    # (engine="ghost" backpropagates the scaled loss twice: both passes must be in the same units)
    kwargs = dict(clipping=clipping, max_grad_norm=bound, gamma=bound, engine=engine)
    fp32 = _sgd_update(net, x, y, **kwargs)
    scaled = _sgd_update(net, x, y, plugins=[_scaler_plugin(2.0**16)], **kwargs)
    unscaled = _sgd_update(net, x, y, plugins=[_scaler_plugin(1.0)], **kwargs)
    # Clipping scaled gradients would make the update depend on the loss scale by orders of
    # magnitude (Abadi: every example clipped; AUTO-S: gamma 65536 times smaller in relative
    # terms); what is left is float16 rounding of the unscaled gradients.
    assert _rel(scaled, unscaled) < 1e-2
    assert _rel(scaled, fp32) < 1e-2


def test_bf16_mixed_is_close_to_float32():
    torch.manual_seed(0)
    net, x, y = make_case("layernorm", n=16)
    fp32 = _sgd_update(net, x, y, clipping="auto_s", max_grad_norm=1.0)
    bf16 = _sgd_update(net, x, y, clipping="auto_s", max_grad_norm=1.0, precision="bf16-mixed")
    assert 0 < _rel(bf16, fp32) < 3e-2


def test_a_step_skipped_for_inf_is_still_accounted():
    torch.manual_seed(0)
    net, x, y = make_case("linear", n=16)
    model = Classifier(net, lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    plugin = _scaler_plugin(1e38)  # the scaled float16 gradients overflow: GradScaler skips the step
    strategy = DPAutoStrategy(noise_multiplier=1.0, engine="hooks")
    budget = PrivacyBudget(delta=1e-3, accountant="rdp")
    trainer = quiet_trainer(strategy=strategy, max_steps=1, plugins=[plugin], callbacks=[budget])
    trainer.fit(model, loader(x, y, batch_size=4))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # skipped
    assert plugin.scaler.get_scale() < 1e38  # the scaler saw the overflow
    # The examples of the skipped step were sampled and used: the step is spent.
    assert strategy.steps == budget.steps == 1 and budget.epsilon > 0


def _seeded_run(engine: str, seed: int) -> torch.Tensor:
    L.seed_everything(seed, verbose=False)
    torch.manual_seed(0)
    net, x, y = make_case("conv2d", n=32)
    model = Classifier(net, lr=0.1)
    trainer = quiet_trainer(strategy=DPAutoStrategy(noise_multiplier=1.0, engine=engine), max_epochs=2)
    trainer.fit(model, loader(x, y, batch_size=8))
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("engine", ["bk", "ghost", "hooks"])
def test_seeded_runs_are_bit_identical(engine):
    first, second = _seeded_run(engine, seed=7), _seeded_run(engine, seed=7)
    assert torch.equal(first, second)
    # and the seed matters: noise and Poisson samples follow it
    assert not torch.equal(first, _seeded_run(engine, seed=8))
