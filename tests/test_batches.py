"""lightning_autodp.mechanism.batches: one reading of a batch's size (engines, verification, dp_fsdp).

The cases below are those where the two walkers that preceded it disagreed (the engines' hint and the
verification's slicing, which took dim 0 of the first tensor leaf): each reading is now independent
of the order of the batch's fields.
"""

from __future__ import annotations

import pytest
import torch

from lightning_autodp.mechanism.batches import (
    batch_size_of,
    infer_batch_size,
    size_or_reason,
    slice_batch,
)


def _both_orders(a_key, a, b_key, b):
    return [{a_key: a, b_key: b}, {b_key: b, a_key: a}]


@pytest.mark.parametrize(
    "batch", _both_orders("positions", torch.zeros(1, 4), "ids", torch.arange(20).view(5, 4))
)
def test_a_broadcast_row_is_not_the_batch_dimension(batch):
    # first-leaf slicing read 1 when the positions came first, and cut the ids not at all
    assert infer_batch_size(batch) is None  # the engines' hint stays unsure: the layers decide
    assert batch_size_of(batch) == 5
    out = slice_batch(batch, 1, 3)
    assert torch.equal(out["ids"], batch["ids"][1:3]) and out["positions"] is batch["positions"]


@pytest.mark.parametrize("batch", _both_orders("table", torch.randn(2, 2), "x", torch.randn(5, 3)))
def test_a_table_shared_by_the_batch_is_not_sliced(batch):
    batch = {**batch, "y": torch.arange(5)}
    assert infer_batch_size(batch) is None
    assert batch_size_of(batch) == 5  # first-leaf slicing read 2 when the table came first
    out = slice_batch(batch, 0, 2)
    assert out["table"] is batch["table"] and torch.equal(out["y"], torch.arange(2))


def test_a_scalar_leaf_is_shared():
    batch = (torch.tensor(0.5), torch.randn(4, 3), torch.arange(4))
    assert infer_batch_size(batch) == batch_size_of(batch) == 4  # first-leaf slicing refused it
    assert slice_batch(batch, 1, 2)[0] is batch[0]


def test_a_single_example_with_a_table_is_one_example():
    batch = {"x": torch.randn(1, 3), "y": torch.zeros(1), "table": torch.randn(3, 3)}
    assert batch_size_of(batch) == 1


def test_an_undecidable_batch_is_refused_with_the_sizes():
    batch = {"a": torch.zeros(3), "b": torch.zeros(4)}
    assert infer_batch_size(batch) is None
    size, why = size_or_reason(batch)
    assert size is None and "3, 4 rows" in why
    assert size_or_reason({"ids": ["a", "b"]}) == (
        None,
        "the batch contains no tensor with a batch dimension",
    )


def test_per_example_python_values_are_refused_for_slicing_only():
    batch = {"ids": torch.zeros(3, 2), "text": ["a", "b", "c"]}
    assert infer_batch_size(batch) == 3  # the engines only need the tensors
    size, why = size_or_reason(batch)
    assert size is None and "list of 3 Python values" in why
