"""What PrivacyBudget costs: accounting time against the training time of a small model.

A 60-epoch run of 235 optimizer steps per epoch (q = 1/235, 14,100 steps), trained twice with
the same sigma: once with ``PrivacyBudget(target_epsilon=3, delta=1e-5, accountant="prv")``
(which calibrates sigma, searches the stopping step, checks every step and logs epsilon every
epoch) and once without it. Reported: the time spent inside the callback's hooks, the fit wall
times, and their ratios. Results go to ``benchmarks/results/accounting_results.{json,md}``.

Usage::

    python benchmarks/accounting_cost.py            # 60 epochs (a few minutes)
    python benchmarks/accounting_cost.py --epochs 3 # quick look
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_autodp
from lightning_autodp import DPAutoStrategy, PrivacyBudget

STEPS_PER_EPOCH, BATCH = 235, 64
HOOKS = (
    "setup",
    "on_train_start",
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_train_end",
    "teardown",
)


class SmallMLP(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = STEPS_PER_EPOCH * BATCH
    x = torch.randn(n, 64, generator=g)
    y = (x[:, :10].argmax(1) + (torch.rand(n, generator=g) < 0.1).long()) % 10
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def _timed(budget: PrivacyBudget) -> dict[str, float]:
    """Wrap the callback's hooks in timers (Lightning looks them up on the instance)."""
    spent: dict[str, float] = {name: 0.0 for name in HOOKS}
    for name in HOOKS:
        hook = getattr(budget, name)

        @functools.wraps(hook)
        def wrapper(*args, _hook=hook, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _hook(*args, **kwargs)
            finally:
                spent[_name] += time.perf_counter() - start

        setattr(budget, name, wrapper)
    return spent


def _fit(epochs: int, sigma: float | None, budget: PrivacyBudget | None) -> tuple[float, DPAutoStrategy]:
    L.seed_everything(0, verbose=False)
    strategy = DPAutoStrategy(noise_multiplier=sigma if sigma is not None else "auto")
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=[budget] if budget is not None else [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(SmallMLP(), _data())
    return time.perf_counter() - start, strategy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "accounting_results")
    args = parser.parse_args()
    torch.set_num_threads(2)

    budget = PrivacyBudget(target_epsilon=3.0, delta=1e-5, accountant="prv")
    spent = _timed(budget)
    with_budget, strategy = _fit(args.epochs, None, budget)
    sigma = strategy.noise_multiplier
    without_budget, _ = _fit(args.epochs, sigma, None)

    accounting = sum(spent.values())
    result = {
        "epochs": args.epochs,
        "steps": strategy.steps,
        "sample_rate": strategy.sample_rate,
        "noise_multiplier": sigma,
        "epsilon": budget.epsilon,
        "accountant": "prv",
        "accountant_evaluations": budget._accountant.calls,
        "fit_seconds_with_budget": with_budget,
        "fit_seconds_without_budget": without_budget,
        "hook_seconds": spent,
        "accounting_seconds": accounting,
        "accountant_compute_seconds": budget._accountant.seconds,
        "accounting_share_of_training": accounting / without_budget,
        "wall_time_ratio": with_budget / without_budget,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "versions": {
            "torch": torch.__version__,
            "lightning": L.__version__,
            "lightning_autodp": lightning_autodp.__version__,
        },
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    rows = "\n".join(f"| `{k}` | {v * 1000:.1f} ms |" for k, v in spent.items() if v > 0)
    args.out.with_suffix(".md").write_text(
        f"# PrivacyBudget accounting cost\n\n"
        f"{args.epochs} epochs x {STEPS_PER_EPOCH} steps (q = 1/{STEPS_PER_EPOCH}), small MLP 64-256-256-10, "
        f"batch {BATCH}, PRV accountant, target epsilon 3 at delta 1e-5 (sigma calibrated to {sigma:.4f}, "
        f"final epsilon {budget.epsilon:.4f}).\n\n"
        f"| | value |\n| --- | --- |\n"
        f"| fit without PrivacyBudget | {without_budget:.1f} s |\n"
        f"| fit with PrivacyBudget | {with_budget:.1f} s |\n"
        f"| time inside PrivacyBudget's hooks | {accounting:.2f} s "
        f"({100 * accounting / without_budget:.2f}% of training) |\n"
        f"| accountant evaluations | {budget._accountant.calls} |\n"
        f"| their compute time, background thread included | {budget._accountant.seconds:.2f} s |\n\n"
        "The epoch-end epsilons are computed in a background thread while the epoch trains; on this "
        "2-core machine that thread competes with training for the CPU, which the wall-time difference "
        "shows.\n\n"
        f"Time per hook (summed over the run):\n\n| hook | time |\n| --- | --- |\n{rows}\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
