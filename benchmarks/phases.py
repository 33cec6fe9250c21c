"""Where a DP step's time goes: non-private and DP steps interleaved in one process, phase by phase.

``run.py`` times each configuration in its own process, one after the other; on a shared machine a
slow spell then lands on one configuration (one run's ratio can be off by a third). Here one process
holds two copies of the model and alternates a non-private forward + backward with the DP gradient
of ``run.bk_gradient`` (engine ``bk``, as ``DPAutoStrategy`` computes it) on the same batch, so each
pair's ratio compares steps taken moments apart. Reported per model: the median of the per-pair
ratios with their quartiles, and the median time of each DP phase (forward + backward under
capture, per-example norms, clipped weighted sum, noise) against the non-private forward + backward.
No optimizer step and no Lightning on either side: this is the gradient computation only.

Usage::

    python benchmarks/phases.py                       # transformers models; results/results_phases.{md,json}
    python benchmarks/phases.py --models hf_bert --pairs 20
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the shared benchmark helpers, also when this file is loaded by path

import _encoder  # noqa: E402

#: ``benchmarks/run.py`` (its models, ``bk_gradient``), loaded by path: ``run`` is too common a name
run = _encoder.run_module()
DEFAULT_MODELS = ("hf_gpt2", "hf_llama", "hf_bert", "hf_vit")


def interleaved(model_name: str, pairs: int = 14, warmup: int = 2, batches: int = 4) -> dict[str, Any]:
    """``pairs`` interleaved (non-private, DP) gradient computations of ``model_name``; the first
    ``warmup`` pairs are not counted. Times in seconds."""
    from lightning_autodp.engines.bookkeeping import BookKeepingEngine
    from lightning_autodp.mechanism.noise import NoiseSource

    cfg = run.MODELS[model_name]
    b = cfg["batch"]
    make, (x, y), forward, criterion, _ = run._build(cfg, b * batches)
    data = [(x[i * b : (i + 1) * b], y[i * b : (i + 1) * b]) for i in range(batches)]
    plain, private = make(), make()
    engine, noise = BookKeepingEngine(private), NoiseSource(seed=0)
    phases: dict[str, list[float]] = {}
    plain_s, private_s = [], []
    for i in range(pairs):
        batch = data[i % batches]
        t0 = time.perf_counter()
        run.plain_gradient(plain, batch, forward, criterion)
        t1 = time.perf_counter()
        run.bk_gradient(engine, noise, private, batch, forward, criterion, phases)
        t2 = time.perf_counter()
        plain_s.append(t1 - t0)
        private_s.append(t2 - t1)
    counted = slice(warmup, None)
    ratios = [p / q for p, q in zip(private_s[counted], plain_s[counted])]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return dict(
        model=model_name,
        pairs=len(ratios),
        nonprivate_s=statistics.median(plain_s[counted]),
        dp_s=statistics.median(private_s[counted]),
        ratio=statistics.median(ratios),
        ratio_quartiles=(quartiles[0], quartiles[2]),
        phases_s={name: statistics.median(phases[name][counted]) for name in run.PHASES},
    )


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    names = " | ".join(f"{p} (ms)" for p in run.PHASES)
    out = [
        "# Where the time of a DP step goes (benchmarks/phases.py)",
        "",
        f"| model | non-private fwd+bwd (ms) | DP gradient (ms) | DP / non-private (quartiles) | {names} |",
        "|---|---:|---:|---:|" + "---:|" * len(run.PHASES),
    ]
    for r in rows:
        low, high = r["ratio_quartiles"]
        cells = " | ".join(f"{r['phases_s'][p] * 1e3:.0f}" for p in run.PHASES)
        out.append(
            f"| {r['model']} | {r['nonprivate_s'] * 1e3:.0f} | {r['dp_s'] * 1e3:.0f} "
            f"| {r['ratio']:.2f}x ({low:.2f}-{high:.2f}) | {cells} |"
        )
    out += [
        "",
        f"{meta.get('date', 'undated')}: {meta['pairs']} interleaved pairs per model after "
        f"{meta['warmup']} uncounted ones, medians; torch "
        f"{meta['torch']}, {meta['cpu']}, {meta['threads']} threads. Engine `bk`, AUTO-S; no optimizer step. "
        "`forward_backward` skips the weight gradients; `clipped_sum` computes them, weighted per example.",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated, of run.py's models")
    p.add_argument("--pairs", type=int, default=14)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--out", default=str(HERE / "results" / "results_phases"), help="output path without extension"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        rows.append(interleaved(name, args.pairs + args.warmup, args.warmup))
        print(json.dumps(rows[-1]), flush=True)
    meta = dict(
        pairs=args.pairs,
        warmup=args.warmup,
        threads=args.threads,
        torch=torch.__version__,
        cpu=f"{platform.processor() or platform.machine()}",
        date=datetime.date.today().isoformat(),
    )
    Path(args.out + ".json").write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
    Path(args.out + ".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
