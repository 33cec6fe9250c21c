"""``python -m lightning_autodp.safeguards.audit``: audit a DP-SGD run of a small MLP on digits.

Trains with ``strategy="dp_auto"``, a :class:`~lightning_autodp.PrivacyBudget` and a
:class:`~lightning_autodp.safeguards.audit.PrivacyAudit`, then prints the accounted epsilon beside the
empirical lower bound and the audit's ceiling. Needs scikit-learn (``pip install -e ".[examples]"``).

    python -m lightning_autodp.safeguards.audit --target-epsilon 4 --epochs 20 --m 2000

The defaults sit where the audit has power: at delta = 1e-5, m = 2000 canaries can show at most
epsilon 5.42 (the ceiling, near its peak over m), above the target 4, so a mechanism that leaks
much more than it accounts can be flagged. At a target above the ceiling (e.g. 8) no number of
canaries can show a violation at this delta, and the result says so.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_autodp.integration.callbacks import PrivacyBudget
from lightning_autodp.integration.strategy import DPAutoStrategy
from lightning_autodp.mechanism.clipping import CLIPPING_MODES, ClippingMode
from lightning_autodp.safeguards.audit.canaries import PrivacyAudit


class DigitsMLP(L.LightningModule):
    """64-128-10 MLP trained with plain SGD (the optimizer the canary score assumes)."""

    def __init__(self, lr: float = 2.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def digits_loaders(batch_size: int) -> tuple[DataLoader, TensorDataset]:
    """Train loader (80%) and test set of scikit-learn's digits, pixels scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        message = (
            'python -m lightning_autodp.safeguards.audit needs scikit-learn: pip install -e ".[examples]"'
        )
        raise SystemExit(message) from err
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(x))
    train, test = perm[:split], perm[split:]
    train_loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size)
    return train_loader, TensorDataset(x[test], y[test])


@dataclass
class DigitsRun:
    seconds: float
    accounted_epsilon: float
    test_accuracy: float
    audit: PrivacyAudit | None


def run_digits(
    audit_m: int | None = 2000,
    target_epsilon: float = 4.0,
    delta: float = 1e-5,
    epochs: int = 20,
    batch_size: int = 128,
    seed: int = 0,
    verbose: bool = True,
    clipping: ClippingMode = "psac",
) -> DigitsRun:
    """One DP run on digits, audited with ``audit_m`` canaries (``None``: not audited)."""
    L.seed_everything(seed, verbose=False)
    train, test = digits_loaders(batch_size)
    model = DigitsMLP()
    budget = PrivacyBudget(target_epsilon=target_epsilon, delta=delta)
    audit = PrivacyAudit(m=audit_m, seed=seed) if audit_m else None
    trainer = L.Trainer(
        strategy=DPAutoStrategy(clipping=clipping),
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=[budget] + ([audit] if audit else []),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, train)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        x, y = test.tensors
        accuracy = float((model(x).argmax(1) == y).float().mean())
    if verbose:
        print(f"accounted epsilon {budget.epsilon:.3f} (delta={delta:g}), test accuracy {accuracy:.3f}")
    return DigitsRun(seconds, budget.epsilon, accuracy, audit)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_autodp.safeguards.audit", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--m", type=int, default=2000, help="number of gradient canaries")
    parser.add_argument("--target-epsilon", type=float, default=4.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clipping", default="psac", choices=CLIPPING_MODES)
    args = parser.parse_args(argv)
    run_digits(
        args.m,
        args.target_epsilon,
        args.delta,
        args.epochs,
        args.batch_size,
        args.seed,
        clipping=args.clipping,
    )


if __name__ == "__main__":
    main()
