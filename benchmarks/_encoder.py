"""What the benchmark scripts share.

``benchmarks/compile.py`` and ``benchmarks/physical_batch.py`` train ``benchmarks/run.py``'s
``Encoder`` (a token tagger) under ``dp_auto`` and write a Markdown table and a JSON file of results:
the encoder's size arguments, the model and its LightningModule, the device label and the results
files are here, the measurements in each script. ``benchmarks/secure_noise.py`` uses the device and
results helpers, ``benchmarks/phases.py`` the loader of ``run.py``.
The scripts import it from their own folder (``python benchmarks/compile.py`` puts it first on
``sys.path``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import platform
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

HERE = Path(__file__).resolve().parent

#: the encoder's size arguments, in the order ``--help`` lists them
SIZES = ("d", "heads", "layers", "seq", "vocab")
#: the encoder's sizes under ``--tiny`` (each script shrinks its own batch and steps too)
TINY = dict(d=16, heads=2, layers=1, seq=8, vocab=50)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device cpu|cuda`` (default ``cpu``)."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")


def add_encoder_arguments(parser: argparse.ArgumentParser, defaults: dict[str, int], tiny_help: str) -> None:
    """``--d --heads --layers --seq --vocab`` (integers, ``defaults`` names each) and ``--tiny``."""
    for name in SIZES:
        parser.add_argument(f"--{name}", type=int, default=defaults[name])
    parser.add_argument("--tiny", action="store_true", help=tiny_help)


def use_tiny_encoder(args: argparse.Namespace) -> None:
    """Set the encoder's sizes in ``args`` to :data:`TINY`."""
    for name, value in TINY.items():
        setattr(args, name, value)


def device_label(device: str) -> str:
    """The GPU's name for ``"cuda"``, else ``"cpu (<machine>)"``: what the results name the device by."""
    return torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.machine()})"


@functools.cache
def run_module() -> ModuleType:
    """``benchmarks/run.py``, loaded once as the module ``run_benchmark``."""
    spec = importlib.util.spec_from_file_location("run_benchmark", HERE / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_encoder(args: argparse.Namespace) -> torch.nn.Module:
    """``run.py``'s ``Encoder`` at the sizes in ``args`` (feed-forward width ``4 * d``)."""
    return run_module().Encoder(args.vocab, args.seq, args.d, args.heads, 4 * args.d, args.layers)


def encoder_task(net: torch.nn.Module) -> Any:
    """A LightningModule that trains ``net`` to tag tokens: NLL loss, SGD with learning rate 1e-3."""
    import lightning as L
    import torch.nn.functional as F

    class Task(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            return F.nll_loss(self.net(xb), yb.reshape(-1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    return Task()


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """``--out PREFIX``: where :func:`write_results` writes (default ``benchmarks/results/...``)."""
    parser.add_argument(
        "--out", type=Path, default=None, help="results prefix (default benchmarks/results/...)"
    )


def write_results(
    name: str, args: argparse.Namespace, label: str, rows: list[dict[str, Any]], text: str
) -> None:
    """``<prefix>.json`` (device, torch, arguments and ``rows``) and ``<prefix>.md`` (``text``).

    The prefix is ``args.out``, else ``benchmarks/results/<name>_<date>_<cpu or cuda_<GPU name>>``.
    """
    tag = "cuda_" + label.replace(" ", "_") if args.device == "cuda" else "cpu"
    prefix = args.out or HERE / "results" / f"{name}_{datetime.date.today()}_{tag}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=label, torch=torch.__version__, args={k: str(v) for k, v in vars(args).items()})
    Path(str(prefix) + ".json").write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    Path(str(prefix) + ".md").write_text(text)
