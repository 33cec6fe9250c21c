"""The cost of auditing: one audited DP run of a digits-sized model against the same run without audit.

Runs ``python -m lightning_autodp.safeguards.audit``'s model (64-128-10 MLP, scikit-learn digits, DP-SGD with
a PrivacyBudget) ``--repeats`` times each way, alternating, and reports the median wall time of
``trainer.fit`` and the audit's result. The run-time checks are on in both (they are the default).

    python benchmarks/audit_cost.py --epochs 20 --m 2000 --repeats 3

Timings on a shared machine are noisy: compare the two columns of one run, not runs on different days.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import warnings
from pathlib import Path

import torch

from lightning_autodp.safeguards.audit.__main__ import run_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--m", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "audit_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    plain, audited, results = [], [], []
    for _ in range(args.repeats):
        plain.append(run_digits(None, epochs=args.epochs, verbose=False).seconds)
        run = run_digits(args.m, epochs=args.epochs, verbose=False)
        audited.append(run.seconds)
        assert run.audit is not None and run.audit.result is not None
        results.append((run.accounted_epsilon, run.audit.result.epsilon_lower_bound))
    summary = {
        "model": "digits MLP 64-128-10, batch 128, DP-SGD, PrivacyBudget(target_epsilon=4)",
        "epochs": args.epochs,
        "m": args.m,
        "repeats": args.repeats,
        "median_seconds_plain": statistics.median(plain),
        "median_seconds_audited": statistics.median(audited),
        "ratio": statistics.median(audited) / statistics.median(plain),
        "accounted_epsilon": results[0][0],
        "audit_lower_bound": results[0][1],
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread",
        "date": datetime.date.today().isoformat(),
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
