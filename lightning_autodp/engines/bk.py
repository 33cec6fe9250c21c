"""Compatibility import path: the one-backward engines live in :mod:`.bookkeeping`."""

from lightning_autodp.engines.bookkeeping import BookKeepingEngine, GhostClippingEngine

__all__ = ["BookKeepingEngine", "GhostClippingEngine"]
