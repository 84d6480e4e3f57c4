"""The torch ChaCha20 of secure mode (hf_dp_tp/chacha.py, hf_dp_tp/noise.py) against RFC 8439.

- Bit for bit: the RFC 8439 test vectors (§2.3.2 block, §2.4.2 encryption, Appendix A.1 keystream)
  and ``cryptography``'s (OpenSSL's) ChaCha20 for random keys and nonces, several counters
  (0, 1, 7, 1000, 2**32 - 3), lengths that are not whole blocks, and the counter carry into the
  first nonce word that the 64-bit stream counter relies on. CPU tensors (CI); with a GPU the
  CUDA keystream equals the CPU one.
- Counter rules: a stream's calls take consecutive fresh blocks, never one twice; the 32-bit RFC
  counter and the 64-bit stream counter refuse to wrap.
- Secure noise from ChaCha20: the same four-draw transform as the AES path
  (``normals_from_keystream`` of the keystream bytes, exactly), Gaussian with std σ·C, fresh keys
  per stream, not picklable; ``cipher="auto"`` keeps AES-CTR on the CPU.
"""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from hf_dp_tp import noise
from hf_dp_tp.chacha import ChaCha20Stream, chacha20_keystream
from hf_dp_tp.noise import SecureNormalStream, normals_from_keystream
from tests.test_noise_source import STD, check_gaussian, check_independent

RFC_KEY = bytes(range(32))
#: RFC 8439 §2.3.2: key 00..1f, nonce 00:00:00:09:00:00:00:4a:00:00:00:00, counter 1.
RFC_232_BLOCK = bytes.fromhex(
    "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
    "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"
)
#: RFC 8439 §2.4.2: key 00..1f, nonce 00:00:00:00:00:00:00:4a:00:00:00:00, counter 1.
RFC_242_PLAINTEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the "
    b"future, sunscreen would be it."
)
RFC_242_CIPHERTEXT = bytes.fromhex(
    "6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0b"
    "f91b65c5524733ab8f593dabcd62b3571639d624e65152ab8f530c359f0861d8"
    "07ca0dbf500d6a6156a38e088a22b65e52bc514d16ccf806818ce91ab7793736"
    "5af90bbf74a35be6b40b8eedf2785e42874d"
)
#: RFC 8439 Appendix A.1, test vector #1: all-zero key and nonce, counter 0.
RFC_A1_BLOCK = bytes.fromhex(
    "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
    "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
)


def reference(key: bytes, nonce: bytes, counter: int, nbytes: int) -> bytes:
    """``cryptography``'s ChaCha20 keystream: its 16-byte nonce is the 4-byte little-endian
    initial counter followed by the RFC 8439 12-byte nonce."""
    full_nonce = counter.to_bytes(4, "little") + nonce
    return Cipher(algorithms.ChaCha20(key, full_nonce), mode=None).encryptor().update(bytes(nbytes))


def as_bytes(t: torch.Tensor) -> bytes:
    assert t.dtype == torch.uint8
    return t.cpu().numpy().tobytes()


# ---------------------------------------------------------------------------- bit for bit


def test_rfc8439_vectors():
    nonce = bytes.fromhex("000000090000004a00000000")
    assert as_bytes(chacha20_keystream(RFC_KEY, nonce, 1, 64)) == RFC_232_BLOCK
    nonce = bytes.fromhex("000000000000004a00000000")
    stream = chacha20_keystream(RFC_KEY, nonce, 1, len(RFC_242_PLAINTEXT))
    ciphertext = bytes(a ^ b for a, b in zip(RFC_242_PLAINTEXT, as_bytes(stream), strict=True))
    assert ciphertext == RFC_242_CIPHERTEXT
    assert as_bytes(chacha20_keystream(bytes(32), bytes(12), 0, 64)) == RFC_A1_BLOCK
    # the reference agrees with the RFC too, so the comparisons below pin RFC 8439
    assert reference(RFC_KEY, bytes.fromhex("000000090000004a00000000"), 1, 64) == RFC_232_BLOCK


