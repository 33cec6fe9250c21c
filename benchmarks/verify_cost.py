"""What the verification before the first update costs: seconds, and a fraction of a short run.

For each model, one process, one thread:

* ``verify_s``: the median over ``--repeats`` calls of
  :func:`lightning_autodp.safeguards.verify.verify_engine`
  on the first micro-batch (``k`` examples alone, each with its own backward, one more for the
  determinism check, plus one engine pass on the ``k`` examples together), the engine chosen by
  ``engine="auto"``;
* ``step_s``: the median time of one DP training step (``Trainer`` with ``dp_auto``, verify off),
  after warm-up;
* ``run_s``: the wall time of a ``--steps``-step fit with verify off; ``fraction`` =
  ``verify_s / run_s`` and ``steps`` = ``verify_s / step_s`` (the overhead in training steps).

Models: a small CNN (two convolutions with GroupNorm, 32x32 RGB, batch 64) and a tiny GPT-2 from
a transformers config (2 layers, d=64, T=32, batch 16, position ids expanded to the batch).

Usage::

    python benchmarks/verify_cost.py            # prints a table, writes benchmarks/results/verify_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_autodp import DPAutoStrategy
from lightning_autodp.engines import make_engine
from lightning_autodp.safeguards.verify import verify_engine

HERE = Path(__file__).resolve().parent


class CNN(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
        )  # fmt: skip

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class GPT2(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.model = GPT2LMHeadModel(
            GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=2, n_head=4)
        )

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> Tensor:
        (ids,) = batch
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        logits = self.model(input_ids=ids, position_ids=positions).logits[:, :-1]
        return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(name: str, n: int) -> tuple[L.LightningModule, DataLoader]:
    g = torch.Generator().manual_seed(0)
    if name == "cnn":
        data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
        return CNN(), DataLoader(data, batch_size=64)
    data = TensorDataset(torch.randint(0, 256, (n, 32), generator=g))
    return GPT2(), DataLoader(data, batch_size=16)


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._t)


def measure(name: str, steps: int, repeats: int, examples: int) -> dict[str, Any]:
    torch.manual_seed(0)
    module, loader = _data(name, n=64 * steps)
    timer = StepTimer()
    trainer = L.Trainer(
        strategy=DPAutoStrategy(noise_multiplier=1.0, poisson_sampling=False, verify=False),
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, callbacks=[timer],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, loader)
    run_s = time.perf_counter() - start
    step_s = statistics.median(timer.times[2:])

    batch = next(iter(loader))
    engine = make_engine("auto", module)
    module.train()
    verify_engine(module, engine, (batch, 0), examples=examples)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        verify_engine(module, engine, (batch, 0), examples=examples)
        times.append(time.perf_counter() - t)
    engine.remove()
    verify_s = statistics.median(times)
    return dict(
        model=name, engine=engine.name, examples=examples, verify_s=verify_s, step_s=step_s,
        run_steps=steps, run_s=run_s, fraction=verify_s / run_s, steps=verify_s / step_s,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="steps of the short run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--examples", type=int, default=4, help="DPAutoStrategy(verify_examples=...)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "verify_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(name, args.steps, args.repeats, args.examples) for name in ("cnn", "gpt2")]
    print(
        f"{'model':6} {'engine':6} {'verify s':>9} {'step s':>8} {'= steps':>8} {'run s':>7} {'fraction':>9}"
    )
    for r in rows:
        print(
            f"{r['model']:6} {r['engine']:6} {r['verify_s']:9.3f} {r['step_s']:8.3f} {r['steps']:8.1f} "
            f"{r['run_s']:7.1f} {r['fraction']:9.2%}"
        )
    args.out.write_text(json.dumps({"threads": 1, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
