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
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _encoder_class():
    spec = importlib.util.spec_from_file_location("run_benchmark", HERE / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.Encoder


def measure(compiled: bool, args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L
    import torch._dynamo
    import torch.nn.functional as F
    from torch._dynamo.utils import counters
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_autodp import DPAutoStrategy

    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    net = _encoder_class()(args.vocab, args.seq, args.d, args.heads, 4 * args.d, args.layers)
    n = args.batch * args.steps
    x, y = torch.randint(0, args.vocab, (n, args.seq)), torch.randint(0, args.vocab, (n, args.seq))
    times: list[float] = []
    cuda = args.device == "cuda"

    class Task(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            return F.nll_loss(self.net(xb), yb.reshape(-1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class Timer(L.Callback):
        def on_train_batch_start(self, *rest: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *rest: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    task: Any = Task()
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
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--fixed", action="store_true", help="fixed batches instead of Poisson sampling")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=500)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, 3 steps: only checks that it runs")
    parser.add_argument(
        "--out", type=Path, default=None, help="results prefix (default benchmarks/results/...)"
    )
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.warmup, args.batch, args.d, args.heads, args.layers, args.seq, args.vocab = (
            3, 1, 4, 16, 2, 1, 8, 50,
        )  # fmt: skip
    torch.set_num_threads(2)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.machine()})"
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
    tag = "cuda_" + device.replace(" ", "_") if args.device == "cuda" else "cpu"
    prefix = args.out or HERE / "results" / f"compile_{datetime.date.today()}_{tag}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=device, torch=torch.__version__, args={k: str(v) for k, v in vars(args).items()})
    Path(str(prefix) + ".json").write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    Path(str(prefix) + ".md").write_text(text)


if __name__ == "__main__":
    main()
