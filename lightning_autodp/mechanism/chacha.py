r"""ChaCha20 (RFC 8439) in tensor operations: secure-mode noise computed where the parameters are.

Why: secure mode must not be predictable from anything an adversary can learn (a seed, torch's
Mersenne Twister or Philox state). Drawing every noise coordinate from the OS (32 bytes per coordinate
per step, on the CPU, copied to the device) costs tens of gigabytes per step for a model of a billion
parameters. Instead each optimizer step (on each rank) draws one 256-bit key from :func:`os.urandom`
and expands it with the ChaCha20 stream cipher on the parameters' device.

ChaCha20 works on sixteen 32-bit words; its only operations are addition mod :math:`2^{32}`,
rotation and xor. Here every word is an ``int64`` tensor element holding a value in
:math:`[0, 2^{32})`: an addition is ``(a + b) & 0xFFFFFFFF`` (the sum is below :math:`2^{33}`), a
left rotation by :math:`r` is ``((x << r) | (x >> (32 - r))) & 0xFFFFFFFF`` (the shifted value is
below :math:`2^{63}`, so no sign bit is ever reached), so the results are exact on any device. Each
column of the state tensor is one independent block: :math:`n` blocks run as one batch of
element-wise kernels (no table lookups, no data-dependent branches: constant time, unlike a
table-based AES).

State layout (RFC 8439, section 2.3): words 0-3 the constants, 4-11 the key (little-endian), 12 the
block counter, 13-15 the nonce. The stream here uses words 12-13 as one 64-bit block counter and
words 14-15 as zero (the original ChaCha layout): a key is used for one step only, so no nonce is
needed, and :math:`2^{64}` blocks of 64 bytes never run out.

From words to normals (:class:`ChaChaGaussian`): two words :math:`w_0, w_1` give the top 53 bits
:math:`m = \lfloor (w_0 2^{32} + w_1) / 2^{11} \rfloor` and the uniform
:math:`u = (m + 1) 2^{-53} \in (0, 1]`; two uniforms give two normals by Box-Muller in float64,
:math:`\sqrt{-2 \ln u_1} \cos(2\pi u_2)` and :math:`\sqrt{-2 \ln u_1} \sin(2\pi u_2)`; each noise
coordinate is :math:`(z_1 + z_2 + z_3 + z_4)/2` of four such normals, Opacus's floating-point
mitigation (see :mod:`lightning_autodp.mechanism.randomness`). Eight words per coordinate.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
#: "expand 32-byte k" as four little-endian words (RFC 8439, section 2.3)
CONSTANTS = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)
KEY_BYTES = 32
#: words per block, words per noise coordinate
BLOCK_WORDS = 16
WORDS_PER_COORDINATE = 8
#: coordinates generated per batch of blocks on the CPU and on accelerators: bounds the generator's
#: extra memory (eight int64 words of state per coordinate and a few temporaries of that size, a
#: few hundred bytes per coordinate) while keeping kernels large enough to amortise their launch
DEFAULT_CHUNK = 1 << 15
DEVICE_CHUNK = 1 << 21
_UNIT = 2.0**-53


def key_words(key: bytes) -> list[int]:
    """The eight little-endian 32-bit words of a 32-byte key."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"a ChaCha20 key has {KEY_BYTES} bytes, got {len(key)}.")
    return [int.from_bytes(key[4 * i : 4 * i + 4], "little") for i in range(8)]


def _rotl_(x: Tensor, r: int, tmp: Tensor) -> None:
    """``x`` rotated left by ``r`` bits in place (``x`` holds 32-bit values; ``tmp`` is scratch)."""
    torch.bitwise_right_shift(x, 32 - r, out=tmp)
    x.bitwise_left_shift_(r).bitwise_or_(tmp).bitwise_and_(MASK32)


def _quarter_round_(a: Tensor, b: Tensor, c: Tensor, d: Tensor, tmp: Tensor) -> None:
    """RFC 8439 section 2.1, in place, on rows of words (one quarter round per column)."""
    a.add_(b).bitwise_and_(MASK32)
    d.bitwise_xor_(a)
    _rotl_(d, 16, tmp)
    c.add_(d).bitwise_and_(MASK32)
    b.bitwise_xor_(c)
    _rotl_(b, 12, tmp)
    a.add_(b).bitwise_and_(MASK32)
    d.bitwise_xor_(a)
    _rotl_(d, 8, tmp)
    c.add_(d).bitwise_and_(MASK32)
    b.bitwise_xor_(c)
    _rotl_(b, 7, tmp)


