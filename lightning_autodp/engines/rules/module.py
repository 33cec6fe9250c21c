r"""The exact per-module fallback: torch.func per-example gradients of a module's *own* parameters.

For a module ``M`` without a layer rule (transformers' ``LlamaRMSNorm`` and relatives, Gemma's
``x * (1 + w)`` norms, a ViT's embeddings with ``cls_token``/``position_embeddings``, layer-scale
``gamma``, an LSTM, ...) and only its direct trainable parameters :math:`\theta` (its children
keep their own rules), the captured forward

1. runs ``M`` with :math:`\theta` detached (autograd never forms the non-private
   :math:`\nabla_\theta`; inputs and children get their gradients as usual), then
2. taps its outputs: when the output gradient :math:`b` arrives in the same backward pass, the
   per-example gradients are :math:`g_i = J_\theta M(x_i)^\top b_i`, one ``torch.func.vjp`` of
   ``M`` on example ``i`` alone, vectorised with ``torch.func.vmap`` in chunks (as Opacus's
   functorch fallback does). They are ``(B, *theta.shape)``: small for norm weights, tokens and
   layer scales.

Exactness check: the vmapped recomputation also returns ``M(x_i)``; it must equal the output of
the batched call (up to rounding), else ``M`` does not act on each example independently
(batch statistics, dropout or other randomness inside it) and the engine refuses, naming ``M``.
Inputs whose dim 0 is not the micro-batch size are passed whole to every example (e.g. a mask
shared by the batch). An output whose dim 0 is not the micro-batch size is refused, naming ``M``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.profiler import record_function

from lightning_autodp.engines.rule import Handle

#: bound on the elements one vmap chunk holds per tensor (recomputed activations, gradients)
CHUNK_ELEMENTS = 1 << 24


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)


def _leaves(out: Any) -> list[Tensor] | None:
    """The tensors of a (nested tuple/list) output in order; ``None`` for anything else."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        leaves: list[Tensor] = []
        for o in out:
            sub = _leaves(o)
            if sub is None:
                return None
            leaves += sub
        return leaves
    return None


def _rebuild(out: Any, leaves: Iterator[Tensor]) -> Any:
    if isinstance(out, Tensor):
        return next(leaves)
    return type(out)(_rebuild(o, leaves) for o in out)


class _Tap(torch.autograd.Function):
    """Identity on ``M``'s outputs whose backward hands the output gradients to ``record``.

    ``M``'s own parameters are inputs too (they get no gradient from it): outputs that depend on
    them only (``M`` at the input of the model) must still carry a gradient back to the tap.
    """

    @staticmethod
    def forward(
        ctx: Any, record: Callable[[tuple[Tensor, ...]], None], n_params: int, *tensors: Tensor
    ) -> Any:
        ctx.record, ctx.n_params = record, n_params
        return tuple(o.view_as(o) for o in tensors[n_params:])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        ctx.record(grads)
        return (None, None, *([None] * ctx.n_params), *grads)


