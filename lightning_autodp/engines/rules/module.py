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
shared by the batch). A module none of whose outputs has the micro-batch size as dim 0 (a table
shared by the batch, tokens flattened or routed), or one of whose outputs has rows that are neither the
examples nor one (WavLM's attention returns its position bias as ``(B * heads, T, T)``), hands its
parameters to the nearest enclosing module whose inputs do (:mod:`..lift`), where the same computation
(:class:`TappedCall`) runs.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.utils.parametrize import ParametrizationList
from torch.profiler import record_function

from lightning_autodp.engines.contributions import up
from lightning_autodp.engines.rule import Handle

#: bound on the elements one vmap chunk holds per tensor (recomputed activations, gradients)
CHUNK_ELEMENTS = 1 << 24


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)


def _leaves(out: Any) -> list[Any]:
    """The leaves of a (nested tuple/list/dict) output in order: tensors and opaque objects (``None``,
    a cache object) that are passed through untouched."""
    if isinstance(out, (tuple, list)):
        return [leaf for o in out for leaf in _leaves(o)]
    if isinstance(out, Mapping):
        return [leaf for o in out.values() for leaf in _leaves(o)]
    return [out]


def _rebuild(out: Any, leaves: Iterator[Any]) -> Any:
    if isinstance(out, (tuple, list)):
        items = [_rebuild(o, leaves) for o in out]
        return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
    if isinstance(out, Mapping):
        new = copy.copy(out)  # keeps the class (transformers' ModelOutput) and its other fields
        for key, value in out.items():
            new[key] = _rebuild(value, leaves)  # type: ignore[index]
        return new
    return next(leaves)


def floating(leaf: Any) -> bool:
    return isinstance(leaf, Tensor) and leaf.is_floating_point()


def _own(out: Tensor) -> Tensor:
    """A copy of ``out``: the model may modify ``M``'s outputs in place (autograd forbids that on a view
    made inside a custom Function), and the outputs saved for the recomputation check must stay the
    ones ``M`` computed. A table expanded to the batch (stride 0) cannot be written in place: a view."""
    if any(stride == 0 and size > 1 for stride, size in zip(out.stride(), out.shape)):
        return out.view_as(out)
    return out.clone()


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
        return tuple(_own(o) for o in tensors[n_params:])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        ctx.record(grads)
        return (None, None, *([None] * ctx.n_params), *grads)


def is_batched(t: Any, batch: int) -> bool:
    return isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch


