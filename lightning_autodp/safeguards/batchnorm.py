r"""BatchNorm under DP: accepted in eval mode with running statistics, refused wherever it mixes examples.

A BatchNorm layer computes

.. math:: y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

per channel. In train mode (or without running statistics) :math:`\mu, \sigma^2` are the mean and
variance *of the batch*: every example's output, hence its loss and gradient, depends on the other
examples, so per-example gradients (and the sensitivity bound of DP-SGD) do not exist; the running
statistics it updates are computed from the private batch without noise as well. In eval mode with
running statistics, :math:`\mu, \sigma^2` are constants: the layer is a fixed per-channel affine map
of each example alone. Frozen, every engine treats it like any other function of the example; with
trainable :math:`\gamma, \beta` the engines have an exact rule for it
(:mod:`lightning_autodp.engines.rules.batchnorm`, and the hooks engine's sampler).

Two checks:

* :func:`refuse_unsupported_batch_norms` (at setup): a BatchNorm without running statistics
  (``track_running_stats=False``: batch statistics even in eval mode) is refused with the fix named.
* :class:`BatchNormGuard` (at every training step, verification included): Lightning keeps each
  submodule's mode as the user set it, but the user's code (``model.train()`` in a hook, a callback)
  can switch a BatchNorm back to train mode at any time, and a model built for training has its
  BatchNorm in train mode. A forward pre-hook on every BatchNorm raises :class:`BatchNormModeError`
  when the layer is about to normalise with batch statistics, before any update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from lightning_autodp import _compat

#: where the user reads how to freeze a BatchNorm for DP fine-tuning
DOC = "docs/how-to/frozen-batchnorm.md"


class BatchNormModeError(RuntimeError):
    """A BatchNorm layer normalised a training batch with the batch's own statistics."""


def batch_norm_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` of every BatchNorm (``BatchNorm*d``, ``SyncBatchNorm``) in ``module``."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, _compat.BATCH_NORM_BASE)]


def uses_batch_statistics(layer: nn.Module) -> bool:
    """True when ``layer`` normalises with the statistics of its input batch (torch's own condition).

    ``nn.modules.batchnorm._BatchNorm.forward`` uses batch statistics when
    ``self.training or (running_mean is None and running_var is None)``.
    """
    return bool(layer.training) or (
        getattr(layer, "running_mean", None) is None and getattr(layer, "running_var", None) is None
    )


def check_per_example(name: str, layer: nn.Module) -> None:
    """Raise :class:`BatchNormModeError` when ``layer`` (called ``name``) would use batch statistics."""
    if uses_batch_statistics(layer):
        raise BatchNormModeError(
            f"Layer {name!r} ({type(layer).__name__}) ran in train mode in a training step: it "
            "normalises with the statistics of the batch, which mix the examples (and updates its "
            "running statistics from them), so the per-example gradients and the DP guarantee would "
            "not hold. Keep it in eval mode for the whole fit, so it applies its running statistics (a "
            f"pretrained model's): call `{name}.eval()` in the LightningModule's on_train_epoch_start "
            "(after anything that calls .train(), e.g. model.train() in a hook or callback); or replace "
            "it with nn.GroupNorm (a model trained from scratch; "
            "opacus.validators.ModuleValidator.fix(model) does this). See " + DOC + "."
        )


def refuse_unsupported_batch_norms(module: nn.Module) -> None:
    """Raise ``ValueError`` for a BatchNorm that no mode makes per-example, naming the fix."""
    for name, layer in batch_norm_layers(module):
        kind = type(layer).__name__
        if getattr(layer, "running_mean", None) is None and getattr(layer, "running_var", None) is None:
            raise ValueError(
                f"Layer {name!r} ({kind}) has track_running_stats=False: it normalises with the statistics "
                "of the batch even in eval mode, which mix the examples, so per-example gradients and DP do "
                "not exist for it. Replace it with nn.GroupNorm (e.g. opacus.validators.ModuleValidator."
                "fix(model)), or use a BatchNorm with running statistics in eval mode (see " + DOC + ")."
            )


class BatchNormGuard:
    """Refuse a BatchNorm that runs with batch statistics inside a captured training step.

    Example::

        guard = BatchNormGuard(model)
        with guard.armed():
            loss = model(x).sum()      # raises BatchNormModeError if a BatchNorm is in train mode
        guard.remove()
    """

    def __init__(self, module: nn.Module) -> None:
        self._armed = False
        self._handles = [
            layer.register_forward_pre_hook(self._check(name)) for name, layer in batch_norm_layers(module)
        ]

    def _check(self, name: str) -> Any:
        def hook(layer: nn.Module, args: tuple) -> None:
            if self._armed:
                check_per_example(name, layer)

        return hook

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """Inside, every BatchNorm call is checked."""
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