def chacha20_blocks(state: Tensor) -> Tensor:
    """The ChaCha20 block function (RFC 8439, section 2.3) on a ``(16, n)`` int64 state: ``(16, n)`` words.

    Twenty rounds: ten of (four column quarter rounds, four diagonal quarter rounds), then the
    input state added word-wise. Rows 0-3, 4-7, 8-11, 12-15 of the 4x4 matrix are ``a, b, c, d``;
    a column round is one quarter round on ``(a[i], b[i], c[i], d[i])`` for every column ``i``, and
    a diagonal round the same after rotating ``b, c, d`` left by 1, 2, 3 columns (and back after).
    The operations run in place on one working copy (the cost is memory traffic, not arithmetic).
    """
    if state.dtype != torch.int64 or state.dim() != 2 or state.shape[0] != BLOCK_WORDS:
        raise ValueError(f"state must be int64 of shape (16, n), got {state.dtype} {tuple(state.shape)}.")
    x = state.clone()
    a, b, c, d = x.view(4, 4, -1).unbind(0)
    tmp = torch.empty_like(a)
    for _ in range(10):
        _quarter_round_(a, b, c, d, tmp)
        b_, c_, d_ = b.roll(-1, 0), c.roll(-2, 0), d.roll(-3, 0)
        _quarter_round_(a, b_, c_, d_, tmp)
        b.copy_(b_.roll(1, 0))
        c.copy_(c_.roll(2, 0))
        d.copy_(d_.roll(3, 0))
    return x.add_(state).bitwise_and_(MASK32)


def initial_state(key: bytes, counters: Tensor, nonce: tuple[int, int, int]) -> Tensor:
    """The ``(16, n)`` RFC 8439 input states: constants, key, one block counter per column, nonce."""
    n = counters.numel()
    fixed = torch.tensor([*CONSTANTS, *key_words(key)], dtype=torch.int64, device=counters.device)
    rows = [fixed[:, None].expand(12, n), counters.view(1, n) & MASK32]
    rows.append(torch.tensor(nonce, dtype=torch.int64, device=counters.device)[:, None].expand(3, n))
    return torch.cat(rows)


class ChaChaStream:
    """The ChaCha20 key stream of one key, as 32-bit words, block after block (64-bit block counter).

    Args:
        key: 32 secret bytes (a fresh one from :func:`os.urandom` per optimizer step and rank).

    Every call to :meth:`words` continues where the previous one stopped, on whatever device it is
    computed: no block is used twice.
    """

    def __init__(self, key: bytes) -> None:
        self._key = bytes(key)
        key_words(self._key)  # validates the length
        self.blocks_used = 0

    def words(self, count: int, device: torch.device | str = "cpu") -> Tensor:
        """The next ``count`` words of the stream (int64 in ``[0, 2**32)``), computed on ``device``.

        Whole blocks are generated; the unused rest of the last block is dropped, so the next call
        starts with a fresh block.
        """
        blocks = math.ceil(count / BLOCK_WORDS)
        counters = torch.arange(self.blocks_used, self.blocks_used + blocks, dtype=torch.int64, device=device)
        self.blocks_used += blocks
        state = initial_state(self._key, counters, (0, 0, 0))
        state[13] = counters >> 32  # the counter's high word (64-bit counter, original ChaCha layout)
        return chacha20_blocks(state).t().reshape(-1)[:count]


def uniforms_from_words(words: Tensor) -> Tensor:
    r"""Uniforms in :math:`(0, 1]` on the 53-bit grid, float64: one from each pair of words."""
    pairs = words.view(-1, 2)
    mantissa = (pairs[:, 0] << 21) | (pairs[:, 1] >> 11)  # the top 53 of the 64 bits
    return (mantissa.to(torch.float64) + 1.0) * _UNIT


def box_muller(u: Tensor) -> Tensor:
    """Normals from an even number of uniforms in (0, 1]: the first half are radii, the second angles."""
    u1, u2 = u.view(2, -1)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = (2.0 * math.pi) * u2
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])


class ChaChaGaussian:
    r"""Standard normals with the floating-point mitigation, from one ChaCha20 key, on any device.

    Args:
        key: 32 secret bytes; ``None`` draws them from :func:`os.urandom`.
        chunk: coordinates generated at a time (bounds the extra memory); default
            :data:`DEFAULT_CHUNK` on the CPU, :data:`DEVICE_CHUNK` on accelerators.

    :meth:`standard_normal` returns :math:`(z_1 + z_2 + z_3 + z_4) / 2` per coordinate, float64, on
    the requested device; successive calls continue the stream (never reuse a block).
    """

    def __init__(self, key: bytes | None = None, chunk: int | None = None) -> None:
        self._stream = ChaChaStream(os.urandom(KEY_BYTES) if key is None else key)
        self._chunk = chunk

    def standard_normal(
        self, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu"
    ) -> Tensor:
        """N(0, I) of ``shape``, float64, on ``device``: (z1 + z2 + z3 + z4) / 2 per coordinate."""
        device = torch.device(device)
        chunk = self._chunk or (DEFAULT_CHUNK if device.type == "cpu" else DEVICE_CHUNK)
        n = math.prod(shape)
        out = torch.empty(n, dtype=torch.float64, device=device)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            words = self._stream.words(WORDS_PER_COORDINATE * m, device)
            # 4m normals: rows 0-1 the cosine halves, rows 2-3 the sine halves of 2m Box-Muller pairs
            out[start : start + m] = box_muller(uniforms_from_words(words)).view(4, m).sum(0) / 2.0
        return out.view(shape)
