"""LightningCLI with ``strategy: dp_auto`` and a ``PrivacyBudget`` callback set from YAML.

Run::

    python examples/cli.py fit --config examples/configs/digits.yaml
    python examples/cli.py fit --config examples/configs/digits.yaml --trainer.max_epochs 2 \\
        --trainer.callbacks+=lightning_autodp.integration.report.PrivacyReport
    python examples/cli.py fit --config examples/configs/digits_nonprivate.yaml   # the baseline
    python examples/cli.py fit --config examples/configs/digits.yaml --smoke      # 1 epoch (20 steps)

The model and data are given by ``class_path`` in the config (any LightningModule /
LightningDataModule works; the configs use the ones in ``examples/digits.py``). Importing
``lightning_autodp`` registers ``"dp_auto"`` with Lightning's strategy registry, which is what
lets a config say ``strategy: dp_auto``; ``class_path: lightning_autodp.DPAutoStrategy`` with
``init_args`` sets its options (``clipping``, ``gamma``, ``max_grad_norm``, ``engine``, ...).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import lightning_autodp  # noqa: F401  (registers strategy="dp_auto")

# The configs name classes from the example scripts next to this file (digits.DigitsClassifier).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_utils import quiet_lightning  # noqa: E402


class ExampleCLI(LightningCLI):
    """LightningCLI with the other examples' ``--smoke``: one epoch, whatever the config says."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--smoke",
            action="store_true",
            help="1 epoch (20 steps), overriding --trainer.max_epochs/max_steps: check the installation",
        )

    def before_instantiate_classes(self) -> None:
        # A parsed flag rather than argv surgery: it is listed by --help, works anywhere after the
        # subcommand, and the saved config.yaml shows the epochs the run actually had.
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("smoke"):
            config.trainer.max_epochs = 1
            config.trainer.max_steps = -1


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]`` (used by the tests)."""
    quiet_lightning()  # as the other examples: no LeafSpec FutureWarning, no Lightning tips
    return ExampleCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    cli_main()
