"""dp_fsdp on two CPU processes (gloo, FSDP2's fully_shard): the same DP step as one process."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_autodp import DPFSDPStrategy
from tests.fsdp_worker import BatchNormLM, TinyLM, data, tiny_llama
from tests.reference import per_example_gradients, reference_clipped_mean
from tests.scenarios import run_scenarios

WORKER = Path(__file__).with_name("fsdp_worker.py")


def run(scenarios: list[str], devices: int, outdir: Path) -> dict[str, list[dict]]:
    return run_scenarios(WORKER, scenarios, devices, outdir, OMP_NUM_THREADS="1")


#: The two-process scenarios that end in a result (not a refusal), all in one launch: starting the
#: two interpreters and the process group takes longer than most of these trainings.
TWO_RANK_SCENARIOS = [
    "exact", "exact@ghost", "batchnorm", "batchnorm@ghost", "llama", "accumulate", "bf16", "noise",
    "sparse", "budget", "unsliceable",
    "uninterrupted", "interrupted", "resumed", "interrupted@consolidated", "resumed@consolidated",
]  # fmt: skip


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, list[dict]]:
    return run(TWO_RANK_SCENARIOS, 2, tmp_path_factory.mktemp("two_ranks"))


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> dict[str, dict]:
    """The same trainings on one process (unsharded), for the runs that must equal it."""
    return {
        s: ranks[0] for s, ranks in run(["exact", "accumulate"], 1, tmp_path_factory.mktemp("one")).items()
    }


def _rel(a, b) -> float:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm()).item()


def reference_first_gradient(model_class: type[TinyLM] = TinyLM) -> list[float]:
    """(1/16) sum_i C_i g_i over all 16 examples, AUTO-S with R = 0.5: one backward per example."""
    model = model_class().double()
    ids, y = data(16).tensors
    grads = per_example_gradients(
        model, lambda net, i: F.cross_entropy(net(ids[i : i + 1]), y[i : i + 1]), 16
    )
    mean = reference_clipped_mean(grads, "auto_s", 0.5, 0.01, batch_size=16)
    return torch.cat([g.flatten() for g in mean]).tolist()


@pytest.mark.parametrize("engine", ["bk", "ghost"])
def test_sharded_update_equals_the_per_example_loop_on_the_union(two_ranks, one_rank, engine):
    rank0, rank1 = two_ranks["exact" if engine == "bk" else "exact@ghost"]
    assert rank0["sharded"] and rank1["sharded"] and rank0["steps"] == rank1["steps"] == 2
    assert rank0["engine"] == rank1["engine"] == engine
    assert rank0["fsdp_units"] == 3  # the default policy: each of the 2 blocks, and the root
    # the gradient the optimizer saw at the first step (gathered from the shards)
    assert _rel(rank0["grads"][0], reference_first_gradient()) < 1e-10
    assert rank0["params"] == rank1["params"]
    if engine == "bk":  # the second step too: the whole run equals dp_fsdp on one process (unsharded)
        one = one_rank["exact"]
        assert not one["sharded"]
        assert _rel(rank0["params"], one["params"]) < 1e-10


@pytest.mark.parametrize("engine", ["bk", "ghost"])
def test_sharded_eval_batchnorm_update_equals_the_per_example_loop_on_the_union(two_ranks, engine):
    # each block (an FSDP unit) holds Linear -> BatchNorm1d in eval mode (running statistics applied,
    # affine weight and bias trainable and sharded): its one-backward rule, not a refusal
    rank0, rank1 = two_ranks["batchnorm" if engine == "bk" else "batchnorm@ghost"]
    assert rank0["engine"] == rank1["engine"] == engine and rank0["steps"] == rank1["steps"] == 2
    assert rank0["fsdp_units"] == 3 and all(rank0["batch_norm_sharded"] + rank1["batch_norm_sharded"])
    assert not any(block.norm.training for block in BatchNormLM().blocks)  # the reference's too
    assert _rel(rank0["grads"][0], reference_first_gradient(BatchNormLM)) < 1e-10
    assert rank0["grads"] == rank1["grads"] and rank0["params"] == rank1["params"]
    for rank in (rank0, rank1):
        before, after = rank["batch_norm"]
        assert before == after  # the running statistics are the pretrained ones throughout
        for mean, var, tracked in before:
            assert tracked == [0.0] and any(m != 0 for m in mean) and all(0.5 <= v <= 2 for v in var)


def test_sharded_llama_update_equals_the_per_example_loop(two_ranks):
    # a real model: transformers' Llama, its decoder layers as FSDP units, LlamaRMSNorm's one-backward rule
    rank0, rank1 = two_ranks["llama"]
    assert rank0["sharded"] and rank0["fsdp_units"] == 3 and rank0["grads"] == rank1["grads"]
    model = tiny_llama()
    ids = data(8).tensors[0]
    grads = per_example_gradients(
        model, lambda net, i: net(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss, 8
    )
    expected = torch.cat([g.flatten() for g in reference_clipped_mean(grads, "auto_s", 0.5, 0.01, 8)])
    assert _rel(rank0["grads"][0], expected.tolist()) < 1e-10


def test_accumulation_and_the_users_own_units_equal_one_process(two_ranks, one_rank):
    rank0, _ = two_ranks["accumulate"]
    assert rank0["fsdp_units"] == 2  # configure_model's unit (the first block) is kept, plus the root
    one = one_rank["accumulate"]
    assert rank0["steps"] == one["steps"] == 1
    assert _rel(rank0["params"], one["params"]) < 1e-10


def test_bf16_mixed_precision_update_is_the_clipped_mean_to_bf16_accuracy(two_ranks):
    rank0, rank1 = two_ranks["bf16"]
    assert rank0["sharded"] and rank0["grads"] == rank1["grads"]
    # bf16 keeps about 3 digits; a missing or doubled reduction is off by 50% or 100%
    assert _rel(rank0["grads"][0], reference_first_gradient()) < 3e-2


def test_noise_enters_every_shard_once(two_ranks):
    ranks = two_ranks["noise"]
    sigma, max_grad_norm = 1.0, 2.0
    expected = sigma * max_grad_norm / ranks[0]["expected_batch_size"]
    for rank in ranks:
        assert rank["sharded"]
        for step in rank["local_grads"]:
            shard = torch.tensor([x for p in step for x in p], dtype=torch.float64)
            assert shard.numel() > 1000
            # 0 if this rank's shard got no noise, sqrt(2) times too much if noise entered twice
            assert abs(shard.std().item() / expected - 1) < 0.05
    # each rank draws its own shard's noise: the gathered gradients agree, the shards do not repeat
    assert ranks[0]["grads"] == ranks[1]["grads"]
    assert ranks[0]["local_grads"][0][0] != ranks[1]["local_grads"][0][0]


def test_a_rank_without_examples_joins_the_sharded_step(two_ranks):
    # FSDP gathers parameters with collectives in forward and backward: a rank whose Poisson sample is
    # empty runs a placeholder example that adds nothing (without it, the other rank waits forever)
    rank0, rank1 = two_ranks["sparse"]
    assert rank0["steps"] == rank1["steps"] == 30
    only_one_empty = set(rank0["empty_steps"]) ^ set(rank1["empty_steps"])
    assert only_one_empty, "the seed gave no step where exactly one rank drew nothing"
    assert rank0["params"] == rank1["params"]
    # the placeholder example each empty rank runs adds nothing: with sigma = 0 the update is exactly 0
    both_empty = set(rank0["empty_steps"]) & set(rank1["empty_steps"])
    assert both_empty, "the seed gave no step where both ranks drew nothing"
    for step in both_empty:
        assert not any(rank0["grads"][step])


def test_privacy_budget_stops_both_ranks_at_the_same_step(two_ranks):
    rank0, rank1 = two_ranks["budget"]
    assert rank0["steps"] == rank1["steps"] > 0
    assert rank0["val_loss"] is not None and rank0["val_loss"] == rank1["val_loss"]  # validation ran sharded
    assert rank0["epsilon"] == rank1["epsilon"] <= 2.0
    assert rank0["params"] == rank1["params"]


@pytest.mark.parametrize(
    "variant", ["", "@consolidated"], ids=["sharded_checkpoint", "consolidated_checkpoint"]
)
def test_mid_epoch_resume_ends_at_the_uninterrupted_parameters_and_epsilon(two_ranks, variant):
    uninterrupted, resumed = two_ranks["uninterrupted"], two_ranks["resumed" + variant]
    assert resumed[0]["checkpoint_is_dir"] is (variant == "")
    assert uninterrupted[0]["steps"] == resumed[0]["steps"] == 10
    assert resumed[0]["params"] == resumed[1]["params"]
    assert _rel(resumed[0]["params"], uninterrupted[0]["params"]) < 1e-12
    assert resumed[0]["epsilon"] == pytest.approx(uninterrupted[0]["epsilon"], rel=1e-12)


def test_sharded_verification_refuses_a_wrong_engine_on_every_rank(tmp_path):
    # its own launch: the refusal is an exception in fit, which ends the processes' part in later scenarios
    for rank in run(["verify_broken"], 2, tmp_path)["verify_broken"]:
        assert rank["steps"] == 0
        assert "disagrees with a per-example loop" in rank["refused"] or "other rank" in rank["refused"]


def test_an_unsliceable_batch_skips_verification_on_every_rank_together(two_ranks):
    rank0, rank1 = two_ranks["unsliceable"]
    assert rank0["steps"] == rank1["steps"] == 2  # no rank waited alone in the verification's collectives
    assert any("list of" in w for w in rank0["verify_warnings"])  # rank 0 says why


def test_hooks_engine_is_refused():
    with pytest.raises(ValueError, match="engine='bk' or 'ghost'"):
        DPFSDPStrategy(engine="hooks")


def test_a_layer_without_a_one_backward_rule_is_refused_by_name():
    class Scale(nn.Module):  # a parameter used by a module with no layer rule
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 3), Scale())

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(
        strategy=DPFSDPStrategy(noise_multiplier=1.0), accelerator="cpu", devices=1, max_steps=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    loader = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
    with pytest.raises(ValueError, match=r"no one-backward rule for net\.1 \(Scale\)"):
        trainer.fit(Model(), loader)


def _packed_layout_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_autodp.mechanism.sharded import reduce_scatter_bucket, reduce_scatter_to_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    shapes = [(5, 3), (1,), (4,), (3, 2, 2), (7,), (2, 5), (2,)]
    params = [distribute_tensor(torch.zeros(s, dtype=torch.float64), mesh, [Shard(0)]) for s in shapes]
    g = torch.Generator().manual_seed(rank)
    fulls = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # torch 2.13 deprecates reduce_scatter_tensor
        packed = reduce_scatter_bucket(params, fulls)
    for p, full, got in zip(params, fulls, packed):
        # the DTensor path (Partial -> Shard redistribute) is the reference for the packed layout
        expected = reduce_scatter_to_shard(full, p)
        assert got.shape == p.to_local().shape == expected.shape, (got.shape, p.to_local().shape)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)
    dist.destroy_process_group()


def test_packed_reduce_scatter_matches_the_dtensor_layout():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # 3 ranks: shards of 2, 2 and 1 rows, of 1, 1 and 0, empty shards (shapes (5, 3), (2,), (1,))
    mp.spawn(_packed_layout_worker, args=(3, port), nprocs=3)
