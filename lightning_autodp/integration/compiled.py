"""dp_auto with a ``torch.compile``'d LightningModule: what is checked before training.

``trainer.fit(torch.compile(module))`` runs the module's ``forward`` and ``training_step`` through
TorchDynamo. The engines' module hooks cause graph breaks where they run (they execute eagerly, on
the tensors the compiled graphs produce), so the per-example quantities are those of eager mode;
``tests/test_compile.py`` checks the update against the float64 per-example loop.

One combination fails inside torch, mid-step: the two-pass ``ghost`` engine backpropagates the same
graph twice (``retain_graph=True``), which AOTAutograd's donated buffers forbid for compiled
backward graphs. It is refused before training, with the fixes named.
"""

from __future__ import annotations

from torch import nn

from lightning_autodp import _compat
from lightning_autodp.engines import PerSampleEngine


def check_compiled_module(module: nn.Module, engine: PerSampleEngine) -> None:
    """Refuse a compiled module under a two-pass engine while torch donates backward buffers."""
    if not (_compat.is_compiled_lightning_module(module) and engine.needs_backward_root):
        return
    if _compat.donated_buffers_enabled():
        raise ValueError(
            f"The LightningModule is compiled (torch.compile) and dp_auto's engine is "
            f"{type(engine).__name__}, which runs two backward passes over one graph; torch's compiled "
            "backward (donated buffers) allows only one. Use DPAutoStrategy(engine='bk') (one backward), or "
            "set torch._functorch.config.donated_buffer = False before trainer.fit."
        )
