"""DPAutoStrategy(max_physical_batch_size=...): the capped step against the uncapped one and the loop."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from models import Classifier, loader, make_case, quiet_trainer
from reference import per_example_gradients, reference_clipped_mean

from lightning_autodp import DPAutoStrategy
from lightning_autodp.integration import physical

# Float64 differences between the capped and the uncapped step come only from the order of additions.
ROUNDING = 1e-12
# Abadi's bound between the examples' gradient norms (1.2 to 3.1): some examples clipped, some not, so
# a wrong raw-gradient scale shows in the update.
R = 1.7


class SizeRecorder(Classifier):
    """Records the number of examples each training_step call sees."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sizes: list[int] = []

    def training_step(self, batch, batch_idx):
        self.sizes.append(len(batch[0]))
        return super().training_step(batch, batch_idx)


def _fit(net, x, y, *, cap, steps=1, batch_size=8, accumulate=1, sigma=0.0, poisson=False, **strategy_kwargs):
    model = SizeRecorder(
        copy.deepcopy(net), optimizer="sgd", lr=1.0, reduction=strategy_kwargs.get("loss_reduction", "mean")
    )
    before = [p.detach().clone() for p in model.net.parameters()]
    strategy = DPAutoStrategy(
        noise_multiplier=sigma,
        max_grad_norm=R,
        clipping="abadi",
        poisson_sampling=poisson,
        seed=7,
        max_physical_batch_size=cap,
        **strategy_kwargs,
    )
    trainer = quiet_trainer(
        strategy=strategy, precision="64-true", max_steps=steps, accumulate_grad_batches=accumulate
    )
    trainer.fit(model, loader(x, y, batch_size=batch_size))
    update = [b - a.detach() for b, a in zip(before, model.net.parameters())]
    return update, strategy, model.sizes


def _max_diff(a, b):
    return max((u - v).abs().max().item() for u, v in zip(a, b))


@pytest.mark.parametrize("engine", ["bk", "ghost", "hooks"])
@pytest.mark.parametrize("case", ["linear", "transformer"])
def test_capped_step_equals_uncapped_and_per_example_loop(case, engine):
    net, x, y = make_case(case, n=8)
    uncapped, _, sizes = _fit(net, x, y, cap=None, engine=engine)
    assert max(sizes) == 8
    capped, strategy, sizes = _fit(net, x, y, cap=3, engine=engine)
    assert sizes[-3:] == [3, 3, 2]  # (a verification may have run its own calls before)
    assert max(sizes) <= 3
    assert strategy.steps == 1
    assert _max_diff(capped, uncapped) < ROUNDING
    # the independent oracle: one backward per example, float64
    netd = copy.deepcopy(net).double()
    xd = x.double() if x.is_floating_point() else x

    def loss_i(m, i):
        return F.cross_entropy(m(xd[i : i + 1]), y[i : i + 1])

    expected = reference_clipped_mean(per_example_gradients(netd, loss_i, 8), "abadi", R, 0.01, 8)
    for u, e in zip(capped, expected):  # the oracle's tolerance in tests/test_strategy.py
        assert (u - e).norm() / e.norm() < 1e-5


def test_accumulation_sum_reduction_and_cap_together():
    net, x, y = make_case("linear", n=8)
    uncapped, _, _ = _fit(net, x, y, cap=None, batch_size=4, accumulate=2, loss_reduction="sum")
    capped, strategy, sizes = _fit(net, x, y, cap=3, batch_size=4, accumulate=2, loss_reduction="sum")
    assert sizes[-4:] == [3, 1, 3, 1]
    assert strategy.steps == 1
    assert _max_diff(capped, uncapped) < ROUNDING
    capped_mean, _, _ = _fit(net, x, y, cap=3, batch_size=4, accumulate=2)
    assert _max_diff(capped_mean, uncapped) < ROUNDING


def test_poisson_noise_and_ledger_unchanged_by_the_cap():
    """A fixed seed draws the same Poisson samples and the same noise: only the memory changes."""
    net, x, y = make_case("linear", n=64)
    uncapped, ref, sizes_uncapped = _fit(net, x, y, cap=None, batch_size=16, steps=4, sigma=1.0, poisson=True)
    capped, strategy, sizes = _fit(net, x, y, cap=5, batch_size=16, steps=4, sigma=1.0, poisson=True)
    assert max(sizes) <= 5 < max(sizes_uncapped)
    assert sum(sizes) == sum(sizes_uncapped)
    assert strategy.ledger.segments == ref.ledger.segments == [(1.0, 0.25, 4)]
    assert _max_diff(capped, uncapped) < ROUNDING
    assert _max_diff(capped, [torch.zeros_like(u) for u in uncapped]) > 1e-3  # the noise is there


@pytest.mark.parametrize("fault", ["piece_dropped", "piece_twice", "no_accumulate_division"])
def test_faults_in_the_split_are_caught(monkeypatch, fault):
    """Mutations: each breaks the capped step; the comparison above must see it."""
    net, x, y = make_case("linear", n=8)
    uncapped, _, _ = _fit(net, x, y, cap=None, batch_size=4, accumulate=2)
    split = physical.split_batch

    def faulty_split(batch, cap):
        pieces = split(batch, cap)
        if len(pieces) == 1:  # the recursive call on one piece: nothing to break there
            return pieces
        return pieces[1:] if fault == "piece_dropped" else [pieces[0], *pieces]

    if fault == "no_accumulate_division":
        monkeypatch.setattr(physical, "closure_loss", lambda out: out * 2)  # cancels the 1/accumulate
    else:
        monkeypatch.setattr(physical, "split_batch", faulty_split)
    capped, _, _ = _fit(net, x, y, cap=1, batch_size=4, accumulate=2)
    assert _max_diff(capped, uncapped) > 1e-6


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "8"])
def test_bad_cap_is_refused(value):
    with pytest.raises(ValueError, match="max_physical_batch_size must be an integer >= 1"):
        DPAutoStrategy(max_physical_batch_size=value)


def test_unsplittable_batch_is_refused_naming_the_fix():
    batch = (torch.zeros(4, 2), ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="cannot be cut.*Make every per-example field a tensor"):
        physical.split_batch(batch, 2)
    pieces = physical.split_batch({"x": torch.arange(5), "y": torch.arange(5) * 2}, 2)
    assert [p["x"].tolist() for p in pieces] == [[0, 1], [2, 3], [4]]
    assert [p["y"].tolist() for p in pieces] == [[0, 2], [4, 6], [8]]


def test_training_step_without_loss_is_refused():
    with pytest.raises(ValueError, match="must return the loss"):
        physical.closure_loss(None)


def test_empty_poisson_batches_pass_through_the_cap():
    """q = 1/40: most steps draw no example; they are taken (noise only) and never cut."""
    n = 40
    net = torch.nn.Linear(3, 3)
    x, y = torch.randn(n, 3), torch.randint(0, 3, (n,))
    strategy = DPAutoStrategy(noise_multiplier=1.0, max_physical_batch_size=1)
    quiet_trainer(strategy=strategy, max_epochs=1).fit(Classifier(net), loader(x, y, batch_size=1))
    assert strategy.steps == n
    assert strategy.ledger.segments == [(1.0, 1 / n, n)]
