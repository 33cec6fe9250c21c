"""Ways to get per-example gradient norms and clipped sums (see :mod:`.base` for the contract)."""

from __future__ import annotations

import logging

from torch import nn

from lightning_autodp.engines.base import PerSampleEngine
from lightning_autodp.engines.hooks import HooksEngine

log = logging.getLogger(__name__)

ENGINE_NAMES: tuple[str, ...] = ("auto", "bk", "ghost", "hooks")


def _bk_engine_class(name: str) -> type[PerSampleEngine] | None:
    try:
        from lightning_autodp.engines.bk import BookKeepingEngine, GhostClippingEngine
    except ImportError:  # pragma: no cover - bk is part of the package; keep hooks usable alone
        return None
    return GhostClippingEngine if name == "ghost" else BookKeepingEngine


def make_engine(name: str, module: nn.Module) -> PerSampleEngine:
    """Attach the engine called ``name`` to ``module``.

    ``"auto"`` takes the single-backward book-keeping engine when it supports every trainable
    layer, else Opacus's hooks, saying which layer forced the fallback. ``"ghost"`` is the
    two-backward variant of ``"bk"`` (same layers) that trades time for memory.
    """
    if name not in ENGINE_NAMES:
        raise ValueError(f"Unknown engine={name!r}. Use one of {', '.join(map(repr, ENGINE_NAMES))}.")
    if name == "hooks":
        unsupported = HooksEngine.unsupported_modules(module)
        if unsupported:
            names = ", ".join(f"{qualname} ({type(m).__name__})" for qualname, m in unsupported)
            raise ValueError(
                f"engine='hooks' does not support these trainable layers: {names}. "
                "Build nn.MultiheadAttention / nn.Transformer* layers with batch_first=True, "
                "or use engine='bk'."
            )
        return HooksEngine(module)
    bk = _bk_engine_class(name)
    if bk is None:
        if name != "auto":
            raise ImportError(f"The engine {name!r} could not be imported; use engine='hooks'.")
        return HooksEngine(module)
    unsupported = bk.unsupported_modules(module)
    if not unsupported:
        return bk(module)
    names = ", ".join(f"{qualname} ({type(m).__name__})" for qualname, m in unsupported)
    if name != "auto":
        raise ValueError(
            f"engine={name!r} does not support these trainable layers: {names}. "
            "Use engine='hooks' (Opacus per-sample gradients) or engine='auto'."
        )
    log.info(f"dp_auto: engine='auto' uses Opacus hooks because engine='bk' does not support {names}.")
    return HooksEngine(module)


__all__ = ["ENGINE_NAMES", "HooksEngine", "PerSampleEngine", "make_engine"]
