"""Runs a multi-process test worker once for several scenarios and reads what each rank wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_scenarios(
    worker: Path, scenarios: list[str], devices: int, outdir: Path, **env: str
) -> dict[str, list[dict]]:
    """``python WORKER s1,s2,... DEVICES OUTDIR``: each scenario's JSON per rank, by scenario.

    The worker runs the scenarios one after the other in the same processes (Lightning's launcher
    starts the other ranks once): two interpreters and a process group cost more than most of
    these trainings. A failing worker fails every scenario of the launch, with its output's tail.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, str(worker), ",".join(scenarios), str(devices), str(outdir)],
        timeout=600,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise AssertionError(
            f"{worker.name} {scenarios} on {devices} process(es) exited {proc.returncode}:\n{tail}"
        )
    return {
        s: [json.loads((outdir / f"{s}-{devices}-rank{r}.json").read_text()) for r in range(devices)]
        for s in scenarios
    }


def split_scenario(scenario: str, variants: tuple[str, ...]) -> tuple[str, str]:
    """``mode@variant`` -> ``(mode, variant)``, ``variant`` ``""`` when absent. A variant not in
    ``variants`` raises ``KeyError``: a misspelt scenario must not run as the plain mode."""
    mode, _, variant = scenario.partition("@")
    if variant and variant not in variants:
        raise KeyError(f"unknown variant in {scenario!r}; known: {', '.join(variants)}")
    return mode, variant
