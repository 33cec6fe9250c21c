"""The cost of the run-time checks: time inside the checks' hooks, as a share of the step time.

Trains a model with ``DPAutoStrategy(run_checks=True)`` and times every call of the checks' hooks
(:class:`~lightning_autodp.safeguards.checks.RunTimeChecks`) with ``time.perf_counter``; the share
is that time over the wall time of ``trainer.fit``, from its second step on (the first step's full
checks run once per fit and are reported apart). Also times the same fit with ``run_checks=False``,
alternating, for the end-to-end ratio (noisy on a shared machine: the hook share is the number to
read).

    python benchmarks/checks_cost.py --steps 300 --repeats 3

Models: the audit CLI's digits MLP (64-128-10, batch 128) and an MLP 784-512-512-10 (batch 256),
both on random data of their shape.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_autodp import DPAutoStrategy
from lightning_autodp.safeguards.checks import RunTimeChecks

HOOKS = ("on_fit_start", "before_noise", "on_batch_sampled", "after_privatize", "after_step")
MODELS = {"digits_mlp": ((64, 128, 10), 1437, 128), "mlp_784_512_512": ((784, 512, 512, 10), 60000, 256)}


class Net(L.LightningModule):
    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        self.net = nn.Sequential(*layers[:-1])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Timed:
    """Wraps the checks' hooks of every RunTimeChecks instance to add up their wall time."""

    def __init__(self) -> None:
        self.seconds = {"first": 0.0, "later": 0.0}
        self.originals = {name: getattr(RunTimeChecks, name) for name in HOOKS}

    def __enter__(self) -> Timed:
        for name, original in self.originals.items():
            setattr(RunTimeChecks, name, self._wrap(original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self.originals.items():
            setattr(RunTimeChecks, name, original)

    def _wrap(self, original):  # noqa: ANN001, ANN202 - a timing wrapper
        timer = self

        def timed(checks: RunTimeChecks, ctx, *args):  # noqa: ANN001, ANN202
            start = time.perf_counter()
            try:
                return original(checks, ctx, *args)
            finally:
                timer.seconds["first" if ctx.fit_step == 0 else "later"] += time.perf_counter() - start

        return timed


def fit_seconds(model: str, steps: int, run_checks: bool) -> tuple[float, dict[str, float]]:
    sizes, n, batch = MODELS[model]
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(n, sizes[0], generator=g), torch.randint(0, sizes[-1], (n,), generator=g)
    )
    torch.manual_seed(0)
    trainer = L.Trainer(
        strategy=DPAutoStrategy(noise_multiplier=1.0, clipping="psac", run_checks=run_checks, seed=0),
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with Timed() as timed:
        start = time.perf_counter()
        trainer.fit(Net(sizes), DataLoader(data, batch_size=batch))
        seconds = time.perf_counter() - start
    return seconds, timed.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "checks_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rows = []
    for model in MODELS:
        on, off, later, first = [], [], [], []
        for _ in range(args.repeats):
            seconds, hooks = fit_seconds(model, args.steps, True)
            on.append(seconds)
            later.append(hooks["later"] / seconds)
            first.append(hooks["first"])
            off.append(fit_seconds(model, args.steps, False)[0])
        rows.append(
            {
                "model": model,
                "steps": args.steps,
                "repeats": args.repeats,
                "ms_per_step_checks_on": 1e3 * statistics.median(on) / args.steps,
                "ms_per_step_checks_off": 1e3 * statistics.median(off) / args.steps,
                "end_to_end_ratio_on_over_off": statistics.median(on) / statistics.median(off),
                "hook_share_after_first_step": statistics.median(later),
                "first_step_checks_ms": 1e3 * statistics.median(first),
            }
        )
        print(json.dumps(rows[-1]))
    summary = {
        "what": "run-time checks (check_every=10, check_coordinates=4096) vs run_checks=False",
        "rows": rows,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