@pytest.mark.parametrize("counter", [0, 1, 7, 1000, 2**32 - 3])
def test_keystream_matches_cryptography(counter):
    for nbytes in (0, 1, 63, 64, 65, 200, 64 * 37 + 5):
        key, nonce = os.urandom(32), os.urandom(12)
        if counter + -(-nbytes // 64) > 2**32:
            continue
        ours = as_bytes(chacha20_keystream(key, nonce, counter, nbytes))
        assert ours == reference(key, nonce, counter, nbytes), (counter, nbytes)


def test_stream_is_rfc_chacha20_with_a_64_bit_counter():
    """The stream: nonce 0, blocks in order from 0, each call from a fresh block; past block
    2**32 - 1 the counter carries into the first nonce word, as OpenSSL's counter does."""
    key = os.urandom(32)
    stream = ChaCha20Stream(key)
    first, second = stream.next_bytes(100), stream.next_bytes(64)  # 100 bytes use 2 blocks
    assert as_bytes(first) == reference(key, bytes(12), 0, 100)
    assert as_bytes(second) == reference(key, bytes(12), 0, 192)[128:]
    assert stream.next_block == 3

    stream._next_block = 2**32 - 2
    carried = as_bytes(stream.next_bytes(5 * 64 - 7))
    assert carried == reference(key, bytes(12), 2**32 - 2, 5 * 64 - 7)  # OpenSSL carries too
    next_nonce = (1).to_bytes(4, "little") + bytes(8)
    assert carried[128:] == reference(key, next_nonce, 0, 3 * 64 - 7)
    assert stream.next_block == 2**32 + 3


def test_counters_refuse_to_wrap():
    key = os.urandom(32)
    with pytest.raises(ValueError, match="32-bit block counter"):
        chacha20_keystream(key, bytes(12), 2**32 - 1, 65)
    assert len(as_bytes(chacha20_keystream(key, bytes(12), 2**32 - 1, 64))) == 64
    stream = ChaCha20Stream(key)
    stream._next_block = 2**64 - 1
    with pytest.raises(ValueError, match="2\\*\\*64 blocks"):
        stream.next_bytes(65)
    last = as_bytes(stream.next_bytes(64))  # block 2**64 - 1: both counter words all ones
    assert last == reference(key, b"\xff" * 4 + bytes(8), 2**32 - 1, 64)
    with pytest.raises(ValueError, match="32 bytes"):
        ChaCha20Stream(bytes(16))
    with pytest.raises(ValueError, match="12 bytes"):
        chacha20_keystream(key, bytes(16), 0, 64)


# ---------------------------------------------------------------------------- secure noise


def test_chacha_noise_is_the_aes_transform_of_its_keystream(monkeypatch):
    """Same key, same bytes: each chunk of ChaCha20 noise is ``normals_from_keystream`` (the
    AES path's transform) of the next keystream bytes, exactly; chunks of 1000 values take 500
    whole blocks each, so the chunks' bytes are one contiguous keystream."""
    key = b"\x05" * 32
    monkeypatch.setattr(noise, "_fresh_key", lambda: key)
    monkeypatch.setattr(noise, "_CPU_CHUNK", 1000)
    sizes = (1000, 1000, 333)
    n = sum(sizes)
    raw = chacha20_keystream(key, bytes(12), 0, 32 * n)
    for dtype in (torch.float32, torch.float64):
        got = SecureNormalStream("chacha20").normal(n, STD, dtype, "cpu")
        want = torch.empty(n, dtype=dtype)
        for start, part in zip((0, 1000, 2000), want.split(sizes), strict=True):
            normals_from_keystream(raw[32 * start :].clone(), part, STD)
        assert torch.equal(got, want), dtype


def test_chacha_noise_is_gaussian_and_keys_are_fresh():
    x = SecureNormalStream("chacha20").normal(1_000_000, STD, torch.float64, "cpu")
    check_gaussian(x, STD)
    a = SecureNormalStream("chacha20").normal(200_000, STD, torch.float32, "cpu")
    check_independent(a, SecureNormalStream("chacha20").normal(200_000, STD, torch.float32, "cpu"))
    one = SecureNormalStream("chacha20")  # one stream never repeats itself
    check_independent(one.normal(100_000, 1.0), one.normal(100_000, 1.0))


def test_mutation_reused_chacha_key_is_caught(monkeypatch):
    monkeypatch.setattr(noise, "_fresh_key", lambda: b"\x07" * 32)
    a = SecureNormalStream("chacha20").normal(10_000, STD)
    with pytest.raises(AssertionError):
        check_independent(a, SecureNormalStream("chacha20").normal(10_000, STD))


def test_auto_keeps_aes_on_the_cpu_and_one_key_per_cipher(monkeypatch):
    keys = []

    def fresh():
        keys.append(os.urandom(32))
        return keys[-1]

    monkeypatch.setattr(noise, "_fresh_key", fresh)
    stream = SecureNormalStream()
    stream.normal(10, 1.0)
    stream.normal(10, 1.0)
    assert stream._chacha is None and stream._encryptor is not None and len(keys) == 1
    with pytest.raises(ValueError, match="cipher"):
        SecureNormalStream("rc4")


def test_chacha_streams_refuse_pickling_and_hide_the_key():
    key = os.urandom(32)
    stream = ChaCha20Stream(key)
    stream.next_bytes(64)
    secure = SecureNormalStream("chacha20")
    secure.normal(10, 1.0)
    for obj in (stream, secure):
        with pytest.raises(TypeError, match="pickle"):
            pickle.dumps(obj)
        assert "not shown" in repr(obj)
    assert key.hex() not in repr(stream)


# ---------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_keystream_equals_cpu_keystream():
    key = os.urandom(32)
    for counter, nbytes in ((0, 64 * 100_003 + 9), (2**32 - 5, 64 * 11 - 1)):
        nonce = os.urandom(4) + bytes(8)
        on_gpu = chacha20_keystream(key, nonce, counter, nbytes, "cuda")
        assert on_gpu.device.type == "cuda"
        assert torch.equal(on_gpu.cpu(), chacha20_keystream(key, nonce, counter, nbytes, "cpu"))
    gpu, cpu = ChaCha20Stream(key), ChaCha20Stream(key)
    gpu._next_block = cpu._next_block = 2**32 - 3
    assert torch.equal(gpu.next_bytes(64 * 7, "cuda").cpu(), cpu.next_bytes(64 * 7))
