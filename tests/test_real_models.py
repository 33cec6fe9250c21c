"""transformers GPT-2, BERT, Llama and ViT (tiny random configs, full and LoRA) against a per-example loop.

Each example alone through the model, its own backward, in float64: the engines' per-example norms
and weighted sums, and one DP-SGD step of a Lightning fit (sigma = 0), must match it.
"""

from __future__ import annotations

import copy
import warnings

import lightning as L
import pytest
import torch
from hf_models import FAMILIES, build, example
from models import quiet_trainer
from reference import per_example_gradients, reference_clipped_mean
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_autodp import DPAutoStrategy
from lightning_autodp.engines import make_engine

pytest.importorskip("transformers")
pytest.importorskip("peft")


def _reference(model: nn.Module, batch: dict, loss) -> list[list[Tensor]]:
    n = len(next(iter(batch.values())))
    return per_example_gradients(model, lambda m, i: loss(m, example(batch, i)).sum(), n)


def _max_error(got: list[Tensor], expected: list[Tensor]) -> float:
    """Largest per-parameter error, relative to the parameter's own scale or, for parameters whose
    gradient is zero up to rounding (a key bias under softmax), to the whole update's."""
    floor = 1e-6 * float(torch.stack([e.norm() for e in expected]).norm())
    return max(float((g - e).norm()) / max(float(e.norm()), floor) for g, e in zip(got, expected))


@pytest.mark.parametrize("engine_name", ["bk", "ghost", "auto"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_engine_norms_and_weighted_sum_match_per_example_loop(family, lora, engine_name):
    model, batch, loss = build(family, lora)
    n = len(next(iter(batch.values())))
    grads = _reference(copy.deepcopy(model), batch, loss)
    ref_sq = torch.stack([sum((g**2).sum() for g in gi) for gi in grads])
    weights = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the per-module rule's announcement
        engine = make_engine(engine_name, model)
    engine.expect_batch_size(n)
    with engine.capturing():
        total = loss(model, batch).sum()
        total.backward(retain_graph=engine.needs_backward_root)
    engine.set_backward_root(total)
    sq = engine.per_sample_squared_norms()
    summed: dict[nn.Parameter, Tensor] = {}
    engine.accumulate_weighted_sum(weights, summed)
    assert engine.batch_size == n
    engine.remove()

    assert float((sq - ref_sq).norm() / ref_sq.norm()) < 1e-10
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len(grads[0])
    got = [summed.get(p, torch.zeros_like(p)) for p in params]
    expected = [sum(w * gi[k] for w, gi in zip(weights, grads)) for k in range(len(params))]
    assert _max_error(got, expected) < 1e-10


class HFModule(L.LightningModule):
    def __init__(self, model: nn.Module, loss) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self.loss(self.model, batch).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=1.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_lightning_step_matches_per_example_loop(family):
    """One DP-SGD step (sigma = 0, AUTO-S) of a Lightning fit with engine='auto' on a dict batch."""
    model, batch, loss = build(family)
    n = len(next(iter(batch.values())))
    grads = _reference(copy.deepcopy(model), batch, loss)
    expected = reference_clipped_mean(grads, "auto_s", 1.0, 0.01, n)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]

    strategy = DPAutoStrategy(
        noise_multiplier=0.0, clipping="auto_s", max_grad_norm=1.0, poisson_sampling=False, engine="auto"
    )
    data = DataLoader([example(batch, i) for i in range(n)], batch_size=n, collate_fn=_collate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        quiet_trainer(strategy=strategy, precision="64-true", max_steps=1).fit(HFModule(model, loss), data)

    update = [b - p.detach() for b, p in zip(before, params)]
    assert _max_error(update, expected) < 1e-6  # p - (p - u) loses digits where u << p


def _collate(examples: list[dict]) -> dict:
    return {k: torch.cat([e[k] for e in examples]) for k in examples[0]}