class ModuleCapture:
    """The captured forward of one module under the per-module rule (see the module docstring)."""

    def __init__(self, module: nn.Module, handle: Handle, params: dict[str, nn.Parameter]) -> None:
        self.module, self.handle, self.params = module, handle, params

    def describe(self) -> str:
        return f"{self.handle.name} ({type(self.module).__name__}; parameters {', '.join(self.params)})"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        engine = self.handle.engine
        detached = {n: p.detach() for n, p in self.params.items()}
        with engine.calling_original(self.module):
            out = functional_call(self.module, detached, args, kwargs)
        leaves = _leaves(out)
        if leaves is None:
            raise TypeError(
                f"dp_auto: the per-module rule for {self.describe()} needs a forward that returns tensors "
                f"(or tuples/lists of them), got {type(out).__name__}. "
                "Move these parameters into a submodule."
            )
        tapped = [k for k, o in enumerate(leaves) if o.is_floating_point()]
        if not tapped:
            return out
        batch = engine.expected_batch_size or leaves[tapped[0]].shape[0]
        batched = [k for k in tapped if leaves[k].dim() > 0 and leaves[k].shape[0] == batch]
        if not batched:
            got = leaves[tapped[0]].shape[0] if leaves[tapped[0]].dim() else 0
            raise RuntimeError(engine.batch_mismatch_message(self.handle, None, batch, got))
        saved_outs = [leaves[k].detach() for k in batched]

        def record(grads: tuple[Tensor, ...]) -> None:
            by_leaf = dict(zip(tapped, grads))
            for k in tapped:
                # An output without the batch dim (an LSTM's (layers, B, H) state) is fine only while
                # no gradient flows through it: its per-example attribution is unknown.
                if k not in batched and bool(by_leaf[k].ne(0).any()):
                    got = leaves[k].shape[0]
                    raise RuntimeError(engine.batch_mismatch_message(self.handle, None, batch, got))
            if engine.wants_vectors():
                self._record(args, kwargs, batch, batched, saved_outs, tuple(by_leaf[k] for k in batched))

        params = list(self.params.values())
        new = _Tap.apply(record, len(params), *params, *(leaves[k] for k in tapped))
        for k, t in zip(tapped, new):
            leaves[k] = t
        return _rebuild(out, iter(leaves))

    def _record(
        self,
        args: tuple,
        kwargs: dict,
        batch: int,
        tapped: list[int],
        saved_outs: list[Tensor],
        grads: tuple[Tensor, ...],
    ) -> None:
        grads_by_param, recomputed = self.per_example_grads(args, kwargs, batch, tapped, grads)
        for saved, again in zip(saved_outs, recomputed):
            err = float((again.to(saved.dtype) - saved).norm() / saved.norm().clamp_min(1e-30))
            if err > _tolerance(saved.dtype):
                raise RuntimeError(
                    f"dp_auto: {self.describe()} does not compute each example independently: its output "
                    f"for one example alone differs from the batched output (relative error {err:.2g}). "
                    "Batch statistics, dropout or other randomness inside it make per-example gradients "
                    "undefined; set its dropout to 0 or move the parameters into a deterministic submodule."
                )
        for name, g in grads_by_param.items():
            self.handle.record_vector(self.params[name], None, g)

    def per_example_grads(
        self, args: tuple, kwargs: dict, batch: int, tapped: list[int], grads: tuple[Tensor, ...]
    ) -> tuple[dict[str, Tensor], list[Tensor]]:
        """``(B, *p.shape)`` per parameter and the per-example recomputed outputs ``(B, ...)``."""
        leaves = [(k, v) for k, v in enumerate(args) if isinstance(v, Tensor)]
        leaves += [(k, v) for k, v in kwargs.items() if isinstance(v, Tensor)]
        tensors = tuple(v.detach() for _, v in leaves)
        in_dims = tuple(0 if t.dim() > 0 and t.shape[0] == batch else None for t in tensors)
        module, params = self.module, {n: p.detach() for n, p in self.params.items()}

        def call(theta: dict[str, Tensor], example: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            a, kw = list(args), dict(kwargs)
            for (key, _), t, d in zip(leaves, example, in_dims):
                value = t.unsqueeze(0) if d == 0 else t  # each example as a batch of one
                if isinstance(key, int):
                    a[key] = value
                else:
                    kw[key] = value
            outs = _leaves(functional_call(module, theta, tuple(a), kw))
            assert outs is not None
            return tuple(outs[k] for k in tapped)

        def one_example(example: tuple[Tensor, ...], cot: tuple[Tensor, ...]) -> tuple[dict, tuple]:
            outs, pullback = vjp(lambda theta: call(theta, example), params)
            (g,) = pullback(tuple(c.unsqueeze(0).to(o.dtype) for c, o in zip(cot, outs)))
            return g, tuple(o.squeeze(0) for o in outs)

        per_example = sum(p.numel() for p in params.values()) + sum(g[0].numel() for g in grads)
        chunk = max(1, min(batch, CHUNK_ELEMENTS // max(1, per_example)))
        engine = self.handle.engine
        with engine.recomputing(), torch.enable_grad(), record_function("dp_auto::per_module_rule"):
            g, outs = vmap(one_example, in_dims=(in_dims, 0), randomness="different", chunk_size=chunk)(
                tensors, tuple(grads)
            )
        return g, list(outs)
