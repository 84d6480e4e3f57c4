"""Gaussian noise for DP-SGD that never touches the process-global RNG.

One :class:`NoiseSource` serves one optimizer step on one rank; it draws ``N(0, std²)`` tensors
in the dtype of the sum they are added to, so the noise never sits on a coarser grid than the sum
(The DP-SGD contract, docs/usage.md: noise is drawn in the precision of the sum). Two kinds:

- **seeded** (default): a fresh ``torch.Generator`` per optimizer step, seeded from
  ``(noise_seed, tp_rank, step)``. Each TP rank gets its own stream (sharded noise is independent
  across shards), the stream of a step never repeats, and resuming from a checkpoint at step k
  continues with exactly the draws an uninterrupted run would have made.
- **secure**: a stream-cipher keystream under a fresh 32-byte key from ``os.urandom`` per source,
  i.e. per (optimizer step, rank), and per cipher (drawn on first use). Which cipher depends on
  where the noise goes:

  * noise for a **CUDA** tensor: **ChaCha20** as in RFC 8439, computed on that device by torch
    integer ops (hf_dp_tp/chacha.py): no host keystream, no host-to-device copies. Nonce 0; the
    block counter runs over state words 12-13 (64 bits: RFC 8439's 32-bit counter extended into
    the first nonce word, which OpenSSL's ChaCha20 also does), so a stream's ``(key, nonce,
    counter)`` blocks never repeat; it refuses to go past ``2**64`` blocks (a 32-bit counter alone
    would stop at 256 GiB = 8.6e9 values, less than one step of a 70 B-parameter model);
  * all other noise: **AES-256-CTR** made by OpenSSL on one CPU core (through the
    ``cryptography`` package; AES-NI makes it about 5x faster there than the torch ChaCha20, see
    bench/noise_throughput.py), counter block 0 upwards (one stream per key).

  The key lives only inside the cipher's state of that source (the OpenSSL context; the ChaCha20
  stream's key words on the CPU and the device): it is never stored, logged, pickled or shared, so
  neither a checkpoint nor another rank can reproduce the noise, and two sources (two steps, two
  TP shards) are independent. The keystream is turned into normals by vectorised torch code
  (:func:`normals_from_keystream`, the same transform for both ciphers), in chunks of
  :data:`_CPU_CHUNK` values on the CPU (work buffers stay in cache; no full-size temporary host
  buffers) and :data:`_CUDA_CHUNK` on a GPU. tests/test_chacha.py pins the torch ChaCha20 bit for
  bit to ``cryptography``'s (RFC 8439 test vectors, several counters, the carry into word 13,
  lengths that are not whole blocks) and, with a GPU, the CUDA keystream to the CPU one.

Secure normals, value by value (the floating-point-attack mitigation). A floating-point sampler
does not produce every representable value: added to a sum, a value it cannot produce as noise
tells the sum apart (Mironov 2012; Jin et al. 2021 for Gaussian samplers). Holohan & Braghin
(2021) fill those gaps by summing several samples, which opacus's secure mode does. Here:

1. each value is the sum of :data:`_SECURE_DRAWS` = 4 independent Box-Muller normals (both
   outputs of two pairs), times ``std / sqrt(4)``, all computed in float64 from 52-bit uniforms
   (each component follows the Gaussian out to 8.5 σ; a 24-bit uniform would stop at 5.8 σ);
2. the result is rounded **once** to the dtype of the sum it is added to: float32 (or bfloat16)
   noise is a correctly rounded float64 sample, as dense as that dtype allows and with uniform
   low-order mantissa bits; float64 noise keeps its float64 variety (the four-sample sum makes
   its support dense; its lowest few bits favour 0 where the four draws cancel);
3. the dtype is the sum's own (The DP-SGD contract, docs/usage.md): float32 noise on a float64 sum
   would leave the sum readable modulo the float32 grid.

Uniforms are built exactly from keystream bits: a 64-bit word's low 52 bits become the mantissa
of a float64 ``x`` in ``[1, 2)``; ``2 - x`` (exact) lies in ``(0, 1]`` for the radius
``sqrt(-2 ln u)``, ``x - 1`` in ``[0, 1)`` for the angle ``2π(x - 1)``.
"""

from __future__ import annotations

import math
import os

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .chacha import ChaCha20Stream
from .randomness import derive_seed

__all__ = ["NoiseSource", "SecureNormalStream"]

