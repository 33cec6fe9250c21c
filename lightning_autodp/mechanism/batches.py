"""How many examples a batch holds, and how to cut it into examples: one reading for the whole package.

A batch is any nesting of tuples (named or not), lists and mappings (``dict``, transformers'
``BatchEncoding``) with tensors among its leaves. The examples' dimension is dim 0. Tensors whose
dim 0 differs from the others' are shared by the batch rather than one row per example: a row
broadcast later (``(1, T)`` position ids), a table, a scalar.

* :func:`infer_batch_size` is the engines' hint: the batch size only when every tensor with a
  dim 0 agrees, ``None`` otherwise (an engine then reads the size from its layers and names any
  layer whose batch dimension differs, which is safer than trusting a guess).
* :func:`batch_size_of` is what slicing needs (the verification cuts the first examples out of a
  micro-batch, dp_fsdp broadcasts them): a reading that does not depend on the order of the
  fields. Where the tensors disagree, the size most tensors share (a tie between rows of 1 and a
  larger size goes to the larger: the rows are broadcast); any other tie, or Python values that
  may be one per example, is refused with the reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import Tensor


class Unsliceable(ValueError):
    """The batch cannot be cut into examples (the message says why)."""


def tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    """``fn`` on every leaf of nested tuples, lists and mappings, keeping the containers' types."""
    if isinstance(tree, Mapping):
        items = {key: tree_map(fn, value) for key, value in tree.items()}
        try:
            return type(tree)(items)
        except TypeError:
            return items
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # namedtuple
        return type(tree)(*(tree_map(fn, v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return fn(tree)


def leaves(tree: Any) -> list[Any]:
    """The leaves of ``tree`` in :func:`tree_map`'s order."""
    out: list[Any] = []
    tree_map(out.append, tree)
    return out


def _sequences(tree: Any) -> Iterator[tuple | list]:
    if isinstance(tree, Mapping):
        for value in tree.values():
            yield from _sequences(value)
    elif isinstance(tree, (tuple, list)):
        yield tree
        for value in tree:
            yield from _sequences(value)


def dim0_sizes(batch: Any) -> Counter[int]:
    """How many tensor leaves have each dim-0 size (scalars have none and are not counted)."""
    return Counter(
        int(leaf.shape[0]) for leaf in leaves(batch) if isinstance(leaf, Tensor) and leaf.dim() > 0
    )


def infer_batch_size(batch: Any) -> int | None:
    """The batch size when every tensor with a dim 0 agrees on it, else ``None``.

    ``(x, y)``, a dict or transformers' ``BatchEncoding`` of ``(B, T)`` tensors give ``B``; a
    tensor shared by the batch (``(1, T)`` position ids) or no tensor at all give ``None``: the
    engines then take the batch size from the layers and name any layer whose batch dimension
    differs.
    """
    sizes = dim0_sizes(batch)
    return next(iter(sizes)) if len(sizes) == 1 else None


def batch_size_of(batch: Any) -> int:
    """The number of examples to slice by (raises :class:`Unsliceable`, saying why, when unknown).

    All tensors agree: their dim 0. Otherwise the size most tensors share; a tie between rows of 1
    and one larger size goes to the larger (the rows of 1 are broadcast), any other tie is refused.
    """
    sizes = dim0_sizes(batch)
    if not sizes:
        raise Unsliceable("the batch contains no tensor with a batch dimension")
    most = max(sizes.values())
    tied = sorted(n for n, k in sizes.items() if k == most)
    if len(tied) == 2 and tied[0] == 1:
        tied = tied[1:]
    if len(tied) > 1:
        raise Unsliceable(
            f"its tensors disagree on the batch dimension ({', '.join(map(str, tied))} rows, as many "
            "tensors each), so which one holds the examples is unknown"
        )
    size = tied[0]
    for seq in _sequences(batch):
        values = list(seq)
        if len(values) == size and values and all(isinstance(v, (str, bytes, int, float)) for v in values):
            raise Unsliceable(
                f"it holds a list of {size} Python values (e.g. strings) that may be one per example; "
                "tokenize in the DataLoader's collate_fn so that every per-example field is a tensor"
            )
    return size


def size_or_reason(batch: Any) -> tuple[int | None, str | None]:
    """``(batch size, None)``, or ``(None, why the batch cannot be cut into examples)``."""
    try:
        return batch_size_of(batch), None
    except Unsliceable as why:
        return None, str(why)


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of ``batch``: every tensor leaf whose dim 0 is the batch size is sliced."""
    size = batch_size_of(batch)

    def cut(leaf: Any) -> Any:
        if isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == size:
            return leaf[start:stop]
        return leaf

    return tree_map(cut, batch)


__all__ = [
    "Unsliceable",
    "batch_size_of",
    "dim0_sizes",
    "infer_batch_size",
    "leaves",
    "size_or_reason",
    "slice_batch",
    "tree_map",
]
