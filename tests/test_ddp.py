"""Two-process DDP on CPU (gloo): the update and the noise equal those of one process."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.ddp_worker import BatchNormModel, data
from tests.reference import per_example_gradients, reference_clipped_mean
from tests.scenarios import run_scenarios, split_scenario
from tests.test_accounting import opacus_epsilon

WORKER = Path(__file__).with_name("ddp_worker.py")


def run(scenarios: list[str], devices: int, outdir: Path) -> dict[str, list[dict]]:
    return run_scenarios(WORKER, scenarios, devices, outdir)


#: The two-process scenarios that end in a result, in one launch (starting two interpreters and a
#: process group takes longer than these trainings). epsilon_log last: it arms a hang guard.
TWO_RANK_SCENARIOS = [
    "exact", "exact@buckets", "accumulate", "noise", "empty", "budget",
    "batchnorm", "batchnorm@ghost", "batchnorm@hooks", "epsilon_log",
]  # fmt: skip


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[dict[str, list[dict]], Path]:
    outdir = tmp_path_factory.mktemp("two_ranks")
    return run(TWO_RANK_SCENARIOS, 2, outdir), outdir


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> dict[str, dict]:
    """The same trainings on one process, for the runs that must equal it."""
    runs = run(["exact", "accumulate"], 1, tmp_path_factory.mktemp("one_rank"))
    return {s: ranks[0] for s, ranks in runs.items()}


def _rel(a, b) -> float:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm()).item()


def test_two_ranks_equal_one_process_on_the_union(two_ranks, one_rank):
    one = one_rank["exact"]
    rank0, rank1 = two_ranks[0]["exact"]
    assert rank0["world_size"] == 2 and rank0["steps"] == rank1["steps"] == one["steps"] == 3
    assert rank0["params"] == rank1["params"]
    assert _rel(rank0["params"], one["params"]) < 1e-5


def test_bucketed_all_reduce_gives_the_same_update(two_ranks):
    one_bucket = two_ranks[0]["exact"]
    # about 100 bytes per bucket: the 83 float64 parameters of the model go in several all-reduces
    many_buckets = two_ranks[0]["exact@buckets"]
    assert many_buckets[0]["bucket_cap_mb"] * 2**20 == 100 and one_bucket[0]["bucket_cap_mb"] == 25
    for a, b in zip(one_bucket, many_buckets):
        assert a["params"] == b["params"] and a["grads"] == b["grads"]


def test_accumulation_under_ddp_equals_one_process(two_ranks, one_rank):
    one = one_rank["accumulate"]
    rank0, rank1 = two_ranks[0]["accumulate"]
    assert rank0["steps"] == one["steps"] == 2
    assert rank0["params"] == rank1["params"]
    assert _rel(rank0["params"], one["params"]) < 1e-5


def test_run_time_checks_look_at_a_later_step_on_every_rank(two_ranks):
    """The noise subset of a look is summed over ranks before it is tested: both ranks pass the look."""
    for rank in two_ranks[0]["noise"]:
        assert rank["steps"] == 4 and rank["looks"] == [1, 1]


def test_noise_enters_once_across_ranks(two_ranks):
    rank0, rank1 = two_ranks[0]["noise"]
    sigma, max_grad_norm = 1.0, 2.0
    assert rank0["expected_batch_size"] == pytest.approx(16.0)  # q * N = (8 per rank * 2) / 64 * 64
    expected = sigma * max_grad_norm / rank0["expected_batch_size"]
    grads = torch.tensor(rank0["grads"])
    assert grads.shape[0] == 4
    for step in grads:
        # sqrt(2) times too much if every rank drew noise; 2 times if all drew the same
        assert abs(step.std().item() / expected - 1) < 0.03
    assert rank0["grads"] == rank1["grads"]  # both ranks hand the optimizer the same gradient
    assert rank0["params"] == rank1["params"]
    # fresh noise every step
    corr = torch.corrcoef(grads)[0, 1:]
    assert (corr.abs() < 0.05).all()


def test_empty_batches_on_a_rank_do_not_hang(two_ranks):
    rank0, rank1 = two_ranks[0]["empty"]
    # q = 2 / 20: 10 steps an epoch, and a rank's 10-example shard is often empty
    assert rank0["steps"] == rank1["steps"] == 20
    assert rank0["params"] == rank1["params"]


def test_a_verification_failure_on_one_rank_stops_every_rank(tmp_path):
    # Without the shared verdict rank 0 learns of rank 1's failure only as a crashed peer in its
    # first all-reduce (gloo), or not until the process group times out (NCCL); with it, rank 0
    # raises EngineVerificationError itself, naming the other rank.
    proc = subprocess.run(
        [sys.executable, str(WORKER), "verify_fails_on_rank1", "2", str(tmp_path)],
        timeout=180,
        capture_output=True,
        text=True,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert (
        "[rank1]: lightning_autodp.safeguards.verify.EngineVerificationError: dp_auto refuses to train"
        in output
    )
    assert "[rank0]: lightning_autodp.safeguards.verify.EngineVerificationError" in output, output[-3000:]
    assert "failed on 1 other rank(s)" in output


def test_privacy_budget_stops_both_ranks_at_the_same_step(two_ranks):
    rank0, rank1 = two_ranks[0]["budget"]
    assert rank0["steps"] == rank1["steps"] == rank0["global_step"] > 0
    assert rank0["epsilon"] == rank1["epsilon"]
    q = rank0["sample_rate"]
    assert q == pytest.approx(16 / 64)  # the global rate: 8 per rank, 2 ranks, 64 examples
    # ddp_worker's PrivacyBudget: target 2.0 at delta 1e-3 (rdp), sigma 2.0 (17 steps)
    assert opacus_epsilon("rdp", [(2.0, q, rank0["steps"])], delta=1e-3) == pytest.approx(rank0["epsilon"])
    assert rank0["epsilon"] <= 2.0 < opacus_epsilon("rdp", [(2.0, q, rank0["steps"] + 1)], delta=1e-3)


def test_epsilon_is_logged_without_the_sync_dist_warning_or_a_hang(two_ranks):
    # Without sync_dist, Lightning warns on rank 0 that the epoch-level epsilon is not reduced. With a
    # plain sync_dist=True the reduction ran where the progress bar read the metric (rank 0 only) and,
    # on rank 1, at its next read after the LightningModule's all_gather: the collectives crossed and
    # the ranks hung.
    runs, outdir = two_ranks
    rank0, rank1 = runs["epsilon_log"]
    assert rank0["sync_dist_warnings"] == rank1["sync_dist_warnings"] == []
    assert rank0["history"] == rank1["history"]
    q = rank0["sample_rate"]
    steps = [s for _, s, _ in rank0["history"]]
    assert steps == [4, 8, 12, 16, 17]  # 4 steps an epoch; the budget stops after step 17 (budget test)
    with open(outdir / "csv" / "version_0" / "metrics.csv") as f:
        logged = [float(row["epsilon"]) for row in csv.DictReader(f) if row["epsilon"]]
    expected = [opacus_epsilon("rdp", [(2.0, q, s)], delta=1e-3) for s in steps]
    assert logged == pytest.approx(expected, rel=1e-6)  # the CSV holds float32


def reference_batchnorm_gradient() -> list[float]:
    """(1/16) sum_i C_i g_i over both ranks' 16 examples, AUTO-S with R = 0.5: one backward per example.

    The BatchNorm is in eval mode: each example is normalised with the running statistics alone.
    """
    net = BatchNormModel().net.double()
    assert not net[1].training
    x, y = data(16).tensors
    grads = per_example_gradients(net, lambda m, i: F.cross_entropy(m(x[i : i + 1]), y[i : i + 1]), 16)
    return torch.cat([g.flatten() for g in reference_clipped_mean(grads, "auto_s", 0.5, 0.01, 16)]).tolist()


@pytest.mark.parametrize("scenario", ["batchnorm", "batchnorm@ghost", "batchnorm@hooks"])
def test_eval_batchnorm_update_equals_the_per_example_loop_on_the_union(two_ranks, scenario):
    # BatchNorm1d between Linear layers, trainable affine weight and bias, running statistics applied
    rank0, rank1 = two_ranks[0][scenario]
    assert rank0["world_size"] == 2 and rank0["steps"] == rank1["steps"] == 2
    assert rank0["grads"] == rank1["grads"] and rank0["params"] == rank1["params"]
    assert _rel(rank0["grads"][0], reference_batchnorm_gradient()) < 1e-10
    for rank in (rank0, rank1):
        (mean, var, tracked), after = rank["batch_norm"]
        assert [mean, var, tracked] == after  # the running statistics are the pretrained ones throughout
        assert tracked == [0.0] and any(m != 0 for m in mean) and all(0.5 <= v <= 2 for v in var)


def test_a_batchnorm_in_train_mode_stops_every_rank_before_any_update(tmp_path):
    # batchnorm_train: its affine weight and bias are trainable, so the engine verification meets it
    # first (every rank refuses together). batchnorm_train@frozen: frozen, so the verification runs it
    # in eval mode and only the guard at the step sees it, on each rank. A refusal that reached one rank
    # only would leave the other waiting in an all-reduce: the worker's hang guard ends that run.
    runs = run(["batchnorm_train", "batchnorm_train@frozen"], 2, tmp_path)
    for scenario, ranks in runs.items():
        for rank in ranks:
            assert rank["refused"].startswith(
                "Layer 'net.1' (BatchNorm1d) ran in train mode in a training step"
            ), (scenario, rank["refused"])
            assert rank["steps"] == rank["global_step"] == 0 and rank["params_unchanged"], scenario
            before, after = rank["batch_norm"]
            assert before == after  # the batch's statistics never reached the running ones


def test_two_rank_runs_are_bit_identical_for_a_seed(tmp_path):
    # two launches of the same seeded runs; ghost draws nothing bk does not (the engines own no
    # randomness): bk and hooks cover both code paths
    scenarios = ["noise@bk", "noise@hooks"]
    first, second = (run(scenarios, 2, tmp_path / name) for name in ("first", "second"))
    for scenario in scenarios:
        assert [r["engine"] for r in first[scenario]] == [scenario.split("@")[1]] * 2
        for a, b in zip(first[scenario], second[scenario]):
            assert a["params"] == b["params"] and a["grads"] == b["grads"]


def test_one_process_fit_leaves_no_launch_variables_behind(monkeypatch):
    # They would make a later multi-process launch from this process wait forever for its peers.
    for name in ("LOCAL_RANK", "NODE_RANK", "MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    from lightning_autodp import DPAutoStrategy
    from tests.models import Classifier, loader, make_case, quiet_trainer

    net, x, y = make_case("linear")
    quiet_trainer(strategy=DPAutoStrategy(), max_steps=1).fit(Classifier(net), loader(x, y, batch_size=4))
    assert not {"LOCAL_RANK", "NODE_RANK", "MASTER_PORT"} & set(os.environ)


def test_a_scenario_names_its_mode_and_a_known_variant_or_is_refused():
    variants = ("bk", "hooks")
    assert split_scenario("noise", variants) == ("noise", "")
    assert split_scenario("noise@bk", variants) == ("noise", "bk")
    with pytest.raises(KeyError, match="unknown variant in 'noise@bks'"):
        split_scenario("noise@bks", variants)
