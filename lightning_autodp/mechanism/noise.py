"""Gaussian noise for the clipped gradient sum.

The noise added to the clipped sum of one optimizer step is ``sigma * R * z`` with
``z ~ N(0, I)`` over every trainable parameter, drawn fresh each step. Under data parallelism it
must enter the all-reduced sum exactly once: see :class:`NoiseSource` and
:func:`lightning_autodp.mechanism.step.privatize`. Where the randomness comes from (seeded streams or the
OS CSPRNG) is described in :mod:`lightning_autodp.mechanism.randomness`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_autodp.mechanism.chacha import ChaChaGaussian
from lightning_autodp.mechanism.randomness import derive_seed

NOISE_DOMAIN = "noise"


class NoiseSource:
    """Draws the Gaussian noise of each optimizer step.

    Args:
        seed: the user's seed (see :mod:`lightning_autodp.mechanism.randomness`); unused in secure mode.
        rank: this process's global rank, part of the stream's domain.
        secure_mode: draw from ChaCha20 keyed by 32 fresh bytes of the OS CSPRNG per step, computed
            on the parameters' device, with Opacus's floating-point mitigation (see
            :mod:`lightning_autodp.mechanism.chacha`).

    In seeded mode the noise of step ``t`` comes from a generator seeded with
    ``derive_seed(seed, "noise", rank, t)``: a resumed run draws what the uninterrupted one
    would have, with no generator state to checkpoint, and the stream shares nothing with
    torch's global generator seeded with the same ``seed``.

    Example::

        source = NoiseSource(seed=1234)
        source.start_step(0)
        noisy = clipped_sum + source.gaussian(std=sigma * R, like=clipped_sum)
    """

    def __init__(self, seed: int, rank: int = 0, secure_mode: bool = False) -> None:
        self.seed = seed
        self.rank = rank
        self.secure_mode = secure_mode
        self._step = 0
        self._generators: dict[torch.device, torch.Generator] = {}
        self._secure: ChaChaGaussian | None = None  # secure mode: this step's key, drawn at first use

    def start_step(self, step: int) -> None:
        """Select the stream of optimizer step ``step`` (counted over the whole training history)."""
        self._step = step
        self._generators.clear()
        self._secure = None  # a fresh key for every step: no step's noise says anything about another's

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(derive_seed(self.seed, NOISE_DOMAIN, self.rank, self._step))
            self._generators[device] = generator
        return self._generators[device]

    def gaussian(self, std: float, like: Tensor) -> Tensor:
        """``std * z`` with ``z ~ N(0, I)`` shaped like ``like``, float32 on its device."""
        if std == 0:
            return torch.zeros(like.shape, device=like.device, dtype=torch.float32)
        if self.secure_mode:
            if self._secure is None:
                self._secure = ChaChaGaussian()  # 32 bytes from os.urandom
            z = self._secure.standard_normal(like.shape, device=like.device)
            return (std * z).to(dtype=torch.float32)
        return torch.normal(
            0.0, std, size=like.shape, generator=self._generator(like.device), device=like.device
        )
