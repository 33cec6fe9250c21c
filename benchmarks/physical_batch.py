"""Peak memory and step time of one dp_auto step against ``max_physical_batch_size``.

The same model and the same batch of ``--batch`` examples (``poisson_sampling=False``: every step has
exactly that many, the worst case a Poisson draw can reach) are trained with no cap and with each
cap of ``--caps``; each configuration runs a warm-up step, a timed step and a profiled step. Peak memory is
that of live tensors during the measured step: ``torch.cuda.max_memory_allocated`` on a GPU, on the
CPU torch.profiler's memory timeline (the helper of ``benchmarks/run.py``). The peak should fall with
the cap towards the model's own state (parameters, gradients, the step's clipped sum); the update is
the same (``tests/test_physical_batch.py``).

Usage::

    python benchmarks/physical_batch.py                       # CPU, writes benchmarks/results/
    python benchmarks/physical_batch.py --device cuda --d 768 --layers 12 --seq 512 --batch 64
    python benchmarks/physical_batch.py --tiny --out /tmp/x   # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _run_module():
    spec = importlib.util.spec_from_file_location("run_benchmark", HERE / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def measure(cap: int | None, args: argparse.Namespace) -> dict[str, Any]:
    """A warm-up, a timed and a memory-profiled step of dp_auto (engine bk) with this cap."""
    import lightning as L
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_autodp import DPAutoStrategy

    run = _run_module()
    cuda = args.device == "cuda"
    torch.manual_seed(0)
    net = run.Encoder(args.vocab, args.seq, args.d, args.heads, 4 * args.d, args.layers)
    x = torch.randint(0, args.vocab, (3 * args.batch, args.seq))
    y = torch.randint(0, args.vocab, (3 * args.batch, args.seq))
    result: dict[str, Any] = {}

    class Task(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            return F.nll_loss(self.net(xb), yb.reshape(-1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class Measure(L.Callback):
        """Step 0 warms up, step 1 is timed, step 2 is profiled for memory (the CPU profiler is slow)."""

        def on_train_batch_start(self, trainer, *rest: Any) -> None:
            run._sync(cuda)
            if trainer.global_step == 2:
                self.peak = run._PeakTensors(cuda).__enter__()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, *rest: Any) -> None:
            run._sync(cuda)
            if trainer.global_step == 2:  # global_step counts the step just taken
                result["step_s"] = time.perf_counter() - self.t0
            elif trainer.global_step == 3:
                self.peak.__exit__(None, None, None)
                result["peak_mb"] = self.peak.peak_mb

    strategy = DPAutoStrategy(
        noise_multiplier=1.0, engine="bk", poisson_sampling=False, max_physical_batch_size=cap, verify=False
    )
    trainer = L.Trainer(
        strategy=strategy, accelerator="gpu" if cuda else "cpu", devices=1, max_steps=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Measure()],
    )  # fmt: skip
    trainer.fit(Task(), DataLoader(TensorDataset(x, y), batch_size=args.batch))
    params_mb = sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20
    return dict(cap=cap, batch=args.batch, params_mb=params_mb, steps=strategy.steps, **result)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--caps", default="64,32,16,8", help="comma-separated caps (no cap always runs)")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: only checks that it runs")
    parser.add_argument(
        "--out", type=Path, default=None, help="results prefix (default benchmarks/results/...)"
    )
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.caps, args.d, args.heads, args.layers, args.seq, args.vocab = 8, "3", 16, 2, 1, 8, 50
    torch.set_num_threads(2)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.machine()})"
    caps = [None, *(int(c) for c in args.caps.split(","))]
    rows = [measure(cap, args) for cap in caps]
    base = rows[0]["peak_mb"]
    lines = [
        f"# max_physical_batch_size: peak memory of one step ({device}, {datetime.date.today()})",
        "",
        f"Encoder d={args.d}, {args.layers} layers, T={args.seq}, vocab {args.vocab}; batch {args.batch}; "
        f"engine bk; parameters {rows[0]['params_mb']:.1f} MB; torch {torch.__version__}.",
        "",
        "| max_physical_batch_size | peak tensor MB | peak / uncapped | step s |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        cap = "none" if r["cap"] is None else str(r["cap"])
        lines.append(f"| {cap} | {r['peak_mb']:.1f} | {r['peak_mb'] / base:.2f}x | {r['step_s']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    tag = "cuda_" + device.replace(" ", "_") if args.device == "cuda" else "cpu"
    prefix = args.out or HERE / "results" / f"physical_batch_{datetime.date.today()}_{tag}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=device, torch=torch.__version__, args={k: str(v) for k, v in vars(args).items()})
    Path(str(prefix) + ".json").write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    Path(str(prefix) + ".md").write_text(text)


if __name__ == "__main__":
    main()
