"""Gaussian noise for DP-SGD that never touches the process-global RNG.

One :class:`NoiseSource` serves one optimizer step on one rank; it draws ``N(0, std²)`` tensors
in the dtype of the sum they are added to, so the noise never sits on a coarser grid than the sum
(The DP-SGD contract, docs/usage.md: noise is drawn in the precision of the sum). Two kinds:

- **seeded** (default): a fresh ``torch.Generator`` per optimizer step, seeded from
  ``(noise_seed, tp_rank, step)``. Each TP rank gets its own stream (sharded noise is independent
  across shards), the stream of a step never repeats, and resuming from a checkpoint at step k
  continues with exactly the draws an uninterrupted run would have made.
- **secure**: an AES-256-CTR keystream (OpenSSL, through the ``cryptography`` package) under a
  fresh 32-byte key from ``os.urandom`` per source, i.e. per (optimizer step, rank). The key lives
  only inside the OpenSSL cipher context of that source: it is never stored, logged, pickled or
  shared, so neither a checkpoint nor another rank can reproduce the noise, and two sources (two
  steps, two TP shards) are independent. The keystream is turned into normals by vectorised
  torch code, in chunks of :data:`_CPU_CHUNK` values on the CPU (work buffers stay in cache; no
  full-size temporary host buffers). With a CUDA device the raw keystream goes through pinned,
  double-buffered host memory to the GPU asynchronously and the transform runs there.

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
#: Output values per chunk when the transform runs on a CUDA device (fewer, larger copies).
_CUDA_CHUNK = 1 << 20
#: Largest piece of keystream produced by one OpenSSL call (the all-zero plaintext it encrypts).
_KEYSTREAM_PIECE = 1 << 20
#: Secret key length (AES-256).
_KEY_BYTES = 32
#: CTR nonce/initial counter block. A constant is safe because every key encrypts one stream.
_INITIAL_COUNTER = bytes(16)
#: Extra bytes at the end of a keystream buffer (older ``cryptography`` releases want
#: ``len(data) + block_size - 1`` bytes in ``update_into``).
_SLACK = 16
_ZEROS = bytes(_KEYSTREAM_PIECE)  # the plaintext: AES-CTR of zeros is the keystream itself
_MANTISSA_MASK = (1 << 52) - 1
_ONE_BITS = 0x3FF0000000000000  # float64 1.0


def _fresh_key() -> bytes:
    """A new AES-256 key from the OS CSPRNG (one per secure noise source). Never kept anywhere
    but in the cipher context; tests replace this function to check that reused keys are caught."""
    return os.urandom(_KEY_BYTES)


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
    """Gaussian noise from one AES-256-CTR keystream under a fresh key from ``os.urandom``.

    Successive calls consume successive keystream bytes, so no two draws of a stream share
    randomness, and two streams (fresh keys) are independent. Not picklable: the key must not
    leave the process.
    """

    def __init__(self) -> None:
        key = _fresh_key()
        if len(key) != _KEY_BYTES:
            raise ValueError(f"secure noise keys must be {_KEY_BYTES} bytes")
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(_INITIAL_COUNTER)).encryptor()
        del key
        self._cpu_raw: torch.Tensor | None = None
        self._staging: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []

    def __reduce__(self):
        raise TypeError("a secure noise stream holds a secret key and cannot be pickled")

    def __repr__(self) -> str:
        return "SecureNormalStream(AES-256-CTR, key from os.urandom, not shown)"

    def _keystream_into(self, buffer: torch.Tensor, nbytes: int) -> None:
        """Write the next ``nbytes`` keystream bytes into ``buffer`` (a CPU uint8 tensor with at
        least ``nbytes + _SLACK`` elements)."""
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
        if device.type == "cuda":
            return self._normal_cuda(numel, std, dtype, device)
        out = torch.empty(numel, dtype=dtype)
        raw = self._raw_buffer(min(numel, _CPU_CHUNK) * _BYTES_PER_VALUE)
        for start in range(0, numel, _CPU_CHUNK):
            m = min(_CPU_CHUNK, numel - start)
            self._keystream_into(raw, m * _BYTES_PER_VALUE)
            normals_from_keystream(raw, out[start : start + m], std)
        return out if device.type == "cpu" else out.to(device)

    def _normal_cuda(
        self, numel: int, std: float, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Keystream in pinned host buffers (two, alternating), copied asynchronously to the GPU,
        where the transform runs; the CPU fills one buffer while the GPU works on the other."""
        out = torch.empty(numel, dtype=dtype, device=device)
        chunk_bytes = _CUDA_CHUNK * _BYTES_PER_VALUE
        if not self._staging or self._staging[0][0].numel() < chunk_bytes + _SLACK:
            self._staging = [
                (torch.empty(chunk_bytes + _SLACK, dtype=torch.uint8, pin_memory=True), None)
                for _ in range(2)
            ]
        with torch.cuda.device(out.device):
            stream = torch.cuda.current_stream()
            for i, start in enumerate(range(0, numel, _CUDA_CHUNK)):
                m = min(_CUDA_CHUNK, numel - start)
                host, copied = self._staging[i % 2]
                if copied is not None:
                    copied.synchronize()  # its previous copy to the GPU has finished
                self._keystream_into(host, m * _BYTES_PER_VALUE)
                raw = host[: m * _BYTES_PER_VALUE].to(out.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
                self._staging[i % 2] = (host, event)
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
