"""Ways to get per-example gradient norms and clipped sums (see :mod:`.base` for the contract)."""

from __future__ import annotations

from torch import nn

from lightning_autodp.engines.base import PerSampleEngine
from lightning_autodp.engines.hooks import HooksEngine
from lightning_autodp.mechanism.batches import infer_batch_size

ENGINE_NAMES: tuple[str, ...] = ("auto", "bk", "ghost", "hooks")


def make_engine(name: str, module: nn.Module) -> PerSampleEngine:
    """Attach the engine called ``name`` to ``module``.

    ``"bk"``: one backward pass; every layer with a registered rule (``engines/rules/``) is captured
    by it, every other module that owns trainable parameters by the exact per-module torch.func rule
    (announced with a warning naming those modules and the method). ``"auto"`` is ``"bk"``: exact
    per layer, never Opacus hooks for the whole model. ``"ghost"``: the same rules in two backward
    passes, peak memory close to non-private. ``"hooks"``: Opacus's per-sample gradient hooks.
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
    from lightning_autodp.engines.bookkeeping import BookKeepingEngine, GhostClippingEngine

    return GhostClippingEngine(module) if name == "ghost" else BookKeepingEngine(module)


__all__ = ["ENGINE_NAMES", "HooksEngine", "PerSampleEngine", "infer_batch_size", "make_engine"]
