"""One Lightning DP step on a transformers model against the per-example loop (float64, sigma = 0)."""

from __future__ import annotations

import copy
import warnings

import lightning as L
import torch
from hf_models import example
from models import quiet_trainer
from reference import per_example_gradients, reference_clipped_mean
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_autodp import DPAutoStrategy


class HFModule(L.LightningModule):
    def __init__(self, model: nn.Module, loss) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self.loss(self.model, batch).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=1.0)


def collate(examples: list[dict]) -> dict:
    return {k: torch.cat([e[k] for e in examples]) for k in examples[0]}


def max_relative_error(got: list[Tensor], expected: list[Tensor]) -> float:
    """Largest per-parameter error, relative to the parameter's own scale or, for parameters whose
    gradient is zero up to rounding (a key bias under softmax), to the whole update's."""
    floor = 1e-6 * float(torch.stack([e.norm() for e in expected]).norm())
    return max(float((g - e).norm()) / max(float(e.norm()), floor) for g, e in zip(got, expected))


def lightning_step_error(model: nn.Module, batch: dict, loss) -> float:
    """One SGD step (lr 1, AUTO-S, R = 1, sigma = 0) of a fit with engine='auto' and verification on,
    against the clipped mean of the per-example loop: the largest relative error of the update."""
    n = len(next(iter(batch.values())))
    grads = per_example_gradients(copy.deepcopy(model), lambda m, i: loss(m, example(batch, i)).sum(), n)
    expected = reference_clipped_mean(grads, "auto_s", 1.0, 0.01, n)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    strategy = DPAutoStrategy(
        noise_multiplier=0.0, clipping="auto_s", max_grad_norm=1.0, poisson_sampling=False, engine="auto"
    )
    data = DataLoader([example(batch, i) for i in range(n)], batch_size=n, collate_fn=collate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        quiet_trainer(strategy=strategy, precision="64-true", max_steps=1).fit(HFModule(model, loss), data)
    update = [b - p.detach() for b, p in zip(before, params)]
    return max_relative_error(update, expected)
