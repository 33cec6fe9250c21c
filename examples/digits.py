"""Differentially private image classification on scikit-learn's digits, beside a non-private run.

    python examples/digits.py                         # DP at epsilon = 3 and non-private, test accuracy
    python examples/digits.py --target-epsilon 8      # another budget: sigma is calibrated for it
    python examples/digits.py --noise-multiplier 1.0 --max-epochs -1   # fixed sigma: train until
                                                      # the budget (epsilon 3) is spent
    python examples/digits.py --devices 2             # 2-process DDP on CPU
    python examples/digits.py --smoke                 # a few steps, to check the installation

The LightningModule is ordinary: nothing in it knows about DP. The only change is the Trainer's
``strategy="dp_auto"`` (and, for a privacy budget, the ``PrivacyBudget`` callback).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

import lightning_autodp
from lightning_autodp import DPAutoStrategy
from lightning_autodp.integration.report import PrivacyReport
from lightning_autodp.mechanism.clipping import CLIPPING_MODES, DEFAULT_CLIPPING

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_utils import EpochLine, HelpFormatter, apply_smoke, quiet_lightning  # noqa: E402


class DigitsDataModule(L.LightningDataModule):
    """The 1,797 8x8 digit images that ship with scikit-learn: 70% train, 10% val, 20% test."""

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        images, labels = load_digits(return_X_y=True)
        x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        y = torch.tensor(labels)
        idx = torch.arange(len(y)).numpy()
        train_idx, test_idx = train_test_split(idx, test_size=0.2, random_state=self.seed, stratify=labels)
        train_idx, val_idx = train_test_split(
            train_idx, test_size=0.125, random_state=self.seed, stratify=labels[train_idx]
        )
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(x[test_idx], y[test_idx])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)


class DigitsClassifier(L.LightningModule):
    """A small CNN with GroupNorm (BatchNorm mixes examples and has no per-example gradient)."""

    def __init__(self, lr: float = 2e-3, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.GroupNorm(4, width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GroupNorm(4, 2 * width),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 4 * 4, 10),
        )
        self.val_acc = MulticlassAccuracy(num_classes=10)
        self.test_acc = MulticlassAccuracy(num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def train(private: bool, args: argparse.Namespace) -> dict[str, float | str]:
    L.seed_everything(args.seed, verbose=False)
    model = DigitsClassifier(lr=args.lr)
    data = DigitsDataModule(batch_size=args.batch_size, seed=args.seed)
    label = "DP" if private else "non-private"
    callbacks: list[L.Callback] = []
    budget = None
    strategy: object = "ddp" if args.devices > 1 else "auto"
    logger: CSVLogger | bool = False
    if private:
        # noise_multiplier=None: PrivacyBudget calibrates sigma so that the planned epochs spend
        # the target; a fixed --noise-multiplier trains until the target is spent instead.
        strategy = DPAutoStrategy(
            noise_multiplier=args.noise_multiplier, engine=args.engine, clipping=args.clipping
        )
        budget = lightning_autodp.PrivacyBudget(target_epsilon=args.target_epsilon, delta=args.delta)
        report = PrivacyReport(metric="val_acc")
        callbacks += [budget, report]
        logger = CSVLogger(args.log_dir, name="digits_dp")  # where privacy_report.png goes
    callbacks.append(EpochLine(label, ("val_acc",), every=args.print_every, budget=budget))
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=args.devices,
        max_epochs=args.max_epochs,
        max_steps=args.max_steps,
        callbacks=callbacks,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    result: dict[str, float | str] = {
        "test_acc": trainer.test(model, data, verbose=False)[0]["test_acc"],
        "seconds": seconds,
    }
    if private:
        result["noise_multiplier"] = trainer.strategy.noise_multiplier
        result["steps"] = trainer.strategy.steps
        result["sample_rate"] = trainer.strategy.sample_rate
        result["epsilon"] = budget.epsilon
        result["report"] = str(report.path)
    return result


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--max-epochs", type=int, default=40, help="-1: until the budget is spent")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64, help="expected logical batch size")
    # 5e-3: the learning rate benchmarks/utility.py chose (by validation, 5 seeds) for DP-Adam with
    # PSAC (r = 1) and with AUTO-S at epsilon 3, batch 64, 40 epochs; 2e-3 cost DP about 2 points of
    # test accuracy there.
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (both runs)")
    parser.add_argument("--target-epsilon", type=float, default=3.0, help="privacy budget at --delta")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument(
        "--noise-multiplier", type=float, default=None, help="fixed sigma; None: calibrated to the target"
    )
    parser.add_argument("--engine", default="auto", choices=["auto", "bk", "ghost", "hooks"])
    parser.add_argument(
        "--clipping",
        default=DEFAULT_CLIPPING,
        choices=CLIPPING_MODES,
        help="the DP run's clipping (gamma: its default)",
    )
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (DDP when > 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-non-private", action="store_true")
    parser.add_argument("--print-every", type=int, default=5, help="one line every this many epochs")
    parser.add_argument("--log-dir", default="lightning_logs", help="the DP run's CSV log and report")
    parser.add_argument("--smoke", action="store_true", help="1 epoch (20 steps): check the installation")
    args = apply_smoke(parser.parse_args(argv), {"max_epochs": 1, "max_steps": -1})
    quiet_lightning()
    torch.set_num_threads(max(1, torch.get_num_threads() // args.devices))

    results = {"dp": train(True, args)}
    if not args.skip_non_private:
        if args.max_epochs == -1 and args.max_steps == -1:
            # "Until the budget is spent" has no end without DP: give the baseline the same steps.
            args = argparse.Namespace(**{**vars(args), "max_steps": int(results["dp"]["steps"])})
        results["non_private"] = train(False, args)
    if L.fabric.utilities.rank_zero.rank_zero_only.rank == 0:
        print_results(results, args.delta)
    return results


def print_results(results: dict[str, dict[str, float | str]], delta: float) -> None:
    """Test accuracy of both runs side by side, the privacy spent, and where the report was written."""
    dp = results["dp"]
    print(f"\n{'run':<12} {'test acc':>8} {'epsilon':>8} {'sigma':>7} {'q':>7} {'steps':>6} {'seconds':>8}")
    print(
        f"{'dp_auto':<12} {dp['test_acc']:>8.4f} {dp['epsilon']:>8.2f} {dp['noise_multiplier']:>7.3f} "
        f"{dp['sample_rate']:>7.4f} {dp['steps']:>6} {dp['seconds']:>8.1f}"
    )
    if "non_private" in results:
        plain = results["non_private"]
        print(
            f"{'non-private':<12} {plain['test_acc']:>8.4f} {'inf':>8} {'-':>7} {'-':>7} {'-':>6} "
            f"{plain['seconds']:>8.1f}"
        )
    print(f"epsilon at delta = {delta:g}; privacy report: {dp['report']}")


if __name__ == "__main__":
    main()
