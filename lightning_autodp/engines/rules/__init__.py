"""One file per layer rule; importing this package registers them (see :mod:`..rule`)."""

from lightning_autodp.engines.rules import (  # noqa: F401 - registers
    batchnorm,
    conv,
    embedding,
    hf_gemma_t5,
    hf_rmsnorm,
    linear,
    mha,
    norm,
)
from lightning_autodp.engines.rules.module import ModuleCapture

__all__ = ["ModuleCapture"]
