r"""Layers whose rows are not one per example: exact per-example gradients at an enclosing module.

A layer rule attributes row ``r`` of its input to example ``r``. Some layers see other rows:

* a table shared by the batch (T5's relative attention bias: an embedding looked up with a
  ``(T, T)`` matrix of buckets, broadcast over the batch later),
* tokens flattened to ``(B * T, d)`` before an MLP (OPT) or routed to experts (a sparse mixture of
  experts: the rows an expert sees come from any example),
* windows (Swin attention sees ``(B * windows, N, C)``),
* a module that computes something once for the whole batch (positions) behind its own forward,
* a layer that is never called because an enclosing module passes its parameters to a function
  directly (WavLM's attention hands the ``q_proj``/``k_proj``/``v_proj``/``out_proj`` weights to
  ``F.multi_head_attention_forward``): no layer rule sees that use (:class:`DirectUses`).

The per-example gradient of such a layer's parameters :math:`\theta` is still defined, at the
nearest enclosing module ``A`` whose inputs hold one row per example:
:math:`g_i = J_\theta A(x_i)^\top b_i`, with ``b_i`` the gradient of ``A``'s output for example
``i``. The engine keeps a stack of the modules being called (forward hooks); when a captured layer
sees rows that are not the micro-batch's examples, it runs with :math:`\theta` detached and hands
:math:`\theta` to the innermost module on the stack whose inputs are batched. When that module
returns, its outputs are tapped (:class:`~.rules.module.TappedCall`): in the same backward, one
``torch.func.vjp`` of ``A`` per example (vectorised with ``vmap``) gives :math:`g_i`. An output of
``A`` with batch dim 1 (the relative bias T5 returns and shares with its later layers) is expanded
to the batch, so its gradient arrives per example; an output with other rows sends :math:`\theta`
one module further up. Each recomputation is checked against the batched output (a module that
mixes examples is refused, naming it), and each fallback is announced once.

A direct use is found by watching the first captured forward (a ``TorchFunctionMode``): a trainable
parameter of a captured layer that reaches a torch function outside that layer's own forward, inside
a module call, is replaced by its detached value there and handed to the innermost module that owns it
(the module that used it, or further up as above). Later forwards are watched inside the modules found
that way only. A direct use outside every module call (in the training step itself) is left alone: the
engine refuses it after backward, naming the parameter.

Cost: one extra forward and vjp of ``A`` per micro-batch (``A`` is an attention block, a decoder
layer, a mixture-of-experts block), and :math:`B\,|\theta|` memory for the per-example gradients.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from lightning_autodp.engines.rule import Handle
from lightning_autodp.engines.rules.module import TappedCall, _leaves, floating, is_batched

if TYPE_CHECKING:  # pragma: no cover
    from lightning_autodp.engines.bookkeeping import BookKeepingEngine


@dataclass
class Frame:
    """One module call in progress (while a training step is captured)."""

    module: nn.Module
    args: tuple
    kwargs: dict
    batched: bool
    #: parameters handed to this call, with the layer and the reason each came with
    lifted: dict[nn.Parameter, tuple[str, str | DirectUse]] = field(default_factory=dict)
    #: ids of parameters a layer rule used inside this call
    used: set[int] = field(default_factory=set)
    #: whether this call switched on the watch for direct uses (a module found using them)
    watching: bool = False


def _tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    out = []
    for v in (*args, *kwargs.values()):
        if isinstance(v, Tensor):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            out += [t for t in v if isinstance(t, Tensor)]
    return out


#: functions that read a parameter without putting it in the graph (no direct use)
_READS = (
    torch.Tensor.detach, torch.detach, torch.Tensor.requires_grad_, torch.zeros_like, torch.ones_like,
    torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like, torch.Tensor.new_zeros,
    torch.Tensor.new_ones, torch.Tensor.new_empty, torch.Tensor.new_full, torch.Tensor.new_tensor,
)  # fmt: skip


def _function_name(func: Any) -> str:
    name = getattr(func, "__name__", repr(func))
    module = getattr(func, "__module__", None) or ""
    if module in ("torch.nn.functional", "torch._C._nn"):
        return f"F.{name}"
    if module.startswith("torch"):
        return f"torch.{name}"
    return f"Tensor.{name}" if not module else f"{module}.{name}"


class DirectUse:
    """Why a layer's parameters are handed over: a module uses them directly. Rendered when announced, so
    that it names every function the call passed them to."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.uses: dict[str, str] = {}  # parameter name -> first function

    def __str__(self) -> str:
        uses = ", ".join(f"{name} in {function}" for name, function in self.uses.items())
        return f"{self.owner} uses its parameters directly ({uses}), not through its forward"


