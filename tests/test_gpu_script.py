"""benchmarks/gpu.sh's plumbing on the CPU (--smoke: tiny sizes); the GPU run itself needs a GPU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def _run(tmp_path: Path, *args: str, steps: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, GPU_SH_OUT=str(tmp_path / "out"), OMP_NUM_THREADS="1")
    if steps is not None:
        env["GPU_SH_STEPS"] = steps
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_a_gpu_the_full_run_refuses_and_names_smoke(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--smoke" in proc.stderr


@pytest.mark.timeout(900)
def test_smoke_run_writes_every_result_and_a_summary_naming_the_device(tmp_path):
    """The benchmark steps at tiny sizes; the CUDA-marked tests run in the suite itself, and the steps left
    out here run scripts this one already drives (run.py) or that take minutes on a CPU (fsdp.py's two
    gloo ranks per mode)."""
    steps = "engines_encoder,secure_noise,physical_batch"
    proc = _run(tmp_path, "--smoke", steps=steps)
    out = tmp_path / "out"
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:]
    device = "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    assert f"Device: {device}." in summary
    for skipped in ("cuda_tests", "engines_hf_gpt2", "fsdp"):
        assert f"| {skipped} | skipped (GPU_SH_STEPS) |" in summary
    for name in steps.split(","):
        assert f"| {name} | 0 |" in summary
    engines = json.loads((out / "engines_encoder.json").read_text())
    assert {r["mode"] for r in engines["results"]} == {"nonprivate", "dp_auto_bk", "opacus_ghost"}
    assert all("error" not in r for r in engines["results"])
    for prefix in ("secure_noise", "physical_batch"):
        assert (out / f"{prefix}.json").exists() and (out / f"{prefix}.md").exists()
    physical = json.loads((out / "physical_batch.json").read_text())["results"]
    assert [r["cap"] for r in physical] == [None, 3] and all(r["steps"] == 3 for r in physical)