class TappedCall:
    """One call of a module whose parameters ``params`` get exact per-example gradients in backward.

    The call already ran with ``params`` detached (autograd never forms their non-private gradient);
    :meth:`tap` puts an identity on its floating outputs whose backward receives the output gradients
    ``b`` and computes :math:`g_i = J_\theta M(x_i)^\top b_i` for every example ``i`` with one
    ``torch.func.vjp`` per example, vectorised with ``vmap`` (a plain loop over the examples where
    ``vmap`` cannot run the module: data-dependent routing, as in a sparse mixture of experts).
    Outputs with batch dim 1 are expanded to the batch first (a table shared by the batch, such as a
    relative position bias, then carries one gradient per example). ``params`` are named relative to
    ``module``; ``describe`` names the layers they belong to in messages.
    """

    def __init__(
        self,
        engine: Any,
        handle: Handle,
        module: nn.Module,
        params: dict[str, nn.Parameter],
        describe: str,
        args: tuple,
        kwargs: dict,
        select: list[int] | None = None,
    ) -> None:
        self.engine, self.handle, self.module, self.params = engine, handle, module, params
        self.describe, self.args, self.kwargs = describe, args, kwargs
        #: which of the floating outputs carry the gradients (all by default)
        self.select = select
        # The forward's autocast (device, dtype): the recomputation runs in backward, where autocast is
        # off, in at least float32 (half-precision inputs upcast); it is compared with the half-precision
        # forward at that precision's tolerance.
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)), None)
        device = first.device.type if first is not None else next(module.parameters()).device.type
        self.autocast = (
            (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        )

    def tap(self, out: Any, batch: int) -> Any:
        """``out`` with its floating outputs tapped; every one must be batched (or of batch dim 1)."""
        leaves = _leaves(out)
        tapped = [k for k, o in enumerate(leaves) if floating(o)]
        if not tapped:
            return out
        for k in tapped:
            if leaves[k].dim() > 0 and leaves[k].shape[0] == 1 and batch != 1:
                leaves[k] = leaves[k].expand(batch, *leaves[k].shape[1:])
        saved_outs = [leaves[k].detach() for k in tapped]
        engine = self.engine

        def record(grads: tuple[Tensor, ...]) -> None:
            if engine.wants_vectors():
                self.record(batch, saved_outs, grads)

        params = list(self.params.values())
        new = _Tap.apply(record, len(params), *params, *(leaves[k] for k in tapped))
        for k, t in zip(tapped, new):
            leaves[k] = t
        return _rebuild(out, iter(leaves))

    def record(self, batch: int, saved_outs: list[Tensor], grads: tuple[Tensor, ...]) -> None:
        grads_by_param, recomputed = self.per_example_grads(batch, grads)
        for saved, again in zip(saved_outs, recomputed):
            err = float((again.to(saved.dtype) - saved).norm() / saved.norm().clamp_min(1e-30))
            # Under autocast the module computed in half precision (one example alone rounds differently).
            if err > _tolerance(self.autocast[1] if self.autocast else saved.dtype):
                raise RuntimeError(
                    f"dp_auto: {self.describe} does not compute each example independently: its output "
                    f"for one example alone differs from the batched output (relative error {err:.2g}). "
                    "Batch statistics, dropout or other randomness inside it make per-example gradients "
                    "undefined; set its dropout to 0 or move the parameters into a deterministic submodule."
                )
        for name, g in grads_by_param.items():
            self.handle.record_vector(self.params[name], None, g)

    def per_example_grads(
        self, batch: int, grads: tuple[Tensor, ...]
    ) -> tuple[dict[str, Tensor], list[Tensor]]:
        """``(B, *p.shape)`` per parameter and the per-example recomputed outputs ``(B, ...)``."""
        args = tuple(_without_cache(v) for v in self.args)
        kwargs = {k: _without_cache(v) for k, v in self.kwargs.items()}
        leaves = [(k, v) for k, v in enumerate(args) if isinstance(v, Tensor)]
        leaves += [(k, v) for k, v in kwargs.items() if isinstance(v, Tensor)]
        tensors = tuple(v.detach() for _, v in leaves)
        if self.autocast:
            tensors = tuple(up(t) for t in tensors)
        in_dims = tuple(0 if is_batched(t, batch) else None for t in tensors)
        module, params = self.module, {n: p.detach() for n, p in self.params.items()}
        # Every other parameter enters detached: the recomputation builds no graph for them.
        others = {n: p.detach() for n, p in module.named_parameters() if n not in params}

        def call(theta: dict[str, Tensor], example: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            a, kw = list(args), dict(kwargs)
            for (key, _), t, d in zip(leaves, example, in_dims):
                value = _example_input(t, d == 0)
                if isinstance(key, int):
                    a[key] = value
                else:
                    kw[key] = value
            outs = [
                o for o in _leaves(functional_call(module, {**others, **theta}, tuple(a), kw)) if floating(o)
            ]
            return tuple(outs) if self.select is None else tuple(outs[j] for j in self.select)

        def one_example(example: tuple[Tensor, ...], cot: tuple[Tensor, ...]) -> tuple[dict, tuple]:
            outs, pullback = vjp(lambda theta: call(theta, example), params)
            (g,) = pullback(tuple(c.unsqueeze(0).to(o.dtype) for c, o in zip(cot, outs)))
            return g, tuple(o.squeeze(0) for o in outs)

        per_example = sum(p.numel() for p in params.values()) + sum(g[0].numel() for g in grads)
        chunk = max(1, min(batch, CHUNK_ELEMENTS // max(1, per_example)))
        engine = self.handle.engine
        with (
            engine.recomputing(),
            _parametrizations_fixed(module),
            torch.enable_grad(),
            record_function("dp_auto::per_module_rule"),
        ):
            try:
                g, outs = vmap(one_example, in_dims=(in_dims, 0), randomness="different", chunk_size=chunk)(
                    tensors, tuple(grads)
                )
            except RuntimeError as error:
                if not _vmap_cannot_run(error):
                    raise
                # Data-dependent shapes or control flow (routing tokens to experts): one example at a time.
                per = [
                    one_example(
                        tuple(t[i] if d == 0 else t for t, d in zip(tensors, in_dims)),
                        tuple(c[i] for c in grads),
                    )
                    for i in range(batch)
                ]
                g = {n: torch.stack([gi[n] for gi, _ in per]) for n in params}
                outs = tuple(torch.stack([o[k] for _, o in per]) for k in range(len(grads)))
        return g, list(outs)


def _example_input(t: Tensor, batched: bool) -> Tensor:
    """One input of the recomputation: example ``i``'s rows as a batch of one (or a tensor shared by the
    batch, whole), copied inside the transform. The module may modify its input in place (WavLM's encoder
    zeroes the padded frames with ``hidden_states[~mask] = 0``): torch.func refuses that on a tensor
    captured from outside, and it must reach neither the forward's tensors nor the other examples."""
    return (t.unsqueeze(0) if batched else t).clone()


def _without_cache(value: Any) -> Any:
    """``None`` for a key/value cache (transformers' ``Cache``): a training forward starts from an empty
    cache, and a recomputation must neither read what the forward stored in it nor append to it. The
    comparison of the recomputed outputs with the forward's catches a cache that was not empty."""
    return None if any(c.__name__ == "Cache" for c in type(value).__mro__) else value


def _vmap_cannot_run(error: RuntimeError) -> bool:
    """vmap's own refusals (data-dependent control flow, ops without a batching rule)."""
    text = str(error)
    return any(
        key in text
        for key in ("vmap", "Batching rule", "data-dependent", "data dependent", ".item()", "functorch")
    )


@contextlib.contextmanager
def _parametrizations_fixed(module: nn.Module) -> Iterator[None]:
    """Parametrisations in eval mode while recomputing: spectral norm's power iteration already ran in
    the forward pass (its buffers hold the vectors that forward used), so a recomputation must not
    iterate again; the weight it computes is then the one the forward used."""
    changed = [m for pl in module.modules() if isinstance(pl, ParametrizationList) for m in pl if m.training]
    for m in changed:
        m.training = False
    try:
        yield
    finally:
        for m in changed:
            m.training = True


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
        tapped = [k for k, o in enumerate(leaves) if floating(o)]
        if not tapped:
            return out
        batch = engine.forward_batch_size() or leaves[tapped[0]].shape[0]
        batched = [k for k in tapped if is_batched(leaves[k], batch)]
        # Rows other than the examples (an attention's (B * heads, T, T) position bias) cannot be told apart
        # per example here; a shared scalar or a (1, ...) table is checked in backward below.
        other_rows = [k for k in tapped if leaves[k].dim() > 0 and leaves[k].shape[0] not in (batch, 1)]
        if not batched or other_rows:
            # Rows that are not one per example (a table shared by the batch, tokens flattened or routed, an
            # output with batch * heads rows): the nearest enclosing module whose inputs hold one row per
            # example computes the gradients.
            engine.lift(
                self.module,
                self.handle.name,
                list(self.params.values()),
                "its output does not hold one row per example",
            )
            return out
        engine.note_use(list(self.params.values()))
        saved_outs = [leaves[k].detach() for k in batched]
        select = [tapped.index(k) for k in batched]
        call = TappedCall(
            engine, self.handle, self.module, self.params, self.describe(), args, kwargs, select
        )

        def record(grads: tuple[Tensor, ...]) -> None:
            by_leaf = dict(zip(tapped, grads))
            for k in tapped:
                # An output without the batch dim (an LSTM's (1, B, H) state, a scalar) is fine only while
                # no gradient flows through it: its per-example attribution is unknown.
                if k not in batched and bool(by_leaf[k].ne(0).any()):
                    got = leaves[k].shape[0] if leaves[k].dim() else 0
                    raise RuntimeError(engine.batch_mismatch_message(self.handle, None, batch, got))
            if engine.wants_vectors():
                call.record(batch, saved_outs, tuple(by_leaf[k] for k in batched))

        params = list(self.params.values())
        new = _Tap.apply(record, len(params), *params, *(leaves[k] for k in tapped))
        for k, t in zip(tapped, new):
            leaves[k] = t
        return _rebuild(out, iter(leaves))
