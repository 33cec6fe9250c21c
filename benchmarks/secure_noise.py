"""Cost of secure-mode noise per million coordinates: ChaCha20 in tensor ops vs the OS-bytes route.

Three generators of N(0, 1) coordinates, each with Opacus's floating-point mitigation where secure:

==================  =================================================================================
``seeded``          ``torch.normal`` with a seeded ``torch.Generator`` (the default, not secure mode)
``os_urandom``      every uniform from ``os.urandom`` on the CPU (32 bytes per coordinate), Box-Muller,
                    four normals per coordinate (``randomness.secure_gaussian``), copied to the device
``chacha20``        ChaCha20 keyed by one ``os.urandom(32)``, computed on the device (what
                    ``secure_mode=True`` runs, ``chacha.ChaChaGaussian``)
==================  =================================================================================

Each generator draws ``--coordinates`` coordinates ``--repeats`` times (after one warm-up draw); the
median time is reported as seconds per million coordinates.

Usage::

    python benchmarks/secure_noise.py                      # CPU, writes benchmarks/results/
    python benchmarks/secure_noise.py --device cuda        # on the GPU (os_urandom still draws on the CPU)
    python benchmarks/secure_noise.py --tiny --out /tmp/x  # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import _encoder
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lightning_autodp.mechanism.chacha import ChaChaGaussian  # noqa: E402
from lightning_autodp.mechanism.randomness import secure_gaussian  # noqa: E402


def generators(device: torch.device) -> dict[str, Callable[[int], torch.Tensor]]:
    seeded = torch.Generator(device=device).manual_seed(0)
    return {
        "seeded": lambda n: torch.normal(0.0, 1.0, (n,), generator=seeded, device=device),
        "os_urandom": lambda n: secure_gaussian((n,)).to(device=device, dtype=torch.float32),
        "chacha20": lambda n: ChaChaGaussian().standard_normal((n,), device=device).float(),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_per_million(
    draw: Callable[[int], torch.Tensor], n: int, repeats: int, device: torch.device
) -> float:
    draw(n)  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        draw(n)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / (n / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _encoder.add_device_argument(parser)
    parser.add_argument("--coordinates", type=int, default=1 << 20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--tiny", action="store_true", help="a few thousand coordinates: checks that it runs")
    _encoder.add_out_argument(parser)
    args = parser.parse_args()
    if args.tiny:
        args.coordinates, args.repeats = 4096, 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = _encoder.device_label(args.device)
    rows = [
        dict(generator=key, s_per_million=time_per_million(draw, args.coordinates, args.repeats, device))
        for key, draw in generators(device).items()
    ]
    chacha = next(r["s_per_million"] for r in rows if r["generator"] == "chacha20")
    lines = [
        f"# Secure-mode noise: seconds per million coordinates ({name}, {datetime.date.today()})",
        "",
        f"{args.coordinates} coordinates per draw, median of {args.repeats}; torch {torch.__version__}, "
        f"{args.threads} CPU threads.",
        "",
        "| generator | s / 1M coordinates | vs chacha20 |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {r['generator']} | {r['s_per_million']:.4f} | {r['s_per_million'] / chacha:.2f}x |" for r in rows
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    _encoder.write_results("secure_noise", args, name, rows, text)


if __name__ == "__main__":
    main()
