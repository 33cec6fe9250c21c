r"""Book-keeping and ghost-clipping engines: per-example norms and the clipped sum from one backward pass.

Opacus's hooks materialise one gradient per example (``b`` times the parameter memory). Automatic
clipping only needs the per-example norms :math:`\|g_i\|` and the weighted sum
:math:`\sum_i w_i g_i`, and both follow from what a single backward pass already sees: each
layer's input ``a`` and output gradient ``b`` (Li et al. 2022 "ghost norm"; Bu et al. 2023
"book-keeping").

For a linear layer :math:`y = a W^\top` over a sequence (``a_i``: ``(T, d)``, ``b_i``: ``(T, p)``)
the per-example weight gradient is :math:`G_i = b_i^\top a_i`. Its squared norm is either

* ghost: :math:`\|G_i\|^2 = \langle a_i a_i^\top, b_i b_i^\top \rangle` (cost :math:`T^2 (d + p)`), or
* materialised one layer at a time: :math:`\|b_i^\top a_i\|^2` (cost :math:`T d p`, memory
  :math:`B d p`, freed at once),

whichever is cheaper for that layer. Once the clipping weights :math:`w_i` are known, the
weighted sum is one contraction per layer, :math:`\sum_i w_i G_i = (w \odot b)^\top a`, from the
stored ``a`` and ``b``: no second backward pass and no per-example gradient kept.

Speed: the handled layers run through custom :class:`torch.autograd.Function` s whose backward
returns only the input gradient; autograd never computes the (non-private, immediately
discarded) ``p.grad`` of a handled parameter, so the contraction it would have cost is spent on
the weighted sum instead. Handled parameters keep ``p.grad = None`` after backward.

Every contribution is written as :math:`G = L^\top R` with ``L``: ``(B, T, rows)`` and ``R``:
``(B, T, cols)``, so that one routine covers all layers, including a parameter used by several
layers (tied weights, a module called twice): its per-example gradient is the sum of the
contributions and

.. math:: \|g_i\|^2 = \sum_{k, l} \langle L^k_i L^{l\top}_i,\ R^k_i R^{l\top}_i \rangle

includes the cross terms. For an embedding ``L`` is the one-hot matrix of token ids, kept as the
ids themselves. Norm layers and biases have small per-example gradients (``(B, C)``); those are
computed during backward.

Memory: book-keeping holds every handled layer's ``a`` and ``b`` until backward ends (about twice
the activation memory). :class:`GhostClippingEngine` (``engine="ghost"``) is the same arithmetic
in two backward passes, norms in the first and the weighted sums in the second, each layer's
factors dropped as soon as they are used: peak memory close to non-private training, for a
second backward pass.

Layout: the math lives in :mod:`.contributions`, the layer rules in ``engines/rules/`` (one file per
layer kind, registered with :func:`~.rule.register_rule`), and this module only attaches the rules to
a model and orchestrates one micro-batch. Layers without a rule get the exact per-module fallback of
:mod:`.rules.module` (torch.func on the smallest module that owns the parameter), announced with a
warning that names them.
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_autodp import _compat
from lightning_autodp.engines import rules
from lightning_autodp.engines.base import PerSampleEngine, add_into
from lightning_autodp.engines.contributions import (
    Contribution,
    ParamRecords,
    squared_norms_of_weight,
    vector_grads,
    weighted_sum_of_weight,
)
from lightning_autodp.engines.lift import Lifting
from lightning_autodp.engines.rule import Handle, LayerRule, find_rule

_TRANSFORMER_CONTAINERS = (
    nn.Transformer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)
#: layers whose per-example gradients are undefined in training (they mix the examples)
_REFUSED = (_compat.BATCH_NORM_BASE,)


@dataclass
class PlannedModule:
    """How one module with trainable parameters of its own is captured."""

    name: str
    module: nn.Module
    rule: LayerRule | None  # None: the per-module fallback (torch.func), see ``reason``
    reason: str = ""
    params: tuple[str, ...] = ()


def capture_plan(root: nn.Module) -> tuple[list[PlannedModule], list[tuple[str, nn.Module]]]:
    """Which rule captures each module that owns trainable parameters, and the refused modules."""
    modules = list(root.named_modules())
    handled: set[int] = set()
    for _, mod in modules:
        if parametrize.is_parametrized(mod):
            # The parametrisations' own modules hold original0/original1: captured with their owner.
            handled.update(id(m) for m in mod.parametrizations.modules())  # type: ignore[union-attr]
    for _, mod in modules:
        rule = find_rule(mod)
        if rule is not None and rule.unsupported_reason(mod) is None:
            handled.update(id(c) for c in rule.handled_children(mod))
    plan, refused = [], []
    for name, mod in modules:
        name = name or type(root).__name__
        own = [n for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
        if id(mod) in handled:
            continue
        if parametrize.is_parametrized(mod):
            trainable = [n for n, p in mod.named_parameters() if p.requires_grad]
            own_and_originals = [n for n in trainable if "." not in n or n.startswith("parametrizations.")]
            if own_and_originals:
                reason = "its weights are computed by torch.nn.utils.parametrize from the parameters it names"
                plan.append(PlannedModule(name, mod, None, reason, tuple(own_and_originals)))
            continue
        rule = find_rule(mod)
        if rule is not None and rule.unsupported_reason(mod) is None:
            children = [p for c in rule.handled_children(mod) for p in c.parameters()]
            if own or any(p.requires_grad for p in children):
                plan.append(PlannedModule(name, mod, rule, params=tuple(own)))
            continue
        if not own:
            continue
        if isinstance(mod, _REFUSED):
            refused.append((name, mod))
            continue
        reason = rule.unsupported_reason(mod) if rule is not None else "no layer rule is registered for it"
        plan.append(PlannedModule(name, mod, None, reason or "", tuple(own)))
    return plan, refused


class BookKeepingEngine(PerSampleEngine):
    """Per-example norms and clipped sums from a single backward pass, no per-example gradients.

    Registered rules (``engines/rules/``): ``nn.Linear`` (any number of leading dims),
    transformers' ``Conv1D`` and ``FalconLinear``, ``nn.Embedding`` (also with ids shared by the batch),
    ``nn.Conv1d``/``nn.Conv2d`` (grouped, depthwise, channels-last), ``nn.LayerNorm``,
    ``nn.GroupNorm``, ``nn.RMSNorm`` and their subclasses, transformers' ``LlamaRMSNorm`` family,
    ``GemmaRMSNorm``, ``T5LayerNorm`` and Gemma's scaled embedding, ``nn.MultiheadAttention``; parameters
    shared by several of them (the norm of the sum of all uses). Any other module with trainable
    parameters of its own, and any module whose weights are parametrised
    (``torch.nn.utils.parametrize``), gets the exact per-module rule (:mod:`.rules.module`), announced
    with a warning. A layer whose rows are not one per example, or whose parameters a module uses
    directly instead of calling it (found in the first captured forward), gets exact per-example
    gradients at the nearest enclosing module whose inputs are (:mod:`.lift`), announced once.
    BatchNorm is refused (its batch statistics mix the examples). Dim 0 is the batch, except inside
    ``nn.Transformer*`` modules with ``batch_first=False``.

    Example::

        engine = BookKeepingEngine(model)
        engine.expect_batch_size(len(x))
        with engine.capturing():
            F.cross_entropy(model(x), y, reduction="sum").backward()
        norms = engine.per_sample_squared_norms().sqrt()          # ||g_i||
        summed = {}
        engine.accumulate_weighted_sum(1.0 / (norms + 0.01), summed)  # sum_i C_i g_i
        engine.reset()
    """

    name = "bk"

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        plan, refused = capture_plan(module)
        if refused:
            names = ", ".join(f"{n} ({type(m).__name__})" for n, m in refused)
            raise ValueError(
                f"engine={self.name!r} cannot train {names}: batch statistics mix the examples, so "
                "per-example gradients are undefined. Replace BatchNorm with GroupNorm or LayerNorm "
                "(opacus.validators.ModuleValidator.fix does this), or freeze it."
            )
        self._records: dict[nn.Parameter, ParamRecords] = {}
        self._patched: list[tuple[nn.Module, Any]] = []
        self._leaked: set[str] = set()
        self._hooks: list[Any] = []
        self._batch_size: int | None = None
        self._first_layer = ""
        self._had_grad: set[int] = set()
        self._inner: set[int] = set()
        self._recomputing = False
        self._trainable = {id(p) for p in self.params}
        self._names = {id(p): n for n, p in module.named_parameters()}
        self._forward_batch: int | None = None
        #: ids of parameters whose per-example gradients are materialised (torch.func rules): every
        #: other use of them is materialised too and added, so their norm is that of the sum
        self._dense: set[int] = set()
        seq_first = _seq_first_modules(module)
        fallbacks = []
        #: id of each trainable parameter of a captured layer -> the layers (module, name) that capture it
        layers: dict[int, list[tuple[nn.Module, str]]] = {}
        for item in plan:
            mod = item.module
            fallback = item.rule is None
            handle = Handle(
                self,
                item.name,
                None if fallback else self.trainable(getattr(mod, "weight", None)),
                None if fallback else self.trainable(getattr(mod, "bias", None)),
                1 if id(mod) in seq_first else 0,
            )
            if item.rule is not None:
                forward = item.rule.captured_forward(mod, handle)
                rows = _RowCheck(self, item.rule, mod, handle)
                captured = rows.params
            else:
                params = dict(mod.named_parameters())
                params = {n: params[n] for n in item.params}
                self.mark_dense(list(params.values()))
                capture = rules.ModuleCapture(mod, handle, params)
                fallbacks.append(f"{capture.describe()}: {item.reason}")
                forward, rows = capture.forward, None
                captured = [p for p in params.values() if id(p) in self._trainable]
            for p in captured:
                layers.setdefault(id(p), []).append((mod, item.name))
            self._patch(mod, forward, rows)
        self._lifting = Lifting(self, module, [item.module for item in plan], layers)
        #: whether a captured forward was watched for direct uses of the layers' parameters (the first)
        self._watched = False
        for p in self.params:
            self._hooks.append(
                p.register_post_accumulate_grad_hook(self._leak_hook(self._names.get(id(p), "?")))
            )
        if fallbacks:
            warnings.warn(
                f"dp_auto: engine={self.name!r} computes exact per-example gradients with torch.func on the "
                "owning module (one vmap per call, in the same backward) for: " + "; ".join(fallbacks) + ".",
                stacklevel=2,
            )

    @classmethod
    def unsupported_modules(cls, module: nn.Module) -> list[tuple[str, nn.Module]]:
        return capture_plan(module)[1]

    @classmethod
    def fallback_modules(cls, module: nn.Module) -> list[tuple[str, nn.Module]]:
        """Modules that get the per-module torch.func rule instead of a one-backward layer rule."""
        return [(p.name, p.module) for p in capture_plan(module)[0] if p.rule is None]

    def trainable(self, p: nn.Parameter | None) -> nn.Parameter | None:
        """``p`` if the engine handles it (trainable at construction), else ``None``."""
        return p if p is not None and id(p) in self._trainable else None

    # ---------------------------------------------------------------- attach / detach

    def _patch(self, mod: nn.Module, captured: Callable, rows: _RowCheck | None) -> None:
        had_own = "forward" in mod.__dict__
        previous = mod.__dict__.get("forward")
        original = mod.forward
        engine = self

        def forward(self_: nn.Module, *args: Any, **kwargs: Any) -> Any:
            # Only training steps are captured; eval, validation, no_grad, the per-module rule's
            # own call and its recomputation in backward run the original.
            if engine.capturing_forward() and id(mod) not in engine._inner:
                with engine._lifting.layer_running(mod):
                    if rows is not None:
                        if not rows.are_examples(args, kwargs):
                            return rows.lifted_call(args, kwargs)
                        engine.note_use(rows.params)
                    return captured(*args, **kwargs)
            return original(*args, **kwargs)

        mod.forward = types.MethodType(forward, mod)  # type: ignore[method-assign]
        self._patched.append((mod, previous if had_own else None))

    def capturing_forward(self) -> bool:
        """Whether a module called now is captured (a training step's forward, not a recomputation)."""
        return self._capturing and not self._recomputing and torch.is_grad_enabled()

    def forward_batch_size(self) -> int | None:
        """The micro-batch size: given by the caller, else the first batched input of this forward."""
        return self.expected_batch_size or self._forward_batch

    def set_forward_batch_size(self, batch: int | None) -> None:
        self._forward_batch = batch

    def mark_dense(self, params: list[nn.Parameter]) -> None:
        """``params`` get materialised per-example gradients: materialise their other uses too."""
        self._dense.update(id(p) for p in params)

    def lift(self, layer: nn.Module, name: str, params: list[nn.Parameter], why: str) -> None:
        """``layer`` (captured) saw rows that are not examples: hand ``params`` to an enclosing module."""
        self._lifting.lift(layer, name, [p for p in params if id(p) in self._trainable], why)

    def note_use(self, params: list[nn.Parameter]) -> None:
        """A captured layer used ``params`` with rows that are examples (see :class:`.lift.Lifting`)."""
        self._lifting.note_use(params)

    @contextlib.contextmanager
    def calling_original(self, mod: nn.Module) -> Iterator[None]:
        """Inside, ``mod`` runs its original forward (its children stay captured)."""
        self._inner.add(id(mod))
        try:
            yield
        finally:
            self._inner.discard(id(mod))

    @contextlib.contextmanager
    def recomputing(self) -> Iterator[None]:
        """Inside, every module runs its original forward (the per-module rule's recomputation)."""
        previous, self._recomputing = self._recomputing, True
        try:
            yield
        finally:
            self._recomputing = previous

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        self._had_grad = {id(p) for p in self.params if p.grad is not None}
        # The first captured forward is watched for parameters used outside their layers (see
        # :class:`.lift.DirectUses`); later ones only inside the modules found using them.
        with super().capturing(), self._lifting.watching(not self._watched):
            yield
        self._watched = True

    def _leak_hook(self, name: str) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            # The hook also runs when the captured layers gave no gradient (p.grad stays None);
            # a gradient that was already there before the capture started is not ours to judge.
            if self._capturing and p.grad is not None and id(p) not in self._had_grad:
                self._leaked.add(name)

        return hook

    def remove(self) -> None:
        self.reset()
        for mod, previous in reversed(self._patched):
            if previous is None:
                del mod.forward
            else:
                mod.forward = previous
        self._patched.clear()
        self._lifting.remove()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # ---------------------------------------------------------------- recording (backward)

    def batch_mismatch_message(
        self, handle: Handle, param: nn.Parameter | None, expected: int, got: int
    ) -> str:
        what = f"layer {handle.name}"
        if param is not None:
            what += f" (parameter {self._names.get(id(param), '?')})"
        source = "the micro-batch has" if self.expected_batch_size is not None else f"{self._first_layer} saw"
        return (
            f"engine={self.name!r}: {what} saw a batch dimension of {got}, but {source} {expected} examples. "
            "Its input does not hold one row per example (ids or a table shared by the batch and "
            "broadcast later, or a sequence-first layout), so its gradient cannot be attributed to the "
            "examples. Call it with batch-first inputs of one row per example (e.g. expand shared ids to "
            "the batch size before the call)."
        )

    def _check_batch(self, handle: Handle, param: nn.Parameter | None, b: int) -> None:
        expected = self.expected_batch_size or self._batch_size
        if expected is not None and b != expected:
            raise RuntimeError(self.batch_mismatch_message(handle, param, expected, b))
        if self._batch_size is None:
            self._batch_size, self._first_layer = b, f"layer {handle.name}"

    def count_use(self, param: nn.Parameter | None) -> None:
        """A captured layer used ``param`` in forward (only :class:`GhostClippingEngine` counts)."""

    def wants_vectors(self) -> bool:
        """Whether small per-example gradients computed in backward are recorded now."""
        return self._capturing

    def record_weight(self, handle: Handle, param: nn.Parameter, contribution: Contribution) -> None:
        if not self._capturing or self._recorded_dense(handle, param, contribution):
            return
        self._check_batch(handle, param, contribution.right.shape[0])
        self._records.setdefault(param, ParamRecords()).weights.append(contribution)

    def _recorded_dense(self, handle: Handle, param: nn.Parameter, contribution: Contribution) -> bool:
        r"""A use of a parameter that also gets materialised per-example gradients (a torch.func rule).

        Its per-example gradient is the sum of all its uses, so this use is materialised too
        (:math:`L_i^\top R_i`, ``(B, rows, cols)``) and added to them: the norm of the sum, cross
        terms included, never a sum of per-use norms.
        """
        if id(param) not in self._dense:
            return False
        if self.wants_vectors():
            self._check_batch(handle, param, contribution.right.shape[0])
            rows = contribution.rows or (0, param.shape[0])
            grads = contribution.materialise(rows[1] - rows[0])
            if contribution.rows is None:
                grads = grads.reshape(grads.shape[0], *param.shape)
            self._records.setdefault(param, ParamRecords()).vectors.append((contribution.rows, grads))
        return True

    def record_vector(
        self, handle: Handle, param: nn.Parameter, rows: tuple[int, int] | None, grads: Tensor
    ) -> None:
        if not self.wants_vectors():
            return
        self._check_batch(handle, param, grads.shape[0])
        self._records.setdefault(param, ParamRecords()).vectors.append((rows, grads))

    # ---------------------------------------------------------------- contract

    @property
    def batch_size(self) -> int:
        return self._batch_size or 0

    def per_sample_squared_norms(self) -> Tensor:
        if self._leaked:
            raise RuntimeError(
                f"engine={self.name!r}: parameters {sorted(self._leaked)} also received gradient from "
                "outside the layers this engine captures (a direct use such as F.linear(x, layer.weight) "
                "outside every module's forward, e.g. in training_step, or in a module that the first "
                "training step did not see using them), so their per-example norms would be incomplete. "
                "Route every use through the module that owns the parameter (call the layer), or make the "
                "direct use inside a module's forward in every step."
            )
        total: Tensor | None = None
        for param, rec in self._records.items():
            if rec.weights and rec.vectors:
                # Not expected (mark_dense routes such uses to the vectors); exact all the same.
                rec.vectors += [(c.rows, _materialised(param, c)) for c in rec.weights]
                rec.weights = []
            if rec.weights:
                sq = squared_norms_of_weight(param, rec.weights)
            else:
                sq = squared_norms_of_vectors(param, rec.vectors)
            total = sq if total is None else total + sq.to(total.dtype)
        if total is None:
            return torch.zeros(self.batch_size)
        return total

    def accumulate_weighted_sum(self, weights: Tensor, summed: dict[nn.Parameter, Tensor]) -> None:
        for param in self._records:
            acc = self._weighted_sum_of(param, weights)
            if acc is not None:
                add_into(summed, param, acc)

    def weighted_sums_in_order(
        self, weights: Tensor, params: list[nn.Parameter]
    ) -> Iterator[tuple[nn.Parameter, Tensor | None]]:
        # One parameter's sum at a time, from the records every layer kept.
        for param in params:
            yield param, self._weighted_sum_of(param, weights) if param in self._records else None

    def _weighted_sum_of(self, param: nn.Parameter, weights: Tensor) -> Tensor | None:
        rec = self._records[param]
        acc = weighted_sum_of_weight(param, rec.weights, weights) if rec.weights else None
        if rec.vectors:
            grads = vector_grads(param, rec.vectors)
            w = weights.to(device=grads.device, dtype=grads.dtype)
            vec = torch.tensordot(w, grads, dims=1)
            acc = vec if acc is None else acc + vec.view(acc.shape)
        return None if acc is None else acc.view(param.shape)

    def reset(self) -> None:
        self._records.clear()
        self._leaked.clear()
        self._batch_size = None
        self._forward_batch = None
        self._lifting.frames.clear()
        self._expected_batch_size = None


class GhostClippingEngine(BookKeepingEngine):
    r"""Per-example norms and clipped sums from two backward passes, memory close to non-private.

    Book-keeping (:class:`BookKeepingEngine`) keeps every layer's ``a`` and ``b`` until the
    clipping weights are known: about twice the activation memory. This engine keeps neither
    (ghost clipping, Li et al. 2022; Opacus's ``grad_sample_mode="ghost"``):

    1. The training step's backward runs with the graph retained. When a weight's last use in the
       micro-batch has passed, its per-example squared norm
       :math:`\sum_{k,l} \langle L^k_i L^{l\top}_i, R^k_i R^{l\top}_i \rangle` is computed and its
       ``(a, b)`` are dropped; only ``(B,)`` norms and the small norm-layer/bias gradients stay.
    2. :meth:`accumulate_weighted_sum` backpropagates the same loss again. Each layer forms
       :math:`(w \odot b)^\top a` as its ``b`` arrives and drops it.

    Peak memory is that of non-private training (the retained graph is what non-private backward
    holds at its start); the price is a second backward pass. Same layers and same exactness as
    ``engine="bk"``. Gradient hooks a user registers on activations run in both passes.

    The strategy passes the backpropagated loss (after any GradScaler scaling) with
    :meth:`set_backward_root`; on its own::

        engine = GhostClippingEngine(model)
        with engine.capturing():
            loss = F.cross_entropy(model(x), y, reduction="sum")
            loss.backward(retain_graph=True)
        engine.set_backward_root(loss)
        norms = engine.per_sample_squared_norms().sqrt()
        summed = {}
        engine.accumulate_weighted_sum(1.0 / (norms + 0.01), summed)   # second backward
        engine.reset()
    """

    name = "ghost"
    needs_backward_root = True

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self._uses: dict[nn.Parameter, int] = {}
        self._pending: dict[nn.Parameter, list[Contribution]] = {}
        self._weight_sq_norms: Tensor | None = None
        self._root: Tensor | None = None
        self._second_pass: tuple[Tensor, dict[nn.Parameter, Tensor]] | None = None

    def set_backward_root(self, root: Tensor) -> None:
        """The scalar whose (graph-retaining) backward was captured; backpropagated again later."""
        self._root = root

    def count_use(self, param: nn.Parameter | None) -> None:
        if self._capturing and param is not None and self._second_pass is None:
            self._uses[param] = self._uses.get(param, 0) + 1

    def record_weight(self, handle: Handle, param: nn.Parameter, contribution: Contribution) -> None:
        if not self._capturing or self._recorded_dense(handle, param, contribution):
            return
        self._check_batch(handle, param, contribution.right.shape[0])
        pending = self._pending.setdefault(param, [])
        pending.append(contribution)
        # Cross terms need every use of a shared weight at once: finish early only when all the
        # uses counted in forward have arrived, else at the end (_finish_all).
        uses = self._uses.get(param)
        if uses is not None and len(pending) >= uses:
            self._finish(param)

    def wants_vectors(self) -> bool:
        # The first pass already recorded the small gradients (the per-module rule skips its vmap).
        return self._capturing and self._second_pass is None

    def _finish(self, param: nn.Parameter) -> None:
        contributions = self._pending.pop(param)
        if self._second_pass is None:
            sq = squared_norms_of_weight(param, contributions)
            self._weight_sq_norms = sq if self._weight_sq_norms is None else self._weight_sq_norms + sq
        else:
            weights, summed = self._second_pass
            add_into(summed, param, weighted_sum_of_weight(param, contributions, weights))

    def _finish_all(self) -> None:
        # A use whose output never reached the loss has no backward; finish with what came.
        for param in list(self._pending):
            self._finish(param)

    def per_sample_squared_norms(self) -> Tensor:
        self._finish_all()
        vectors = super().per_sample_squared_norms()  # the records hold only vector gradients
        if self._weight_sq_norms is None:
            return vectors
        if not self._records:
            return self._weight_sq_norms
        return self._weight_sq_norms + vectors.to(self._weight_sq_norms.dtype)

    def accumulate_weighted_sum(self, weights: Tensor, summed: dict[nn.Parameter, Tensor]) -> None:
        if self._weight_sq_norms is not None:
            if self._root is None:
                raise RuntimeError(
                    "engine='ghost' needs the loss of the captured backward for its second pass: call "
                    "set_backward_root(loss) after loss.backward(retain_graph=True)."
                )
            self._second_pass = (weights, summed)
            # The plain capture flag: BookKeepingEngine.capturing would also reset the leak check's
            # record of which gradients existed before the first pass.
            try:
                with super(BookKeepingEngine, self).capturing():
                    torch.autograd.backward(self._root)
                self._finish_all()
            finally:
                self._second_pass = None
                self._root = None
        super().accumulate_weighted_sum(weights, summed)  # vector gradients

    def weighted_sums_in_order(
        self, weights: Tensor, params: list[nn.Parameter]
    ) -> Iterator[tuple[nn.Parameter, Tensor | None]]:
        # The sums arrive during the second backward, in backward order: collect, then hand out.
        return PerSampleEngine.weighted_sums_in_order(self, weights, params)

    def reset(self) -> None:
        super().reset()
        self._uses.clear()
        self._pending.clear()
        self._weight_sq_norms = None
        self._root = None


def squared_norms_of_vectors(
    param: nn.Parameter, vectors: list[tuple[tuple[int, int] | None, Tensor]]
) -> Tensor:
    r""":math:`\|\sum_k g^k_i\|^2` over the uses ``k`` of ``param`` whose per-example gradients were
    materialised: the norm of the sum (cross terms included), never the sum of per-use norms."""
    return vector_grads(param, vectors).flatten(1).pow(2).sum(1)


def _materialised(param: nn.Parameter, c: Contribution) -> Tensor:
    rows = c.rows or (0, param.shape[0])
    g = c.materialise(rows[1] - rows[0])
    return g if c.rows is not None else g.reshape(g.shape[0], *param.shape)


class _RowCheck:
    """Whether a rule-captured layer's input holds one row per example, and the lifted call if not."""

    def __init__(self, engine: BookKeepingEngine, rule: LayerRule, module: nn.Module, handle: Handle) -> None:
        self.engine, self.rule, self.module, self.handle = engine, rule, module, handle
        children = rule.handled_children(module)
        self.params = [
            p
            for m in (module, *children)
            for p in m.parameters(recurse=m is not module)
            if id(p) in engine._trainable
        ]

    def are_examples(self, args: tuple, kwargs: dict) -> bool:
        batch = self.engine.forward_batch_size()
        if batch is None:
            return True
        return self.rule.rows_are_examples(self.module, args, kwargs, self.handle.batch_dim, batch)

    def lifted_call(self, args: tuple, kwargs: dict) -> Any:
        """The original forward with the layer's parameters detached; an enclosing module gets them."""
        names = {id(p): n for n, p in self.module.named_parameters()}
        detached = {names[id(p)]: p.detach() for p in self.params}
        self.engine.lift(
            self.module, self.handle.name, self.params, "its input does not hold one row per example"
        )
        with self.engine.calling_original(self.module):
            return torch.func.functional_call(self.module, detached, args, kwargs)


def _seq_first_modules(root: nn.Module) -> set[int]:
    """ids of layers inside ``nn.Transformer*`` containers built with ``batch_first=False``."""
    out: set[int] = set()
    for mod in root.modules():
        if not isinstance(mod, _TRANSFORMER_CONTAINERS):
            continue
        attn = next((m for m in mod.modules() if isinstance(m, nn.MultiheadAttention)), None)
        if attn is not None and not attn.batch_first:
            out.update(id(m) for m in mod.modules())
    return out


__all__ = ["BookKeepingEngine", "GhostClippingEngine", "PlannedModule", "capture_plan"]
