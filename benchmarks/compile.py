"""dp_auto with ``torch.compile`` vs eager: step time, compile time and recompilations.

One small encoder (``benchmarks/run.py``'s ``Encoder``) trains under ``DPAutoStrategy(engine="bk")``
for ``--steps`` steps, eager and compiled (``torch.compile(module, backend=--backend)``), with
Poisson sampling (the batch size changes every step, as in private training) or fixed batches
(``--fixed``). Reported: the median step time after ``--warmup`` steps, the time of the first
``--warmup`` steps (where compilation happens), and torch._dynamo's counters: graphs compiled
(``unique_graphs``), frames compiled (``frames ok``: a function compiled again after a guard failed,
e.g. on a new batch size, counts again) and graph breaks. Dynamo's log says when a function reached
its recompile limit and runs eagerly from then on.

Usage::

    python benchmarks/compile.py                     # CPU, inductor, writes benchmarks/results/
    python benchmarks/compile.py --device cuda --d 768 --layers 12 --seq 512 --batch 8
    python benchmarks/compile.py --tiny --backend eager --out /tmp/x   # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _encoder
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def measure(compiled: bool, args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L
    import torch._dynamo
    from torch._dynamo.utils import counters
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_autodp import DPAutoStrategy

    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    net = _encoder.build_encoder(args)
    n = args.batch * args.steps
    x, y = torch.randint(0, args.vocab, (n, args.seq)), torch.randint(0, args.vocab, (n, args.seq))
    times: list[float] = []
    cuda = args.device == "cuda"

    class Timer(L.Callback):
        def on_train_batch_start(self, *rest: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *rest: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    task: Any = _encoder.encoder_task(net)
    if compiled:
        task = torch.compile(task, backend=args.backend)
    strategy = DPAutoStrategy(
        noise_multiplier=1.0, engine="bk", poisson_sampling=not args.fixed, verify=False
    )
    trainer = L.Trainer(
        strategy=strategy, accelerator="gpu" if cuda else "cpu", devices=1, max_steps=args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Timer()],
    )  # fmt: skip
    trainer.fit(task, DataLoader(TensorDataset(x, y), batch_size=args.batch))
    timed = times[args.warmup :]
    return dict(
        mode=f"compiled ({args.backend})" if compiled else "eager",
        median_step_s=statistics.median(timed) if timed else float("nan"),
        first_steps_s=sum(times[: args.warmup]),
        unique_graphs=int(counters["stats"].get("unique_graphs", 0)),
        frames_compiled=int(counters["frames"].get("ok", 0)),
        graph_breaks=int(sum(counters["graph_break"].values())),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _encoder.add_device_argument(parser)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--fixed", action="store_true", help="fixed batches instead of Poisson sampling")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    _encoder.add_encoder_arguments(
        parser,
        dict(d=64, heads=4, layers=2, seq=32, vocab=500),
        tiny_help="tiny sizes, 3 steps: only checks that it runs",
    )
    _encoder.add_out_argument(parser)
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.warmup, args.batch = 3, 1, 4
        _encoder.use_tiny_encoder(args)
    torch.set_num_threads(2)
    device = _encoder.device_label(args.device)
    rows = [measure(False, args), measure(True, args)]
    sampling = "fixed batches" if args.fixed else "Poisson sampling"
    lines = [
        f"# torch.compile under dp_auto ({device}, {datetime.date.today()})",
        "",
        f"Encoder d={args.d}, {args.layers} layers, T={args.seq}; expected batch {args.batch}, {sampling}; "
        f"engine bk; {args.steps} steps, median over the last {args.steps - args.warmup}; "
        f"torch {torch.__version__}.",
        "",
        "| mode | median step s | first steps s | graphs | frames compiled | graph breaks |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['median_step_s']:.4f} | {r['first_steps_s']:.1f} | {r['unique_graphs']} | "
            f"{r['frames_compiled']} | {r['graph_breaks']} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    _encoder.write_results("compile", args, device, rows, text)


if __name__ == "__main__":
    main()
