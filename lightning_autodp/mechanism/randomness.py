r"""Where the two secrets of DP-SGD come from: the noise and the Poisson samples.

The guarantee assumes an adversary knows neither the Gaussian noise :math:`z` of any step nor
which examples a step sampled. Both come from streams that are independent of torch's global
generator (which seeds model initialisation, dropout, data augmentation) and of each other.

**Seeded mode** (default, reproducible). Every stream has its own seed, derived from the user's
``seed`` by SHA-256 with a domain tag::

    seed(domain, *parts) = SHA-256("lightning-autodp/v1" | seed | domain | parts...)[:63 bits]

with ``domain`` ``"noise"`` (parts: rank, optimizer step) or ``"sampling"`` (parts: rank, epoch).
Knowing the stream of one domain (or torch's global stream, seeded with the same ``seed``) reveals
nothing usable about another short of inverting SHA-256. But anyone who knows ``seed`` can
recompute every stream: in seeded mode ``seed`` is a secret as strong as the guarantee.

**Secure mode** (``secure_mode=True``). No seed is used. Every random number comes from the
operating system's CSPRNG (:func:`os.urandom`, i.e. ``getrandom(2)`` on Linux), directly or as
the key of a stream cipher:

* sampling: one uniform :math:`u \in (0, 1]` on the 53-bit grid per example and step
  (8 bytes of OS randomness each); the example is in the step iff :math:`u \le q`,
  so :math:`P = \lceil q 2^{53} \rceil / 2^{53}`, within :math:`2^{-53}` of ``q``;
* noise: ChaCha20 (RFC 8439) keyed by 32 fresh bytes of :func:`os.urandom` per optimizer step and
  rank, computed with tensor operations on the parameters' device
  (:mod:`lightning_autodp.mechanism.chacha`); its words become uniforms on the 53-bit grid as above,
  standard normals by the Box-Muller transform in float64 (two uniforms give two normals), then
  Opacus's floating-point mitigation (Jin et al. 2021, arXiv:2107.10138, section 5.1, as in
  ``opacus.optimizers.optimizer._generate_noise``): each coordinate is
  :math:`(z_1 + z_2 + z_3 + z_4)/2` of four independent normals, which still has variance 1 but
  whose floating-point value no longer reveals the single draw behind it. Cost: 32 bytes of OS
  randomness per step, and eight ChaCha20 words (half a block) per noised coordinate.
  :func:`secure_gaussian` is the same construction with every uniform read from the OS (32 bytes
  per coordinate, on the CPU); it serves as the baseline of ``benchmarks/secure_noise.py``.

Threat model of secure mode: the adversary sees the released model (every intermediate model,
in DP-SGD's analysis) and may know the code, the data of all other examples, every seed and torch's
generator states; it does not read the training process's memory. The noise is then as
unpredictable as ChaCha20's output under a uniformly random 256-bit key, the assumption that the
Linux kernel's own CSPRNG (``getrandom(2)``, a ChaCha20 generator since Linux 4.8) already rests on.
Each step's key lives in host and device memory only during that step's noise draw; whoever can
read that memory could read the noise itself, which no generator protects against.

torch has no CSPRNG-backed ``torch.Generator`` (torchcsprng, which Opacus's ``secure_mode`` uses,
is not maintained for current torch), hence the explicit construction from OS bytes and ChaCha20.
"""

from __future__ import annotations

import hashlib
import math
import os

import torch

_DOMAIN_PREFIX = b"lightning-autodp/v1"
_MASK_63 = (1 << 63) - 1
_UNIT = 2.0**-53


def derive_seed(seed: int, domain: str, *parts: int) -> int:
    """A 63-bit seed for the stream ``(domain, *parts)``, independent of every other such stream.

    SHA-256 over an unambiguous encoding (lengths are fixed or delimited) of the user's seed,
    the domain tag and the integer parts.
    """
    h = hashlib.sha256(_DOMAIN_PREFIX)
    for item in (seed, domain, *parts):
        data = str(item).encode()
        h.update(len(data).to_bytes(4, "little"))
        h.update(data)
    return int.from_bytes(h.digest()[:8], "little") & _MASK_63


def seeded_generator(
    seed: int, domain: str, *parts: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with :func:`derive_seed`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, domain, *parts))
    return generator


def secure_uniform(n: int) -> torch.Tensor:
    """``n`` uniforms in ``(0, 1]`` (float64, 53-bit grid) from the OS CSPRNG."""
    if n == 0:
        return torch.empty(0, dtype=torch.float64)
    words = torch.frombuffer(bytearray(os.urandom(8 * n)), dtype=torch.int64)
    mantissa = (words >> 11) & ((1 << 53) - 1)  # the top 53 bits, non-negative
    return (mantissa.to(torch.float64) + 1.0) * _UNIT


def secure_standard_normal(n: int) -> torch.Tensor:
    """``n`` independent N(0, 1) draws (float64) by Box-Muller from :func:`secure_uniform`."""
    pairs = math.ceil(n / 2)
    u1, u2 = secure_uniform(pairs), secure_uniform(pairs)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = 2.0 * math.pi * u2
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]


def secure_gaussian(shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    r"""N(0, I) of ``shape`` (float64, CPU) with the floating-point mitigation:
    :math:`(z_1 + z_2 + z_3 + z_4) / 2`, each :math:`z_k` from :func:`secure_standard_normal`."""
    n = math.prod(shape)
    total = secure_standard_normal(n)
    for _ in range(3):
        total += secure_standard_normal(n)
    return (total / 2.0).reshape(shape)
