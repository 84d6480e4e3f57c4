"""Gaussian noise for DP-SGD that never touches the process-global RNG.

One :class:`NoiseSource` serves one optimizer step on one rank; it draws ``N(0, std²)`` tensors
in the dtype of the sum they are added to (float32 or float64; half types are drawn in float32
and rounded), so the noise never sits on a coarser grid than the sum ("Noise is drawn in the
precision of the sum", The DP-SGD contract, docs/usage.md). Two kinds:

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

Secure normals, value by value (the floating-point-attack mitigation). Floating-point samplers
do not produce every representable value, and not with the right probabilities: a naive sample
added to a sum leaves traces of the sum in the low-order bits of the result (Mironov 2012; for
Gaussian samplers Holohan & Braghin 2021). Three measures:

1. each returned value is the normalised sum of :data:`_SECURE_DRAWS` = 4 independent Box-Muller
   normals (both outputs of two pairs) divided by ``sqrt(4) = 2`` (the same std): the rounding
   patterns of the four draws smear out, so the low-order bits of the result are close to uniform
   instead of tracking the grid of one sampler (the mitigation opacus uses);
2. the noise is computed in the precision of the sum it is added to (float64 sums get float64
   noise with 52 random bits per uniform, float32 ones float32 noise);
3. the Box-Muller radius ``sqrt(-2 ln u)`` is computed in float64 from a 52-bit uniform for
   every output dtype, so each component follows the Gaussian out to 8.5 σ (a float32 uniform,
   as in torch's own ``normal_``, stops at about 5.7 σ); the angle uses as many random bits as
   the output's mantissa.

Uniforms are built exactly from keystream bits: a word's low 23 (float32) or 52 (float64) bits
become the mantissa of a float in ``[1, 2)``; ``2 - x`` (exact) lies in ``(0, 1]`` for the radius,
``x - 1`` in ``[0, 1)`` for the angle ``2π(x - 1)``.
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
#: Output values per chunk when the transform runs on the CPU: the keystream and work buffers
#: (~2-3 MiB) stay in cache; measured faster than 2**18 and 2**20 on one core.
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

# output dtype -> (integer word of the same width, mantissa bits, bit pattern of 1.0)
_WORDS = {
    torch.float32: (torch.int32, 23, 0x3F800000),
    torch.float64: (torch.int64, 52, 0x3FF0000000000000),
}


def _fresh_key() -> bytes:
    """A new AES-256 key from the OS CSPRNG (one per secure noise source). Never kept anywhere
    but in the cipher context; tests replace this function to check that reused keys are caught."""
    return os.urandom(_KEY_BYTES)


def _bytes_per_value(dtype: torch.dtype) -> int:
    """Keystream bytes per output value: ``_PAIRS`` float64 radius uniforms and ``_PAIRS`` angle
    uniforms of the output's width."""
    return _PAIRS * (8 + torch.finfo(dtype).bits // 8)


def _unit_interval_(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """In place: random integer words -> floats in ``[1, 2)`` whose mantissa is the words' low
    bits (23 for float32, 52 for float64); returns the float view of the same memory."""
    _, bits, one = _WORDS[dtype]
    return words.bitwise_and_((1 << bits) - 1).bitwise_or_(one).view(dtype)


def normals_from_keystream(raw: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Turn ``_bytes_per_value(out.dtype) * out.numel()`` random bytes into standard normals in
    ``out`` (1-D float32/float64, same device as ``raw``). ``raw`` is consumed (overwritten)."""
    dtype, m = out.dtype, out.numel()
    radius_bytes = _PAIRS * m * 8
    # radius sqrt(-2 ln u), u = 2 - x in (0, 1] with 52 random bits, always in float64
    radius = _unit_interval_(raw[:radius_bytes].view(torch.int64), torch.float64).view(_PAIRS, m)
    radius.neg_().add_(2.0).log_().mul_(-2.0).sqrt_()
    if dtype != torch.float64:
        radius = radius.to(dtype)
    angle_words = raw[radius_bytes : _bytes_per_value(dtype) * m].view(_WORDS[dtype][0])
    angle = _unit_interval_(angle_words, dtype).view(_PAIRS, m)
    angle.sub_(1.0).mul_(2.0 * math.pi)
    cosine = torch.cos(angle).mul_(radius)
    sine = angle.sin_().mul_(radius)
    torch.add(cosine[0], sine[0], out=out)
    for p in range(1, _PAIRS):
        out.add_(cosine[p]).add_(sine[p])
    return out.mul_(1.0 / math.sqrt(_SECURE_DRAWS))


class SecureNormalStream:
    """Standard normals from one AES-256-CTR keystream under a fresh key from ``os.urandom``.

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
        self._zeros = b""
        self._cpu_raw: torch.Tensor | None = None
        self._staging: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []

    def __reduce__(self):
        raise TypeError("a secure noise stream holds a secret key and cannot be pickled")

    def __repr__(self) -> str:
        return "SecureNormalStream(AES-256-CTR, key from os.urandom, not shown)"

    def _keystream_into(self, buffer: torch.Tensor, nbytes: int) -> None:
        """Write the next ``nbytes`` keystream bytes into ``buffer`` (a CPU uint8 tensor with at
        least ``nbytes + _SLACK`` elements)."""
        if not self._zeros:
            self._zeros = bytes(_KEYSTREAM_PIECE)
        zeros, target = memoryview(self._zeros), buffer.numpy()
        for start in range(0, nbytes, _KEYSTREAM_PIECE):
            size = min(_KEYSTREAM_PIECE, nbytes - start)
            self._encryptor.update_into(zeros[:size], target[start:])

    def _raw_buffer(self, nbytes: int) -> torch.Tensor:
        if self._cpu_raw is None or self._cpu_raw.numel() < nbytes + _SLACK:
            self._cpu_raw = torch.empty(nbytes + _SLACK, dtype=torch.uint8)
        return self._cpu_raw

    def standard_normal(
        self, numel: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """A 1-D tensor of ``numel`` standard normals of ``dtype`` (float32 or float64) on
        ``device``."""
        if dtype not in _WORDS:
            raise ValueError(f"secure normals are drawn in float32 or float64, not {dtype}")
        device = torch.device(device)
        if device.type == "cuda":
            return self._standard_normal_cuda(numel, dtype, device)
        out = torch.empty(numel, dtype=dtype)
        per_value = _bytes_per_value(dtype)
        raw = self._raw_buffer(_CPU_CHUNK * per_value)
        for start in range(0, numel, _CPU_CHUNK):
            m = min(_CPU_CHUNK, numel - start)
            self._keystream_into(raw, m * per_value)
            normals_from_keystream(raw[: m * per_value], out[start : start + m])
        return out if device.type == "cpu" else out.to(device)

    def _standard_normal_cuda(
        self, numel: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Keystream in pinned host buffers (two, alternating), copied asynchronously to the GPU,
        where the transform runs; the CPU fills one buffer while the GPU works on the other."""
        out = torch.empty(numel, dtype=dtype, device=device)
        per_value = _bytes_per_value(dtype)
        chunk_bytes = _CUDA_CHUNK * per_value
        if not self._staging or self._staging[0][0].numel() < chunk_bytes + _SLACK:
            self._staging = [
                (torch.empty(chunk_bytes + _SLACK, dtype=torch.uint8, pin_memory=True), None)
                for _ in range(2)
            ]
        stream = torch.cuda.current_stream(device)
        for i, start in enumerate(range(0, numel, _CUDA_CHUNK)):
            m = min(_CUDA_CHUNK, numel - start)
            host, copied = self._staging[i % 2]
            if copied is not None:
                copied.synchronize()  # its previous copy to the GPU has finished
            self._keystream_into(host, m * per_value)
            raw = host[: m * per_value].to(device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
            self._staging[i % 2] = (host, event)
            normals_from_keystream(raw, out[start : start + m])
        return out


class NoiseSource:
    """Draws ``N(0, std²)`` tensors for one optimizer step on one rank.

    Seeded: a generator seeded from ``(seed, "noise", tp_rank, step)``. Secure: a
    :class:`SecureNormalStream` under a fresh key (``seed`` must then be None; ``tp_rank`` and
    ``step`` are not needed, every source is independent of every other).
    """

    def __init__(self, *, seed: int | None, tp_rank: int, step: int, secure: bool) -> None:
        if not secure and seed is None:
            raise ValueError("a seeded noise source needs a seed (or use secure mode)")
        self.secure = secure
        self._seed = None if secure else derive_seed(seed, "noise", tp_rank, step)
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
        """Noise of the given shape, std and dtype on ``device``, drawn in ``dtype`` (half types:
        drawn in float32, then rounded). Seeded float32 draws are the same stream as ever."""
        if not dtype.is_floating_point:
            raise ValueError(f"noise must be floating point, got {dtype}")
        device = torch.device(device)
        draw_dtype = dtype if dtype in _WORDS else torch.float32
        if self._stream is not None:
            out = self._stream.standard_normal(math.prod(shape), draw_dtype, device)
            return out.view(shape).mul_(std).to(dtype)
        out = torch.empty(shape, dtype=draw_dtype, device=device)
        return out.normal_(0.0, std, generator=self._generator(device)).to(dtype)
