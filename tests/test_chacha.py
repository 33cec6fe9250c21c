"""Secure-mode noise: ChaCha20 in tensor ops against RFC 8439 and a second implementation, its normals
against a scalar reference, their distribution, and one fresh OS key per step."""

from __future__ import annotations

import math
import os

import pytest
import torch
from scipy import stats

from lightning_autodp.mechanism import chacha
from lightning_autodp.mechanism.chacha import (
    ChaChaGaussian,
    ChaChaStream,
    chacha20_blocks,
    initial_state,
)
from lightning_autodp.mechanism.noise import NoiseSource

RFC_KEY = bytes(range(32))  # 00:01:02:...:1f, RFC 8439 sections 2.3.2 and 2.4.2
FIXED_KEY = bytes.fromhex("c0ffee" * 10 + "00ff")


# ------------------------------------------------------------------ an independent scalar ChaCha20


def _scalar_block(key: bytes, counter: int, nonce: tuple[int, int, int]) -> list[int]:
    """ChaCha20 block function on Python ints, written from RFC 8439 sections 2.1-2.3."""

    def rotl(v: int, c: int) -> int:
        return ((v << c) & 0xFFFFFFFF) | (v >> (32 - c))

    def qr(s: list[int], a: int, b: int, c: int, d: int) -> None:
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF
        s[d] = rotl(s[d] ^ s[a], 16)
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF
        s[b] = rotl(s[b] ^ s[c], 12)
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF
        s[d] = rotl(s[d] ^ s[a], 8)
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF
        s[b] = rotl(s[b] ^ s[c], 7)

    init = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574]
    init += [int.from_bytes(key[i : i + 4], "little") for i in range(0, 32, 4)]
    init += [counter, *nonce]
    s = list(init)
    for _ in range(10):
        qr(s, 0, 4, 8, 12), qr(s, 1, 5, 9, 13), qr(s, 2, 6, 10, 14), qr(s, 3, 7, 11, 15)
        qr(s, 0, 5, 10, 15), qr(s, 1, 6, 11, 12), qr(s, 2, 7, 8, 13), qr(s, 3, 4, 9, 14)
    return [(x + y) & 0xFFFFFFFF for x, y in zip(s, init)]


def _scalar_stream_words(key: bytes, first_block: int, blocks: int) -> list[int]:
    """The stream's layout: a 64-bit block counter in words 12-13, words 14-15 zero."""
    out: list[int] = []
    for block in range(first_block, first_block + blocks):
        out += _scalar_block(key, block & 0xFFFFFFFF, (block >> 32, 0, 0))
    return out


def _reference_normals(key: bytes, n: int, chunk: int) -> list[float]:
    """ChaChaGaussian's coordinates with math.log/cos/sin: per chunk of m coordinates, 8m words (whole
    blocks), pairs of words -> 53-bit uniforms, the first 2m radii, the next 2m angles, and coordinate j
    the half-sum of the cosine and sine normals of radius-angle pairs j and m + j."""
    out: list[float] = []
    block = 0
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        blocks = math.ceil(8 * m / 16)
        words = _scalar_stream_words(key, block, blocks)[: 8 * m]
        block += blocks
        u = [(((words[2 * i] << 21) | (words[2 * i + 1] >> 11)) + 1) * 2.0**-53 for i in range(4 * m)]
        radius = [math.sqrt(-2.0 * math.log(v)) for v in u[: 2 * m]]
        angle = [2.0 * math.pi * v for v in u[2 * m :]]
        cos = [r * math.cos(a) for r, a in zip(radius, angle)]
        sin = [r * math.sin(a) for r, a in zip(radius, angle)]
        out += [(cos[j] + cos[m + j] + sin[j] + sin[m + j]) / 2.0 for j in range(m)]
    return out


# ------------------------------------------------------------------ RFC 8439


def test_quarter_round_rfc8439_section_2_1_1():
    a, b, c, d = (torch.tensor([v]) for v in (0x11111111, 0x01020304, 0x9B8D6F43, 0x01234567))
    chacha._quarter_round_(a, b, c, d, torch.empty(1, dtype=torch.int64))
    assert [a.item(), b.item(), c.item(), d.item()] == [0xEA2A92F4, 0xCB1CF8CE, 0x4581472E, 0x5881C4BB]


def test_block_function_rfc8439_section_2_3_2():
    # key 00..1f, nonce 00:00:00:09:00:00:00:4a:00:00:00:00, block counter 1
    state = initial_state(RFC_KEY, torch.tensor([1]), (0x09000000, 0x4A000000, 0x00000000))
    expected = [
        0xE4E7F110, 0x15593BD1, 0x1FDD0F50, 0xC47120A3,
        0xC7F4D1C7, 0x0368C033, 0x9AAA2204, 0x4E6CD4C3,
        0x466482D2, 0x09AA9F07, 0x05D7C214, 0xA2028BD9,
        0xD19C12B5, 0xB94E16DE, 0xE883D0CB, 0x4E3C50A2,
    ]  # fmt: skip
    assert chacha20_blocks(state)[:, 0].tolist() == expected
    assert _scalar_block(RFC_KEY, 1, (0x09000000, 0x4A000000, 0)) == expected  # the reference too


