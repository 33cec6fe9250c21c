"""dp_fsdp vs non-private FSDP2 vs dp_auto (DDP): per-rank memory and step time on 2 ranks.

Each configuration runs in a fresh set of processes (``torch.multiprocessing.spawn``, gloo on CPU
or nccl on CUDA), the same GPT-2 (transformers, random weights) and the same synthetic batches
on every configuration; a step is forward, backward, the DP work and ``Adam.step()``:

==============  ===================================================================================
``fsdp``        non-private FSDP2: ``fully_shard`` on every block and the root, ``loss.backward()``
``dp_fsdp``     what ``strategy="dp_fsdp"`` runs: the same sharding, ``BookKeepingEngine``,
                :class:`~lightning_autodp.mechanism.sharded.ShardedDPStep`
                (reduce-scatter of the clipped sums,
                noise on the owned shard)
``ddp``         non-private data parallelism: the whole model per rank, gradients all-reduced
``dp_auto``     what ``strategy="dp_auto"`` runs on 2 ranks: the whole model per rank,
                ``BookKeepingEngine``, :class:`~lightning_autodp.mechanism.step.DPStep` (bucketed all-reduce)
==============  ===================================================================================

Per rank (rank 0 reported; both hold the same amounts up to one row of padding):

* state memory: bytes of parameters + gradients + optimizer state this rank holds after a step
  (local shards under FSDP), the quantity sharding divides by the world size;
* peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the largest total of live
  tensors during one more (profiled, untimed) step, from torch.profiler's memory timeline (as
  ``benchmarks/run.py``), and the peak RSS (``ru_maxrss``) minus the RSS before the model is built;
* step time: median over the timed steps after warm-up.

The strategy-level loop (Lightning's Trainer) adds the same overhead to every DP mode; this
script times the mechanism itself, as ``benchmarks/run.py``'s ``*_loop`` modes do.

Usage::

    python benchmarks/fsdp.py                 # CPU, 2 gloo ranks; writes results/results_fsdp.{md,json}
    python benchmarks/fsdp.py --device cuda   # 2 GPUs (nccl) if there are 2, else 1 rank
    python benchmarks/fsdp.py --tiny          # a few seconds, for the test suite
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

MODES = ("fsdp", "dp_fsdp", "ddp", "dp_auto")
SIZES: dict[str, dict[str, int]] = {
    # large enough that parameters + Adam state dominate a rank's memory on this CPU
    "full": dict(layers=8, d=512, heads=8, seq=64, vocab=8192, batch=4, warmup=2, steps=6),
    "tiny": dict(layers=2, d=32, heads=2, seq=8, vocab=64, batch=2, warmup=1, steps=2),
}


def _gpt2(size: dict[str, int]) -> nn.Module:
    import transformers as tf

    config = tf.GPT2Config(
        vocab_size=size["vocab"], n_positions=size["seq"], n_embd=size["d"], n_layer=size["layers"],
        n_head=size["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(config)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _local_bytes(t: torch.Tensor) -> int:
    from lightning_autodp.mechanism.sharded import local_part

    local = local_part(t)
    return local.numel() * local.element_size()


def _state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for p in model.parameters():
        total += _local_bytes(p)
        if p.grad is not None:
            total += _local_bytes(p.grad)
    for state in optimizer.state.values():
        total += sum(_local_bytes(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return total


def _worker(
    rank: int, world: int, mode: str, size: dict[str, int], device_type: str, port: int, out: str
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world) if device_type == "cpu" else 4)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_autodp.engines.bookkeeping import BookKeepingEngine
    from lightning_autodp.mechanism.noise import NoiseSource
    from lightning_autodp.mechanism.sharded import ShardedDPStep
    from lightning_autodp.mechanism.step import DPStep, PrivacyLedger

    g = torch.Generator().manual_seed(rank)
    b, t = size["batch"], size["seq"]
    batches = [torch.randint(0, size["vocab"], (b, t), generator=g).to(device) for _ in range(2)]
    rss0 = _rss_mb()
    model = _gpt2(size).to(device)
    if mode in ("fsdp", "dp_fsdp"):
        mesh = init_device_mesh(device_type, (world,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    engine = BookKeepingEngine(model) if mode.startswith("dp_") else None
    step_cls = ShardedDPStep if mode == "dp_fsdp" else DPStep
    dp_step = step_cls(engine.params, "auto_s", 1.0, 0.01) if engine is not None else None
    noise, ledger = NoiseSource(seed=0, rank=rank), PrivacyLedger()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def all_reduce(x: torch.Tensor) -> None:
        dist.all_reduce(x)

    def step(i: int) -> None:
        ids = batches[i % 2]
        if engine is None:
            loss = model(ids, labels=ids).loss
            loss.backward()
            if mode == "ddp":
                for p in model.parameters():  # what DDP's reducer sums (no overlap: a lower bound)
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)
        else:
            engine.expect_batch_size(b)
            with engine.capturing():
                loss = model(ids, labels=ids).loss
                loss.backward()
            dp_step.clip_and_accumulate(engine, scale=1.0 / b)
            noise.start_step(i)
            drawer = noise if (dp_step.every_rank_draws_noise or rank == 0) else None
            dp_step.privatize(
                sigma=1.0, q=0.01, noise=drawer, ledger=ledger, divisor=b * world, reduce=all_reduce
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    times = []
    for i in range(size["warmup"] + size["steps"]):
        if device_type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        step(i)
        if device_type == "cuda":
            torch.cuda.synchronize()
        if i >= size["warmup"]:
            times.append(time.perf_counter() - start)
    tensor_peak = None
    if device_type == "cpu":
        from run import _memory_profiler, _tensor_peak_mb  # benchmarks/run.py's profiler peak

        with _memory_profiler() as prof:
            step(len(times) + size["warmup"])
        try:
            tensor_peak = _tensor_peak_mb(prof)
        except AssertionError as err:  # torch's memory profiler fails on some FSDP graphs
            print(f"{mode}: no tensor peak (torch.profiler memory timeline failed: {str(err)[:60]})")
    result = {
        "mode": mode,
        "rank": rank,
        "world": world,
        "step_s": statistics.median(times),
        "state_mb": _state_bytes(model, optimizer) / 2**20,
        "params_total_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }
    if device_type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["peak_mb"] = tensor_peak
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(mode: str, size: dict[str, int], device_type: str, world: int, out: Path) -> dict[str, Any]:
    mp.spawn(_worker, args=(world, mode, size, device_type, _free_port(), str(out)), nprocs=world)
    return json.loads(out.read_text())


def report(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    by = {r["mode"]: r for r in results}
    lines = [
        "# dp_fsdp: per-rank memory and step time",
        "",
        f"Generated by `python benchmarks/fsdp.py` on {meta['machine']}; "
        f"{meta['world']} ranks ({meta['backend']}), "
        f"GPT-2 {meta['size']['layers']} layers, d={meta['size']['d']}, vocab {meta['size']['vocab']}, "
        f"T={meta['size']['seq']}, {meta['size']['batch']} sequences per rank, Adam, "
        f"{by['fsdp']['params_total_m']:.1f} M parameters; median of {meta['size']['steps']} steps after "
        f"{meta['size']['warmup']} warm-up; one run.",
        "",
        "| mode | state MB / rank (params + grads + Adam) | peak tensor MB / rank | peak RSS MB / rank "
        "| step s | state vs ddp | peak vs ddp | step vs fsdp | step vs non-private of its kind |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        r = by[mode]
        base = by["fsdp" if "fsdp" in mode else "ddp"]
        lines.append(
            f"| {mode} | {r['state_mb']:.1f} | {_mb(r['peak_mb'])} | "
            f"{r.get('peak_rss_mb', float('nan')):.1f} | {r['step_s']:.3f} | "
            f"{r['state_mb'] / by['ddp']['state_mb']:.2f}x | "
            f"{_ratio(r['peak_mb'], by['ddp']['peak_mb'])} | {r['step_s'] / by['fsdp']['step_s']:.2f}x | "
            f"{r['step_s'] / base['step_s']:.2f}x |"
        )
    lines += [
        "",
        "state: what this rank keeps between steps (its parameter shard, gradient shard, Adam moments);"
        " peak tensor: " + ("torch.cuda.max_memory_allocated." if meta["backend"] == "nccl" else
                     "live tensors at the peak of a profiled step (torch.profiler memory timeline); "
                     "peak RSS: minus the RSS before the model was built (includes the allocator's caches)."),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a / b:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tiny", action="store_true", help="a few seconds: the smallest model, 2 steps")
    parser.add_argument(
        "--out", type=Path, default=None, help="results prefix (default benchmarks/results/results_fsdp)"
    )
    args = parser.parse_args()
    size = SIZES["tiny" if args.tiny else "full"]
    world = 2 if args.device == "cpu" else min(2, torch.cuda.device_count())
    prefix = args.out or HERE / "results" / ("results_fsdp_cuda" if args.device == "cuda" else "results_fsdp")
    results = []
    for mode in MODES:
        results.append(run(mode, size, args.device, world, prefix.with_suffix(f".{mode}.tmp")))
        prefix.with_suffix(f".{mode}.tmp").unlink()
        print(json.dumps(results[-1]), flush=True)
    machine = (
        torch.cuda.get_device_name(0)
        if args.device == "cuda"
        else f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores"
    )
    meta = {"machine": machine, "world": world, "backend": "nccl" if args.device == "cuda" else "gloo",
            "size": size, "torch": torch.__version__}  # fmt: skip
    prefix.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    text = report(results, meta)
    prefix.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
