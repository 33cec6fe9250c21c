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
import sys
import time
from pathlib import Path
from typing import Any

import _encoder
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def measure(cap: int | None, args: argparse.Namespace) -> dict[str, Any]:
    """A warm-up, a timed and a memory-profiled step of dp_auto (engine bk) with this cap."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_autodp import DPAutoStrategy

    run = _encoder.run_module()
    cuda = args.device == "cuda"
    torch.manual_seed(0)
    net = _encoder.build_encoder(args)
    x = torch.randint(0, args.vocab, (3 * args.batch, args.seq))
    y = torch.randint(0, args.vocab, (3 * args.batch, args.seq))
    result: dict[str, Any] = {}

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
    trainer.fit(_encoder.encoder_task(net), DataLoader(TensorDataset(x, y), batch_size=args.batch))
    params_mb = sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20
    return dict(cap=cap, batch=args.batch, params_mb=params_mb, steps=strategy.steps, **result)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _encoder.add_device_argument(parser)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--caps", default="64,32,16,8", help="comma-separated caps (no cap always runs)")
    _encoder.add_encoder_arguments(
        parser,
        dict(d=128, heads=4, layers=2, seq=64, vocab=1000),
        tiny_help="tiny sizes: only checks that it runs",
    )
    _encoder.add_out_argument(parser)
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.caps = 8, "3"
        _encoder.use_tiny_encoder(args)
    torch.set_num_threads(2)
    device = _encoder.device_label(args.device)
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
    _encoder.write_results("physical_batch", args, device, rows, text)


if __name__ == "__main__":
    main()
