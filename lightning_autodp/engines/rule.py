"""The layer-rule registry of the one-backward engines (``engine="bk"``, ``"ghost"``, ``"auto"``).

A *rule* tells the engines how to capture one kind of module: it replaces the module's forward
(while a training step is captured) with one whose backward records the factors of
:mod:`~lightning_autodp.engines.contributions` for each trainable parameter. Adding a layer is one
file under ``engines/rules/``::

    @register_rule(MyLayer)                       # or the dotted name "package.module.MyLayer"
    class MyLayerRule(LayerRule):
        def captured_forward(self, module, handle):
            def forward(x):
                return _MyLayerFn.apply(x, module.weight, handle)   # backward: handle.record_*
            return forward

Lookup follows the module class's MRO, so subclasses match their parent's rule (a LayerNorm
subclass gets the LayerNorm rule) unless :meth:`LayerRule.unsupported_reason` refuses them, e.g.
because the subclass overrides ``forward`` and the rule would not compute what it computes.
Modules without a rule get the exact per-module fallback of :mod:`.rules.module`.
A dotted-name key avoids importing optional libraries (transformers) to register their layers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

from lightning_autodp.engines.contributions import Contribution

if TYPE_CHECKING:  # pragma: no cover
    from lightning_autodp.engines.bookkeeping import BookKeepingEngine


@dataclass
class Handle:
    """What one captured module records into: the engine, its name and its trainable parameters.

    ``weight``/``bias`` are ``None`` where frozen (no per-example work for them). ``batch_dim`` is
    the dim of the module's input that holds the examples (1 inside ``batch_first=False``
    ``nn.Transformer*`` containers). ``weight_rows``/``bias_rows``: the block of rows of a shared
    parameter this call uses (the q/k/v blocks of an attention's ``in_proj_weight``).
    """

    engine: BookKeepingEngine
    name: str
    weight: nn.Parameter | None = None
    bias: nn.Parameter | None = None
    batch_dim: int = 0
    weight_rows: tuple[int, int] | None = None
    bias_rows: tuple[int, int] | None = None

    def record_weight(self, param: nn.Parameter, contribution: Contribution) -> None:
        self.engine.record_weight(self, param, contribution)

    def record_vector(self, param: nn.Parameter, rows: tuple[int, int] | None, grads: Tensor) -> None:
        self.engine.record_vector(self, param, rows, grads)

    def count_use(self, param: nn.Parameter | None) -> None:
        self.engine.count_use(param)

    def block(self, weight_rows: tuple[int, int] | None, bias_rows: tuple[int, int] | None) -> Handle:
        """The same handle restricted to a row block (one of q/k/v of a packed projection)."""
        return Handle(self.engine, self.name, self.weight, self.bias, self.batch_dim, weight_rows, bias_rows)


class LayerRule(ABC):
    """How the one-backward engines capture one module class (see the module docstring)."""

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why this rule cannot capture ``module`` exactly (then the per-module fallback runs)."""
        return None

    def handled_children(self, module: nn.Module) -> list[nn.Module]:
        """Submodules whose parameters this rule captures too (an attention's ``out_proj``)."""
        return []

    def rows_are_examples(
        self, module: nn.Module, args: tuple, kwargs: dict, batch_dim: int, batch: int
    ) -> bool:
        """Whether the call's input holds one row per example (else an enclosing module computes the
        per-example gradients, see :mod:`..lift`). The input is the first tensor argument."""
        x = next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)), None)
        return x is None or (x.dim() > batch_dim and x.shape[batch_dim] == batch)

    @abstractmethod
    def captured_forward(self, module: nn.Module, handle: Handle) -> Callable[..., Any]:
        """A replacement for ``module.forward`` whose backward records into ``handle``."""


_RULES: dict[type[nn.Module] | str, LayerRule] = {}
R = TypeVar("R", bound=type[LayerRule])


def register_rule(*classes: type[nn.Module] | str) -> Callable[[R], R]:
    """Class decorator: register a :class:`LayerRule` for module classes (or their dotted names)."""

    def decorate(rule_cls: R) -> R:
        rule = rule_cls()
        for cls in classes:
            _RULES[cls] = rule
        return rule_cls

    return decorate


def find_rule(module: nn.Module) -> LayerRule | None:
    """The rule registered for the nearest class in ``type(module).__mro__``, or ``None``."""
    for cls in type(module).__mro__:
        rule = _RULES.get(cls) or _RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            return rule
    return None


def overrides_forward(module: nn.Module, *bases: type[nn.Module]) -> bool:
    """True when ``module``'s class computes its own forward instead of one of ``bases``'."""
    return type(module).forward not in tuple(b.forward for b in bases)


def autocast_like_layer(*ts: Tensor | None) -> list[Tensor | None]:
    """Cast a captured layer's floating inputs as autocast would cast the layer (linear, conv).

    A custom ``autograd.Function`` sees autocast enabled in ``forward`` but not in ``backward``;
    casting here and saving the cast tensors makes backward see one dtype (and saves the same
    half-precision activation autocast would have saved).
    """
    x = ts[0]
    assert x is not None
    dev = x.device.type
    if not (x.is_floating_point() and torch.is_autocast_enabled(dev)):
        return list(ts)
    dtype = torch.get_autocast_dtype(dev)
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in ts]
