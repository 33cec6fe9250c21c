"""DPAutoStrategy's update against a per-example loop (one backward per example)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from models import Classifier, loader, make_case, quiet_trainer
from reference import per_example_gradients, reference_clipped_mean

from lightning_autodp import DPAutoStrategy

CASES = ["linear", "linear3d", "conv1d", "conv2d", "embedding", "layernorm", "groupnorm", "transformer"]
ENGINES = ["hooks", "bk", "ghost"]
CLIPPINGS = ["auto_s", "psac", "auto_v", "abadi"]


def _one_sgd_step(
    net, x, y, *, engine, clipping, max_grad_norm, reduction="mean", batch_size=8, accumulate=1, gamma=0.01
):
    model = Classifier(copy.deepcopy(net), reduction=reduction, optimizer="sgd", lr=1.0)
    before = [p.detach().clone() for p in model.net.parameters()]
    strategy = DPAutoStrategy(
        noise_multiplier=0.0,
        clipping=clipping,
        max_grad_norm=max_grad_norm,
        gamma=gamma,
        poisson_sampling=False,
        engine=engine,
        loss_reduction=reduction,
    )
    trainer = quiet_trainer(
        strategy=strategy, precision="64-true", max_steps=1, accumulate_grad_batches=accumulate
    )
    trainer.fit(model, loader(x, y, batch_size=batch_size))
    assert strategy.steps == 1
    return [(b - a.detach()) for b, a in zip(before, model.net.parameters())]


def _reference(net, x, y, n, clipping, max_grad_norm):
    net = copy.deepcopy(net).double()
    xd = x.double() if x.is_floating_point() else x

    def loss_i(m, i):
        return F.cross_entropy(m(xd[i : i + 1]), y[i : i + 1])

    grads = per_example_gradients(net, loss_i, n)
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in gi)) for gi in grads])
    return grads, norms


def _assert_close(update, expected):
    for u, e in zip(update, expected):
        err = (u - e).norm() / e.norm().clamp_min(1e-30)
        assert err < 1e-5, f"relative error {err:.2e}"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", CASES)
def test_clipped_mean_matches_per_example_loop(case, engine):
    net, x, y = make_case(case)
    grads, norms = _reference(net, x, y, len(x), "auto_s", 1.0)
    # A bound between the smallest and largest norm, so Abadi clips some examples and not others.
    median = norms.median().item()
    assert norms.min() < median < norms.max() or len(set(norms.tolist())) == 1
    # PSAC's r at the median too: examples on both sides of it (damped below, normalised above).
    for clipping in CLIPPINGS:
        gamma = median if clipping == "psac" else 0.01
        update = _one_sgd_step(net, x, y, engine=engine, clipping=clipping, max_grad_norm=median, gamma=gamma)
        expected = reference_clipped_mean(grads, clipping, median, gamma, batch_size=len(x))
        _assert_close(update, expected)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", ["linear", "conv2d", "embedding", "transformer"])
def test_sum_reduction_and_accumulation(case, engine):
    net, x, y = make_case(case, n=8)
    grads, norms = _reference(net, x, y, len(x), "auto_s", 1.0)
    expected = reference_clipped_mean(grads, "abadi", norms.median().item(), 0.01, batch_size=8)
    # sum reduction, one batch of 8
    update = _one_sgd_step(
        net, x, y, engine=engine, clipping="abadi", max_grad_norm=norms.median().item(), reduction="sum"
    )
    _assert_close(update, expected)
    # mean reduction, two micro-batches of 4 accumulated into one optimizer step
    update = _one_sgd_step(
        net,
        x,
        y,
        engine=engine,
        clipping="abadi",
        max_grad_norm=norms.median().item(),
        batch_size=4,
        accumulate=2,
    )
    _assert_close(update, expected)


def test_frozen_parameters_get_no_gradient_and_no_noise():
    net, x, y = make_case("linear")
    net[0].weight.requires_grad_(False)
    model = Classifier(net, optimizer="sgd", lr=1.0)
    frozen = net[0].weight.detach().clone()
    trainer = quiet_trainer(strategy=DPAutoStrategy(noise_multiplier=5.0, engine="hooks"), max_steps=3)
    trainer.fit(model, loader(x, y, batch_size=4))
    assert torch.equal(net[0].weight, frozen)
    assert net[0].weight.grad is None


def test_state_dict_keys_unchanged_and_checkpoint_loads_into_plain_model(tmp_path):
    net, x, y = make_case("transformer")
    model = Classifier(copy.deepcopy(net))
    keys = list(model.state_dict().keys())
    trainer = quiet_trainer(strategy="dp_auto", max_steps=2, default_root_dir=tmp_path)
    trainer.fit(model, loader(x, y, batch_size=4))
    assert list(model.state_dict().keys()) == keys
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    plain = Classifier(copy.deepcopy(net))
    plain.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("engine", ENGINES)
def test_max_grad_norm_drops_out_under_adam(engine):
    net, x, y = make_case("linear", n=64)

    def train(max_grad_norm, clipping):
        torch.manual_seed(0)
        model = Classifier(copy.deepcopy(net), optimizer="adam", lr=1e-2)
        strategy = DPAutoStrategy(
            noise_multiplier=1.0, max_grad_norm=max_grad_norm, clipping=clipping, engine=engine
        )
        quiet_trainer(strategy=strategy, max_steps=5).fit(model, loader(x, y, batch_size=16))
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    a, b = train(1.0, "auto_s"), train(100.0, "auto_s")
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # control: Abadi clipping with a bound below the norms is not R-invariant
    c, d = train(1e-3, "abadi"), train(100.0, "abadi")
    assert not torch.allclose(c, d, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("poisson", [True, False])
def test_noise_std_is_sigma_r_over_b(poisson):
    sigma, max_grad_norm, n, batch_size = 1.3, 2.0, 64, 16

    class ZeroGradient(Classifier):
        def training_step(self, batch, batch_idx):
            x, _ = batch
            return 0.0 * self.net(x).sum()

    net = torch.nn.Linear(100, 100)  # 10100 noise coordinates per step
    model = ZeroGradient(net, optimizer="sgd", lr=1.0)
    x, y = torch.randn(n, 100), torch.zeros(n, dtype=torch.long)
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    strategy = DPAutoStrategy(noise_multiplier=sigma, max_grad_norm=max_grad_norm, poisson_sampling=poisson)
    quiet_trainer(strategy=strategy, max_steps=1).fit(model, loader(x, y, batch_size=batch_size))
    after = torch.cat([p.detach().flatten() for p in net.parameters()])
    measured = (after - before).std().item()
    expected = sigma * max_grad_norm / batch_size  # B = q * N = batch_size, or the 16 examples
    assert abs(measured / expected - 1) < 0.03, (measured, expected)


def test_empty_poisson_batches_train_with_noise_only():
    n = 40
    net = torch.nn.Linear(3, 3)
    model = Classifier(net, optimizer="sgd", lr=0.1)
    x, y = torch.randn(n, 3), torch.randint(0, 3, (n,))
    strategy = DPAutoStrategy(noise_multiplier=1.0)
    before = net.weight.detach().clone()
    quiet_trainer(strategy=strategy, max_epochs=1).fit(model, loader(x, y, batch_size=1))
    # q = 1/40: 40 steps, most of them without a single example, all of them taken
    assert strategy.steps == n
    assert strategy.sample_rate == pytest.approx(1 / n)
    assert not torch.equal(net.weight, before)


def test_validation_runs_without_per_sample_capture():
    net, x, y = make_case("linear")
    model = Classifier(net)
    seen = []
    strategy = DPAutoStrategy(engine="hooks")
    trainer = quiet_trainer(strategy=strategy, max_steps=2, limit_val_batches=2, val_check_interval=1)
    trainer.fit(model, loader(x, y, batch_size=4), loader(x, y, batch_size=4))
    for p in net.parameters():
        seen.append(getattr(p, "grad_sample", None))
    assert all(s is None for s in seen)
    trainer.validate(model, loader(x, y, batch_size=4))
