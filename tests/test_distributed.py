"""lightning_autodp.mechanism.distributed: the one place that asks for and runs collectives."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

from lightning_autodp.mechanism import distributed


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_without_a_process_group():
    assert distributed.initialized() is False
    assert (distributed.world_size(), distributed.rank(), distributed.is_distributed()) == (1, 0, False)


def test_with_a_one_process_group(one_rank_group):
    assert distributed.initialized() is True
    # a group of one: initialised, but no collective reaches another rank
    assert (distributed.world_size(), distributed.rank(), distributed.is_distributed()) == (1, 0, False)
    x = torch.tensor([1.0, 2.0])
    distributed.all_reduce_sum(x)
    assert torch.equal(x, torch.tensor([1.0, 2.0]))


def test_reduce_scatter_sum_raises_no_deprecation_warning(one_rank_group, monkeypatch):
    out, full = torch.empty(3), torch.arange(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch 2.13's reduce_scatter_tensor warns on every call
        distributed.reduce_scatter_sum(out, full)
    assert torch.equal(out, full)
    if not hasattr(dist, "reduce_scatter_single"):
        pytest.skip("this torch has only reduce_scatter_tensor")
    # mutation: without the new collective the helper falls back to the deprecated one, which warns
    monkeypatch.delattr(dist, "reduce_scatter_single")
    with pytest.warns(FutureWarning, match="reduce_scatter_tensor"):
        distributed.reduce_scatter_sum(out, full)