def test_stream_matches_a_second_implementation_across_the_counter_word():
    """The cryptography package (OpenSSL) as a second reference; blocks 2**32 - 2 .. 2**32 + 1 cross
    from word 12 into word 13 of the 64-bit counter."""
    ciphers = pytest.importorskip("cryptography.hazmat.primitives.ciphers")
    key = os.urandom(32)

    def openssl_block(counter: int, nonce_word: int) -> list[int]:
        nonce = counter.to_bytes(4, "little") + nonce_word.to_bytes(4, "little") + bytes(8)
        data = (
            ciphers.Cipher(ciphers.algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(64))
        )
        return [int.from_bytes(data[i : i + 4], "little") for i in range(0, 64, 4)]

    stream = ChaChaStream(key)
    assert stream.words(16 * 5).tolist() == sum((openssl_block(c, 0) for c in range(5)), [])
    stream.blocks_used = 2**32 - 2
    expected = (
        openssl_block(2**32 - 2, 0) + openssl_block(2**32 - 1, 0) + openssl_block(0, 1) + openssl_block(1, 1)
    )
    assert stream.words(64).tolist() == expected
    assert _scalar_stream_words(key, 2**32 - 2, 4) == expected
    assert stream.words(3).tolist() == openssl_block(2, 1)[:3]  # continues with a fresh block


# ------------------------------------------------------------------ the normals


@pytest.mark.parametrize(("n", "chunk"), [(64, 64), (37, 8)])
def test_normals_match_the_scalar_reference(n, chunk):
    z = ChaChaGaussian(FIXED_KEY, chunk=chunk).standard_normal((n,))
    assert torch.allclose(
        z, torch.tensor(_reference_normals(FIXED_KEY, n, chunk), dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_floating_point_mitigation_removed_is_caught(monkeypatch):
    """Mutation: one normal per coordinate (same N(0, 1) law, no mitigation) must fail the reference test."""
    original = chacha.box_muller

    def single_draw(u):
        z = original(u).view(4, -1)
        return torch.cat([2 * z[0], torch.zeros_like(z[1:]).flatten()])

    monkeypatch.setattr(chacha, "box_muller", single_draw)
    z = ChaChaGaussian(FIXED_KEY, chunk=64).standard_normal((64,))
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3  # the law alone cannot tell
    reference = torch.tensor(_reference_normals(FIXED_KEY, 64, 64), dtype=torch.float64)
    assert not torch.allclose(z, reference, rtol=0, atol=1e-12)


def _distribution_checks(z: torch.Tensor) -> None:
    n = z.numel()
    x = z.numpy()
    se = 1 / math.sqrt(n)
    assert abs(x.mean()) < 5 * se
    assert abs(x.var() - 1) < 5 * math.sqrt(2) * se
    assert abs(stats.skew(x)) < 5 * math.sqrt(6) * se
    assert abs(stats.kurtosis(x)) < 5 * math.sqrt(24) * se
    assert stats.kstest(x, "norm").pvalue > 1e-3


def test_normals_have_the_normal_law():
    _distribution_checks(ChaChaGaussian(FIXED_KEY).standard_normal((1 << 17,)))


def test_a_biased_box_muller_is_caught(monkeypatch):
    """Mutation: the angle drawn from the radius's uniform; moments and KS must reject it."""

    original = chacha.box_muller

    def same_uniform(u):
        u1, _ = u.view(2, -1)
        return original(torch.cat([u1, u1]))

    monkeypatch.setattr(chacha, "box_muller", same_uniform)
    with pytest.raises(AssertionError):
        _distribution_checks(ChaChaGaussian(FIXED_KEY).standard_normal((1 << 17,)))


def test_stream_words_are_uniform_bytes():
    words = ChaChaStream(FIXED_KEY).words(1 << 16)
    as_bytes = torch.cat([(words >> s) & 0xFF for s in (0, 8, 16, 24)])
    counts = torch.bincount(as_bytes, minlength=256).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3
    assert int(words.min()) >= 0 and int(words.max()) < 2**32


# ------------------------------------------------------------------ keys: one fresh OS key per step


def test_one_fresh_os_key_per_step_and_none_reused(monkeypatch):
    calls: list[int] = []
    real = os.urandom

    def counting_urandom(n: int) -> bytes:
        calls.append(n)
        return real(n)

    monkeypatch.setattr(chacha.os, "urandom", counting_urandom)
    source = NoiseSource(seed=0, secure_mode=True)
    like = torch.empty(1000)
    draws = []
    for step in range(3):
        source.start_step(step)
        draws += [source.gaussian(1.0, like), source.gaussian(1.0, like)]  # two tensors in one step
    assert calls == [32, 32, 32]
    flat = torch.stack(draws)
    assert len({tuple(row[:4].tolist()) for row in flat}) == 6  # no tensor repeats another's noise
    # the sample std of n normals has standard error 1/sqrt(2n): six of them bound a false failure by 1e-8
    assert abs(flat.std().item() - 1) < 6 / math.sqrt(2 * flat.numel())


def test_noise_is_the_keyed_stream(monkeypatch):
    """The noise of a step is std times ChaChaGaussian(key) (float32): a fixed key reproduces it."""
    monkeypatch.setattr(chacha.os, "urandom", lambda n: FIXED_KEY)
    source = NoiseSource(seed=0, secure_mode=True)
    source.start_step(5)
    noise = source.gaussian(2.0, torch.empty(3, 7))
    expected = (2.0 * ChaChaGaussian(FIXED_KEY).standard_normal((3, 7))).float()
    assert torch.equal(noise, expected)


@pytest.mark.cuda
def test_device_stream_equals_the_cpu_stream():
    key = os.urandom(32)
    cpu = ChaChaStream(key).words(1 << 12)
    gpu = ChaChaStream(key).words(1 << 12, device="cuda")
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
    z = ChaChaGaussian(key).standard_normal((1000,), device="cuda")
    assert torch.allclose(z.cpu(), ChaChaGaussian(key).standard_normal((1000,)), rtol=0, atol=1e-12)
    source = NoiseSource(seed=0, secure_mode=True)
    source.start_step(0)
    assert source.gaussian(1.0, torch.empty(10, device="cuda")).device.type == "cuda"
