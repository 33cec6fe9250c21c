"""benchmarks/run.py: ratios against the same round's reference, medians over rounds."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run():
    spec = importlib.util.spec_from_file_location("run_benchmark", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _result(model: str, mode: str, seconds: float, peak: float = 100.0) -> dict:
    return dict(model=model, mode=mode, steps=20, median_step_s=seconds, peak_mb=peak, tensor_peak_mb=peak)


def test_ratios_over_rounds_pair_each_run_with_its_own_rounds_reference(run):
    # Round 2 is a slow spell: both configurations slow down together.
    steps = [(1.0, 1.2), (2.0, 2.5), (1.0, 1.4)]
    rounds = [
        run._ratios([_result("m", "nonprivate", ref), _result("m", "dp_auto_auto", dp)]) for ref, dp in steps
    ]
    rows = {r["mode"]: r for r in run._over_rounds(rounds)}
    dp = rows["dp_auto_auto"]
    expected = [d / r for r, d in steps]
    assert dp["time_ratio"] == pytest.approx(statistics.median(expected))
    assert dp["time_ratio_range"] == pytest.approx((min(expected), max(expected)))
    assert dp["median_step_s"] == pytest.approx(statistics.median(d for _, d in steps))
    assert dp["rounds"] == 3
    assert rows["nonprivate"]["time_ratio"] == 1.0
    # The ratio of the medians would be 1.4 / 1.0: not what any round measured against its reference.
    assert dp["time_ratio"] != pytest.approx(1.4)
    assert run._x(dp, "time_ratio", 2) == "1.25x (1.20-1.40)"


def test_a_configuration_that_failed_in_every_round_keeps_its_error(run):
    failed = dict(model="m", mode="opacus_hooks", error="boom")
    rounds = [run._ratios([_result("m", "loop", 1.0), failed]) for _ in range(2)]
    rows = {r["mode"]: r for r in run._over_rounds(rounds)}
    assert rows["opacus_hooks"]["error"] == "boom"
    assert run._x(rows["loop"], "time_ratio", 2) == "1.00x (1.00-1.00)"


@pytest.fixture
def phases(monkeypatch):
    spec = importlib.util.spec_from_file_location("phases_benchmark", ROOT / "benchmarks" / "phases.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    for key, value in module.run.TINY.items():
        if key in module.run.MODELS["hf_bert"]:
            monkeypatch.setitem(module.run.MODELS["hf_bert"], key, value)
    return module


def test_the_timed_dp_gradient_is_the_clipped_mean_of_a_per_example_loop(phases, monkeypatch):
    """What benchmarks time is the DP update (noise off here), not a cheaper stand-in."""
    from lightning_autodp.engines.bookkeeping import BookKeepingEngine
    from lightning_autodp.mechanism.noise import NoiseSource
    from tests.reference import per_example_gradients, reference_clipped_mean

    run = phases.run
    monkeypatch.setattr(run, "NOISE", 0.0)
    cfg = run.MODELS["hf_bert"]
    make, (x, y), forward, criterion, _ = run._build(cfg, cfg["batch"])
    net = make()

    def loss_of(model, i):
        out, target = forward(model, x[i : i + 1], y[i : i + 1])
        return criterion(out, target)

    expected = reference_clipped_mean(
        per_example_gradients(net, loss_of, len(x)), "auto_s", run.MAX_GRAD_NORM, 0.01, len(x)
    )
    timed: dict = {}
    run.bk_gradient(BookKeepingEngine(net), NoiseSource(seed=0), net, (x, y), forward, criterion, timed)
    got = [p.grad.double() for p in net.parameters() if p.requires_grad]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    assert list(timed) == list(run.PHASES) and all(len(v) == 1 for v in timed.values())


def test_phases_pairs_steps_and_reports_each_phase(phases):
    row = phases.interleaved("hf_bert", pairs=3, warmup=1, batches=2)
    assert row["pairs"] == 2
    assert set(row["phases_s"]) == set(phases.run.PHASES)
    low, high = row["ratio_quartiles"]
    assert low <= row["ratio"] <= high
    table = phases.markdown([row], dict(pairs=2, warmup=1, threads=2, torch="t", cpu="c"))
    assert "| hf_bert |" in table
