"""What the example scripts share: ``--help`` with defaults, a quiet console, one line per epoch."""

from __future__ import annotations

import argparse
import logging
import math
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` shows every option's default (also those without a help text) and keeps the
    module docstring's line breaks; on/off flags show none."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and action.nargs != 0:
            action.help = "(default: %(default)s)"  # argparse would skip an option without help
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0:  # store_true/--help: "(default: False)" says nothing
            return action.help
        return super()._get_help_string(action)


#: Lightning's start-up lines that say nothing about this run (hardware it does not use, an
#: advertisement, the stop reason that dp_auto's own end-of-fit line repeats with the privacy spent).
_NOISE_PREFIXES = ("💡 Tip", "GPU available", "TPU available", "HPU available", "`Trainer.fit` stopped")


class _DropLightningNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_NOISE_PREFIXES)


def quiet_lightning() -> None:
    """Silence exactly the messages that are noise in these examples, nothing else.

    * torch 2.13 deprecates ``isinstance(x, LeafSpec)``, which Lightning 2.6 still calls once per
      ``self.log`` of a new key: a ``FutureWarning`` about Lightning's code, not the user's.
    * Lightning's info lines listed in ``_NOISE_PREFIXES``.
    """
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    noise_filter = _DropLightningNoise()
    for handler in logging.getLogger("lightning.pytorch").handlers + logging.getLogger().handlers:
        if not any(isinstance(f, _DropLightningNoise) for f in handler.filters):
            handler.addFilter(noise_filter)


def quiet_transformers() -> None:
    """The text examples load MiniLM without its pooler (unused): no load report, no progress bar.

    Also drops peft's read of ``is_gradient_checkpointing``, which transformers deprecates (a
    ``FutureWarning`` about peft's code, not the user's).
    """
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings(
        "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )


class EpochLine(L.Callback):
    """One short line per epoch (every ``every`` epochs, the last, and a stop) with the metrics that matter.

    Used instead of the progress bar, whose redraws fill a log file and which shows ``v_num``.
    Printed at the end of the training epoch, after its validation; epsilon comes from the
    PrivacyBudget itself (its logged value reaches ``callback_metrics`` only after this hook).
    """

    def __init__(
        self, label: str, metrics: tuple[str, ...], every: int = 1, budget: Any | None = None
    ) -> None:
        self.label = label
        self.metrics = metrics
        self.every = max(1, every)
        self.budget = budget

    @rank_zero_only
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch, last = trainer.current_epoch + 1, trainer.max_epochs
        if epoch % self.every and epoch != last and not trainer.should_stop:
            return
        shown = [_fmt(k, trainer.callback_metrics[k]) for k in self.metrics if k in trainer.callback_metrics]
        if self.budget is not None:
            shown.append(_fmt("epsilon", self.budget.epsilon))
        total = f"/{last}" if last and last > 0 else ""
        head = f"  {self.label} epoch {epoch}{total}, step {trainer.global_step}: "
        print(head + ", ".join(shown), flush=True)


def _fmt(name: str, value: Any) -> str:
    value = float(value)
    return f"{name} {value:.4g}" if math.isfinite(value) else f"{name} {value}"


def apply_smoke(args: argparse.Namespace, smoke: dict[str, Any]) -> argparse.Namespace:
    """``--smoke``: replace the sizes by ``smoke``'s, for a run of seconds through the same code path."""
    if getattr(args, "smoke", False):
        for key, value in smoke.items():
            setattr(args, key, value)
    return args
