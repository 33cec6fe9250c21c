"""Gaussian noise for the clipped gradient sum.

The noise added to the clipped sum of one optimizer step is ``sigma * R * z`` with
``z ~ N(0, I)`` over every trainable parameter, drawn fresh each step. Under data parallelism it
must enter the all-reduced sum exactly once: see :class:`NoiseSource` and
:meth:`lightning_autodp.DPAutoStrategy.optimizer_step`.
"""

from __future__ import annotations

import secrets

import torch
from opacus.optimizers.optimizer import _generate_noise
from torch import Tensor


class NoiseSource:
    """Draws the Gaussian noise of each step.

    Args:
        seed: seed of the dedicated generator (reproducible runs; ignored in secure mode).
        secure_mode: draw from the operating system's CSPRNG (a fresh 64-bit seed from
            :mod:`secrets` for every tensor) and use Opacus's floating-point-attack mitigation
            (each sample is a normalised sum of several Gaussian draws). Slower; use it for
            production releases, not for experiments.

    Example::

        source = NoiseSource(seed=0)
        noisy = clipped_sum + source.gaussian(std=sigma * R, like=clipped_sum)
    """

    def __init__(self, seed: int, secure_mode: bool = False) -> None:
        self.secure_mode = secure_mode
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.secure_mode:
            generator = torch.Generator(device=device)
            generator.manual_seed(secrets.randbits(63))
            return generator
        if device not in self._generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(self._seed)
            self._generators[device] = generator
        return self._generators[device]

    def gaussian(self, std: float, like: Tensor) -> Tensor:
        """``std * z`` with ``z ~ N(0, I)`` shaped like ``like`` (float32)."""
        reference = torch.empty_like(like, dtype=torch.float32)
        return _generate_noise(std, reference, self._generator(like.device), secure_mode=self.secure_mode)

    def state_dict(self) -> dict:
        return {str(d): g.get_state() for d, g in self._generators.items()} if not self.secure_mode else {}

    def load_state_dict(self, state: dict) -> None:
        for device_name, rng_state in state.items():
            device = torch.device(device_name)
            generator = torch.Generator(device=device)
            generator.set_state(rng_state)
            self._generators[device] = generator