#: Box-Muller normals summed per secure output value (an even number: both outputs of a pair).
_SECURE_DRAWS = 4
_PAIRS = _SECURE_DRAWS // 2
#: Keystream bytes per output value: one 64-bit word per uniform, two uniforms per pair.
_BYTES_PER_VALUE = 8 * _SECURE_DRAWS
#: Output values per chunk when the transform runs on the CPU: the keystream and work buffers
#: (~4 MiB) stay in cache; measured faster than 2**18 and 2**20 values on one core.
_CPU_CHUNK = 1 << 16
#: Output values per chunk on a CUDA device (keystream and transform there; ~200 MiB of work
#: buffers at 2**20 values).
_CUDA_CHUNK = 1 << 20
#: Largest piece of keystream produced by one OpenSSL call (the all-zero plaintext it encrypts).
_KEYSTREAM_PIECE = 1 << 20
#: Secret key length (AES-256 and ChaCha20 both take 32 bytes).
_KEY_BYTES = 32
#: CTR nonce/initial counter block. A constant is safe because every key encrypts one stream.
_INITIAL_COUNTER = bytes(16)
#: Extra bytes at the end of a keystream buffer (older ``cryptography`` releases want
#: ``len(data) + block_size - 1`` bytes in ``update_into``).
_SLACK = 16
_ZEROS = bytes(_KEYSTREAM_PIECE)  # the plaintext: AES-CTR of zeros is the keystream itself
_MANTISSA_MASK = (1 << 52) - 1
_ONE_BITS = 0x3FF0000000000000  # float64 1.0
_CIPHERS = ("auto", "aes-ctr", "chacha20")


def _fresh_key() -> bytes:
    """A new 32-byte key from the OS CSPRNG (one per secure noise source and cipher). Never kept
    anywhere but in the cipher's state; tests replace this function to check that reused keys are
    caught."""
    return os.urandom(_KEY_BYTES)


def _checked(key: bytes) -> bytes:
    if len(key) != _KEY_BYTES:
        raise ValueError(f"secure noise keys must be {_KEY_BYTES} bytes")
    return key