class DirectUses(TorchFunctionMode):
    """Watches a captured forward for trainable parameters of captured layers that reach a torch function
    outside their layer's forward (see the module docstring); :meth:`Lifting.direct_use` takes them."""

    def __init__(self, lifting: Lifting) -> None:
        super().__init__()
        self.lifting = lifting

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        lifting = self.lifting
        if (
            not lifting.engine.capturing_forward()
            or getattr(func, "__name__", "") == "__get__"  # an attribute (shape, dtype, grad)
            or func in _READS
        ):
            return func(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        direct = [k for k, v in enumerate(flat) if isinstance(v, Tensor) and lifting.used_directly(v)]
        if not direct:
            return func(*args, **kwargs)
        params: list[nn.Parameter] = [flat[k] for k in direct]
        for k in direct:
            flat[k] = flat[k].detach()
        args, kwargs = tree_unflatten(flat, spec)
        out = func(*args, **kwargs)
        if any(isinstance(o, Tensor) and o.is_floating_point() for o in tree_leaves(out)):
            lifting.direct_use(params, _function_name(func))
        return out


class Lifting:
    """The stack of module calls and the hand-over of parameters to an enclosing module."""

    def __init__(
        self,
        engine: BookKeepingEngine,
        root: nn.Module,
        planned: list[nn.Module],
        layers: dict[int, list[tuple[nn.Module, str]]] | None = None,
    ) -> None:
        self.engine = engine
        self.frames: list[Frame] = []
        self.names = {id(m): n or type(root).__name__ for n, m in root.named_modules()}
        self.announced: set[tuple[str, str]] = set()
        self._param_names: dict[int, dict[int, str]] = {}
        self._hooks: list[Any] = []
        #: id of each trainable parameter of a captured layer -> the captured layers (module, name) using it
        self.layers = layers or {}
        #: ids of the captured layers whose forward is running now (their own uses are not direct)
        self.running: dict[int, int] = {}
        #: ids of the modules found using parameters of their layers directly: watched in every forward
        self.direct_owners: set[int] = set()
        #: (owner, layer) -> the reason announced for it
        self._direct: dict[tuple[int, int], DirectUse] = {}
        self._watch = DirectUses(self)
        self._watching = False
        planned_ids = {id(m) for m in planned}
        for mod in root.modules():
            # Only modules with a captured layer below them can receive its parameters.
            if any(id(m) in planned_ids for m in mod.modules() if m is not mod):
                self._hooks.append(mod.register_forward_pre_hook(self._pre, with_kwargs=True))
                self._hooks.append(mod.register_forward_hook(self._post, with_kwargs=True, always_call=True))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.frames.clear()

    # ------------------------------------------------------------ direct uses of a layer's parameters

    @contextlib.contextmanager
    def layer_running(self, layer: nn.Module) -> Iterator[None]:
        """Inside, ``layer``'s own forward runs: its parameters' uses are its own."""
        key = id(layer)
        self.running[key] = self.running.get(key, 0) + 1
        try:
            yield
        finally:
            self.running[key] -= 1

    @contextlib.contextmanager
    def watching(self, on: bool = True) -> Iterator[None]:
        """Inside, every torch function of a captured forward is watched for direct uses."""
        if not on or self._watching or not self.layers:
            yield
            return
        self._watching = True
        try:
            with self._watch:
                yield
        finally:
            self._watching = False

    def used_directly(self, t: Tensor) -> bool:
        """``t`` is a captured layer's trainable parameter, used outside its layers' forward, in a module."""
        layers = self.layers.get(id(t))
        if not layers or not isinstance(t, nn.Parameter) or any(self.running.get(id(m)) for m, _ in layers):
            return False
        return self._owner(t) is not None

    def _owner(self, p: Tensor) -> Frame | None:
        return next((f for f in reversed(self.frames) if id(p) in self._names_in(f.module)), None)

    def direct_use(self, params: list[nn.Parameter], function: str) -> None:
        """``params`` reached ``function`` outside their layers: the innermost module call owning each
        computes its per-example gradients (or an enclosing one, see :meth:`lift`)."""
        for p in params:
            owner = self._owner(p)
            assert owner is not None
            self.direct_owners.add(id(owner.module))
            layer, name = self.layers[id(p)][0]
            why = self._direct.setdefault(
                (id(owner.module), id(layer)), DirectUse(self._describe(owner.module))
            )
            param = next((n for n, q in layer.named_parameters() if q is p), "?")
            why.uses.setdefault(param, function)
            self.lift(layer, name, [p], why)

    def _active(self) -> bool:
        return self.engine.capturing_forward()

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._active():
            return
        tensors = _tensors(args, kwargs)
        if not self.frames and self.engine.forward_batch_size() is None:
            first = next((t for t in tensors if t.dim() > 0), None)
            self.engine.set_forward_batch_size(None if first is None else first.shape[0])
        batch = self.engine.forward_batch_size()
        batched = batch is not None and any(is_batched(t, batch) for t in tensors)
        frame = Frame(module, args, kwargs, batched)
        if id(module) in self.direct_owners and not self._watching:
            self._watching = frame.watching = True
            self._watch.__enter__()
        self.frames.append(frame)

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        if not self.frames or self.frames[-1].module is not module:
            return None
        frame = self.frames.pop()
        if frame.watching:
            self._watching = False
            self._watch.__exit__(None, None, None)
        if not frame.lifted:
            return None
        batch = self.engine.forward_batch_size()
        assert batch is not None
        leaves = _leaves(out)
        per_example = frame.batched and all(
            is_batched(o, batch) or (o.dim() > 0 and o.shape[0] == 1) for o in leaves if floating(o)
        )
        names = self._names_in(frame.module)
        if not per_example or any(id(p) not in names for p in frame.lifted):
            # An output with other rows (or a parameter this module does not own): one module further up.
            layers = ", ".join(sorted({layer for layer, _ in frame.lifted.values()}))
            target = self._target(frame.module, list(frame.lifted), layers)
            target.lifted.update(frame.lifted)
            return None
        clash = {layer: why for p, (layer, why) in frame.lifted.items() if id(p) in frame.used}
        if clash:
            reasons = "; ".join(f"{layer}: {why}" for layer, why in sorted(clash.items()))
            raise RuntimeError(
                f"dp_auto: the parameters of {', '.join(sorted(clash))} are used inside "
                f"{self._describe(frame.module)} both with rows that are one per example and with rows that "
                f"are not ({reasons}); their per-example gradients would be counted twice. Give each use its "
                "own layer, or freeze these layers (requires_grad_(False); with peft, leave them out of "
                "target_modules)."
            )
        name = self._describe(frame.module)
        for layer, why in frame.lifted.values():
            if (layer, name) not in self.announced:
                self.announced.add((layer, name))
                warnings.warn(
                    f"dp_auto: engine={self.engine.name!r}: layer {layer}: {why}; its per-example "
                    f"gradients are computed exactly with torch.func on the enclosing module {name}, whose "
                    "inputs hold one row per example (one vmap of that module per call, in the same "
                    "backward).",
                    stacklevel=2,
                )
        params = {names[id(p)]: p for p in frame.lifted}
        handle = Handle(self.engine, name)
        call = TappedCall(self.engine, handle, frame.module, params, name, frame.args, frame.kwargs)
        return call.tap(out, batch)

    def lift(self, layer: nn.Module, name: str, params: list[nn.Parameter], why: str | DirectUse) -> None:
        """Hand ``params`` (used by ``layer`` with rows that are not examples) to an enclosing module."""
        if not params:
            return
        what = f"{name} ({type(layer).__name__})"
        target = self._target(layer, params, what)
        for p in params:
            target.lifted[p] = (what, why)
        self.engine.mark_dense(params)

    def note_use(self, params: list[nn.Parameter]) -> None:
        """A layer rule used ``params`` with rows that are examples, inside every call on the stack."""
        if self.frames:
            ids = {id(p) for p in params}
            for frame in self.frames:
                frame.used |= ids

    def _target(self, below: nn.Module, params: list[nn.Parameter], what: str) -> Frame:
        """The innermost call on the stack (not ``below``'s) with batched inputs that owns ``params``."""
        frames = [f for f in self.frames if f.module is not below]
        for frame in reversed(frames):
            names = self._names_in(frame.module)
            if frame.batched and all(id(p) in names for p in params):
                return frame
        batch = self.engine.forward_batch_size()
        raise RuntimeError(
            f"engine={self.engine.name!r}: layer {what} sees rows that are not one per example (the "
            f"micro-batch has {batch} examples), and no module enclosing it has inputs and outputs with one "
            "row per example, so its gradient cannot be attributed to the examples. Call it inside a module "
            "whose inputs and outputs are batch-first with one row per example."
        )

    def _names_in(self, module: nn.Module) -> dict[int, str]:
        key = id(module)
        if key not in self._param_names:
            self._param_names[key] = {id(p): n for n, p in module.named_parameters()}
        return self._param_names[key]

    def _describe(self, module: nn.Module) -> str:
        return f"{self.names.get(id(module), '?')} ({type(module).__name__})"
