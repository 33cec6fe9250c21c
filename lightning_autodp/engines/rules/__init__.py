"""One file per layer rule; importing this package registers them (see :mod:`..rule`)."""

from lightning_autodp.engines.rules import conv, embedding, hf_rmsnorm, linear, mha, norm  # noqa: F401 - registers
from lightning_autodp.engines.rules.module import ModuleCapture

__all__ = ["ModuleCapture"]