def normals_from_keystream(raw: torch.Tensor, out: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    """Turn ``_BYTES_PER_VALUE * out.numel()`` random bytes (a uint8 tensor on ``out``'s device,
    consumed) into ``N(0, std²)`` values, computed in float64 and rounded once into ``out``."""
    m = out.numel()
    words = raw[: _BYTES_PER_VALUE * m].view(torch.int64)
    uniform = words.bitwise_and_(_MANTISSA_MASK).bitwise_or_(_ONE_BITS).view(torch.float64)
    radius, angle = uniform.view(2, _PAIRS, m).unbind(0)  # floats in [1, 2)
    radius.neg_().add_(2.0).log_().mul_(-2.0).sqrt_()  # u = 2 - x in (0, 1]
    angle.sub_(1.0).mul_(2.0 * math.pi)
    cosine = torch.cos(angle).mul_(radius)
    sine = angle.sin_().mul_(radius)
    total = cosine[0].add_(sine[0])
    for p in range(1, _PAIRS):
        total.add_(cosine[p]).add_(sine[p])
    return out.copy_(total.mul_(std / math.sqrt(_SECURE_DRAWS)))


class SecureNormalStream:
    """Gaussian noise from a stream cipher's keystream under fresh keys from ``os.urandom``.

    ``cipher="auto"`` (what :class:`NoiseSource` uses): draws for a CUDA device come from a
    ChaCha20 keystream computed on that device (hf_dp_tp/chacha.py), all other draws from an
    AES-256-CTR keystream made by OpenSSL on the CPU. ``"aes-ctr"`` or ``"chacha20"`` pins one
    cipher for every device (the benchmark and the tests use this). Each cipher gets its own key,
    drawn when it is first used. Successive calls consume successive keystream bytes, so no two
    draws of a stream share randomness, and two streams (fresh keys) are independent. Not
    picklable: the keys must not leave the process.
    """

    def __init__(self, cipher: str = "auto") -> None:
        if cipher not in _CIPHERS:
            raise ValueError(f"cipher must be one of {_CIPHERS}, got {cipher!r}")
        self._cipher = cipher
        self._encryptor = None  # AES-256-CTR context (key inside OpenSSL), made on first use
        self._chacha: ChaCha20Stream | None = None  # made on first use
        self._cpu_raw: torch.Tensor | None = None

    def __reduce__(self):
        raise TypeError("a secure noise stream holds a secret key and cannot be pickled")

    def __repr__(self) -> str:
        return f"SecureNormalStream({self._cipher}, keys from os.urandom, not shown)"

    def _keystream_into(self, buffer: torch.Tensor, nbytes: int) -> None:
        """Write the next ``nbytes`` AES-CTR keystream bytes into ``buffer`` (a CPU uint8 tensor
        with at least ``nbytes + _SLACK`` elements)."""
        if self._encryptor is None:
            key = _checked(_fresh_key())
            self._encryptor = Cipher(algorithms.AES(key), modes.CTR(_INITIAL_COUNTER)).encryptor()
            del key
        zeros, target = memoryview(_ZEROS), buffer.numpy()
        for start in range(0, nbytes, _KEYSTREAM_PIECE):
            size = min(_KEYSTREAM_PIECE, nbytes - start)
            self._encryptor.update_into(zeros[:size], target[start:])

    def _raw_buffer(self, nbytes: int) -> torch.Tensor:
        """A reusable CPU keystream buffer of at least ``nbytes`` (+ slack), grown geometrically
        up to one chunk."""
        have = 0 if self._cpu_raw is None else self._cpu_raw.numel() - _SLACK
        if have < nbytes:
            size = min(max(nbytes, 2 * have), _CPU_CHUNK * _BYTES_PER_VALUE)
            self._cpu_raw = torch.empty(size + _SLACK, dtype=torch.uint8)
        return self._cpu_raw

    def normal(
        self,
        numel: int,
        std: float = 1.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """A 1-D tensor of ``numel`` draws of ``N(0, std²)`` on ``device``, computed in float64 and
        rounded once to ``dtype`` (any floating dtype)."""
        if not dtype.is_floating_point:
            raise ValueError(f"noise must be floating point, got {dtype}")
        device = torch.device(device)
        use_chacha = self._cipher == "chacha20" or (
            self._cipher == "auto" and device.type == "cuda"
        )
        if use_chacha:
            return self._normal_chacha(numel, std, dtype, device)
        out = torch.empty(numel, dtype=dtype)
        raw = self._raw_buffer(min(numel, _CPU_CHUNK) * _BYTES_PER_VALUE)
        for start in range(0, numel, _CPU_CHUNK):
            m = min(_CPU_CHUNK, numel - start)
            self._keystream_into(raw, m * _BYTES_PER_VALUE)
            normals_from_keystream(raw, out[start : start + m], std)
        return out if device.type == "cpu" else out.to(device)

    def _normal_chacha(
        self, numel: int, std: float, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Keystream and transform both on ``device``, chunk by chunk: each chunk of ``m`` values
        is ``normals_from_keystream`` of the stream's next ``32 m`` bytes (from a block boundary;
        chunks are whole blocks, so one call's chunks use one contiguous piece of keystream)."""
        if self._chacha is None:
            self._chacha = ChaCha20Stream(_checked(_fresh_key()))
        out = torch.empty(numel, dtype=dtype, device=device)
        chunk = _CUDA_CHUNK if device.type == "cuda" else _CPU_CHUNK
        for start in range(0, numel, chunk):
            m = min(chunk, numel - start)
            raw = self._chacha.next_bytes(m * _BYTES_PER_VALUE, out.device)
            normals_from_keystream(raw, out[start : start + m], std)
        return out


class NoiseSource:
    """Draws ``N(0, std²)`` tensors for one optimizer step on one rank.

    Seeded: a generator seeded from ``(seed, "noise", tp_rank, step)``, or, for the owner of an
    FSDP shard (``dp_rank`` given), from ``(seed, "shard noise", dp_rank, tp_rank, step)``: one
    stream per shard owner. Secure: a :class:`SecureNormalStream` under a fresh key (``seed``
    must then be None; the ranks and ``step`` are not needed, every source is independent of
    every other).
    """

    def __init__(
        self,
        *,
        seed: int | None,
        tp_rank: int,
        step: int,
        secure: bool,
        dp_rank: int | None = None,
    ) -> None:
        if not secure and seed is None:
            raise ValueError("a seeded noise source needs a seed (or use secure mode)")
        self.secure = secure
        if secure:
            self._seed = None
        elif dp_rank is None:
            self._seed = derive_seed(seed, "noise", tp_rank, step)
        else:
            self._seed = derive_seed(seed, "shard noise", dp_rank, tp_rank, step)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._stream = SecureNormalStream() if secure else None

    def __reduce__(self):
        raise TypeError("a noise source holds the secret of its noise and cannot be pickled")

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed)
            self._generators[device] = gen
        return self._generators[device]

    def normal(
        self,
        shape: tuple[int, ...],
        std: float,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Noise of the given shape, std and dtype on ``device``. Secure: computed in float64 and
        rounded once to ``dtype``. Seeded: drawn in ``dtype`` (half types: in float32, then
        rounded); the float32 stream is the one seeded runs always drew."""
        if not dtype.is_floating_point:
            raise ValueError(f"noise must be floating point, got {dtype}")
        device = torch.device(device)
        if self._stream is not None:
            return self._stream.normal(math.prod(shape), std, dtype, device).view(shape)
        draw_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        out = torch.empty(shape, dtype=draw_dtype, device=device)
        return out.normal_(0.0, std, generator=self._generator(device)).to(dtype)
