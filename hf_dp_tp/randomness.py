"""Randomness primitives for DP-SGD that never touch process-global random state.

Every random draw in the package goes through this module, and nothing here reads or advances
``torch``'s default generator, ``random`` or ``numpy.random``'s global state:

- :func:`derive_seed` turns a tuple of labels (base seed, purpose, epoch, step, ...) into an
  independent 63-bit seed, so each draw can be recomputed from its coordinates alone (resume is
  exact, and ranks that know the same base seed draw the same values without communicating).
- :func:`agree_on_seed` / :func:`agree_on_key` make every rank of a process group hold the same
  base seed / secret key: the group's first rank draws it from ``os.urandom`` and broadcasts it.
- :func:`seeded_uniform` draws uniforms from a fresh, explicitly seeded ``torch.Generator``
  (reproducible, not cryptographically secure).
- :func:`secure_uniform` draws uniforms from a keyed PRF in counter mode, a BLAKE2b subkey per
  counter and an AES-256-CTR keystream (secure mode: without the key the draws cannot be predicted
  or reproduced).
"""

from __future__ import annotations

import hashlib
import numbers
import os
from collections.abc import Iterable

import numpy as np
import torch
import torch.distributed as dist
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .parallel.groups import collective_device

__all__ = [
    "KEY_BYTES",
    "agree_on_key",
    "agree_on_seed",
    "share_key",
    "share_seed",
    "derive_seed",
    "secure_uniform",
    "seeded_uniform",
]

#: Length of the secret keys drawn by :func:`agree_on_key`.
KEY_BYTES = 32
_MIN_KEY_BYTES = 16
_MAX_KEY_BYTES = 64  # BLAKE2b's key limit
_SEED_BITS = 63
_DERIVE_DOMAIN = b"hf_dp_tp.derive_seed.v1\x00"
_UNIFORM_PERSON = b"hf_dp_tp.unif.v2"  # BLAKE2b personalisation (<= 16 bytes): domain separation
_SUBKEY_BYTES = 32  # AES-256 subkey per counter
_PIECE_BYTES = 1 << 22  # keystream bytes per OpenSSL call
_SLACK_WORDS = 2  # older cryptography releases want 15 spare bytes in update_into's buffer
_ONE_BITS = 0x3FF0000000000000  # float64 1.0


def _encode_parts(parts: Iterable[int | str | bytes]) -> bytes:
    """Injective, self-delimiting encoding of a sequence of ints, strings and byte strings.

    Layout: number of parts (8 bytes), then per part a type tag, an 8-byte length and the payload
    (ints as minimal two's-complement big-endian, strings as UTF-8). Distinct sequences give
    distinct encodings, and no encoding is a proper prefix of another: ``(1, 23)``, ``(12, 3)``,
    ``("1",)``, ``(1,)`` and ``(b"\\x01",)`` all differ.
    """
    items = list(parts)
    chunks = [len(items).to_bytes(8, "big")]
    for part in items:
        if isinstance(part, str):
            tag, payload = b"s", part.encode("utf-8")
        elif isinstance(part, (bytes, bytearray, memoryview)):
            tag, payload = b"b", bytes(part)
        elif isinstance(part, numbers.Integral):
            value = int(part)
            payload = value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)
            tag = b"i"
        else:
            raise TypeError(
                f"seed/counter parts must be int, str or bytes, got {type(part).__name__}: {part!r}"
            )
        chunks += [tag, len(payload).to_bytes(8, "big"), payload]
    return b"".join(chunks)


def derive_seed(*parts: int | str | bytes) -> int:
    """Derive a deterministic 63-bit seed (``0 <= seed < 2**63``) from labelled parts.

    The seed is the first 63 bits of SHA-256 over an unambiguous encoding of ``parts``, so it
    depends on the parts *and their boundaries and types*: ``derive_seed(1, 23)``,
    ``derive_seed(12, 3)`` and ``derive_seed("123")`` are unrelated. The same parts give the
    same seed in every process, on every platform and Python version.

    Raises:
        TypeError: if a part is not an int, str or bytes.
    """
    digest = hashlib.sha256(_DERIVE_DOMAIN + _encode_parts(parts)).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - _SEED_BITS)


def _check_group_member(group: dist.ProcessGroup | None) -> None:
    if group is not None and dist.get_rank(group) < 0:
        raise ValueError(
            "this rank is not a member of the given process group; every rank passed to "
            "agree_on_seed/agree_on_key must belong to the group"
        )


def _group_source(group: dist.ProcessGroup | None) -> int:
    """Global rank of the first rank of ``group`` (0 for the default group)."""
    return 0 if group is None else dist.get_global_rank(group, 0)


def _broadcast_bytes(data: bytes | None, length: int, group: dist.ProcessGroup | None) -> bytes:
    """Broadcast ``length`` bytes (meaningful on the group's first rank only) to every rank.

    A plain tensor broadcast (not ``broadcast_object_list``, which was seen to leave gloo in a
    state that aborts the process at interpreter exit).
    """
    buffer = torch.zeros(length, dtype=torch.uint8, device=collective_device(group))
    if data is not None:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, src=_group_source(group), group=group)
    return bytes(buffer.cpu().tolist())


def _is_first_rank(group: dist.ProcessGroup | None) -> bool:
    return dist.get_rank(group) == 0


def agree_on_seed(seed: int | None, group: dist.ProcessGroup | None = None) -> int:
    """Return a base seed that is identical on every rank of ``group``.

    - ``seed`` given: returned unchanged, without communication (every rank is expected to pass
      the same value).
    - ``seed is None`` and ``torch.distributed`` initialised: **a collective** over ``group``
      (the default group if ``None``): its first rank draws 63 bits from ``os.urandom`` and
      broadcasts them; every rank of the group must call this.
    - ``seed is None`` and not distributed: 63 fresh bits from ``os.urandom``.

    Raises:
        ValueError: if ``seed`` is not an int, or this rank is not in ``group``.
    """
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an int or None, got {type(seed).__name__}: {seed!r}")
        return seed
    return share_seed(None, group)


def share_seed(seed_on_first_rank: int | None, group: dist.ProcessGroup | None = None) -> int:
    """The seed of ``group``'s first rank on every rank (a collective when distributed); where the
    first rank passes None it draws a fresh one from ``os.urandom``. Other ranks' arguments are
    ignored. Used when only the first rank can read a stored secret."""
    fresh = int.from_bytes(os.urandom(8), "big") >> (64 - _SEED_BITS)
    local = fresh if seed_on_first_rank is None else int(seed_on_first_rank)
    if not (dist.is_available() and dist.is_initialized()):
        return local
    _check_group_member(group)
    payload = local.to_bytes(8, "big") if _is_first_rank(group) else None
    return int.from_bytes(_broadcast_bytes(payload, 8, group), "big")


def share_key(key_on_first_rank: bytes | None, group: dist.ProcessGroup | None = None) -> bytes:
    """As :func:`share_seed`, for a :data:`KEY_BYTES`-byte secret key."""
    local = os.urandom(KEY_BYTES) if key_on_first_rank is None else _check_key(key_on_first_rank)
    if len(local) != KEY_BYTES:
        raise ValueError(f"a shared key must be {KEY_BYTES} bytes, got {len(local)}")
    if not (dist.is_available() and dist.is_initialized()):
        return local
    _check_group_member(group)
    payload = local if _is_first_rank(group) else None
    return _broadcast_bytes(payload, KEY_BYTES, group)


def _check_key(key: object) -> bytes:
    if not isinstance(key, (bytes, bytearray)):
        raise ValueError(f"secret key must be bytes, got {type(key).__name__}")
    if not _MIN_KEY_BYTES <= len(key) <= _MAX_KEY_BYTES:
        raise ValueError(
            f"secret key must be {_MIN_KEY_BYTES} to {_MAX_KEY_BYTES} bytes long "
            f"({KEY_BYTES} recommended), got {len(key)}"
        )
    return bytes(key)


def agree_on_key(key: bytes | None, group: dist.ProcessGroup | None = None) -> bytes:
    """Return a secret key (bytes) that is identical on every rank of ``group``.

    Same contract as :func:`agree_on_seed`: a given ``key`` is validated and returned unchanged;
    ``None`` makes the group's first rank draw :data:`KEY_BYTES` bytes from ``os.urandom`` and
    broadcast them (a collective when distributed), or draws locally when not distributed.

    Raises:
        ValueError: if ``key`` is not bytes of length 16 to 64, or this rank is not in ``group``.
    """
    if key is not None:
        return _check_key(key)
    return share_key(None, group)


def _check_count(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    return int(n)


def secure_uniform(n: int, key: bytes, counter: tuple[int, ...]) -> torch.Tensor:
    """``n`` float64 uniforms in ``[0, 1)`` from a keyed PRF in counter mode.

    The stream of ``counter`` is the AES-256-CTR keystream (OpenSSL, through ``cryptography``)
    under the subkey ``BLAKE2b-256(key=key, msg=encode(counter))``, split into little-endian
    64-bit words; uniform ``i`` has the low 52 bits of word ``i`` as its mantissa (multiples of
    ``2**-52``). So value ``i`` depends only on ``(key, counter, i)``: ``secure_uniform(m, k, c)``
    is a prefix of ``secure_uniform(n, k, c)`` for ``m <= n``, distinct counters give independent
    streams (distinct subkeys from a PRF), and without the key the output is computationally
    unpredictable. About 10 ns per value on one core (N = 10 M in ~0.1 s). Returns a CPU tensor of
    shape ``[n]``.

    Raises:
        ValueError: if ``n < 0`` or the key is not 16 to 64 bytes.
        TypeError: if a counter part is not an int, str or bytes.
    """
    n = _check_count(n)
    key = _check_key(key)
    if isinstance(counter, (str, bytes)) or not isinstance(counter, Iterable):
        raise TypeError(f"counter must be a tuple of ints, got {counter!r}")
    subkey = hashlib.blake2b(
        _encode_parts(counter), key=key, digest_size=_SUBKEY_BYTES, person=_UNIFORM_PERSON
    ).digest()
    encryptor = Cipher(algorithms.AES(subkey), modes.CTR(bytes(16))).encryptor()
    del subkey
    words = torch.empty(n + _SLACK_WORDS, dtype=torch.int64)
    target = words.numpy().view(np.uint8)
    zeros = memoryview(bytes(min(8 * n, _PIECE_BYTES)))
    for start in range(0, 8 * n, _PIECE_BYTES):
        size = min(_PIECE_BYTES, 8 * n - start)
        encryptor.update_into(zeros[:size], target[start:])
    values = words[:n]  # native byte order: little-endian on every platform torch supports
    values.bitwise_and_((1 << 52) - 1).bitwise_or_(_ONE_BITS)  # floats in [1, 2), in place
    return values.view(torch.float64).sub_(1.0)


def seeded_uniform(n: int, seed: int) -> torch.Tensor:
    """``n`` float64 uniforms in ``[0, 1)`` from a fresh CPU ``torch.Generator`` seeded with ``seed``.

    Deterministic in ``(n, seed)`` and independent of (and leaves untouched) torch's global
    generator. Not cryptographically secure: use :func:`secure_uniform` for secure mode.

    Raises:
        ValueError: if ``n < 0`` or ``seed`` is not an int.
    """
    n = _check_count(n)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int, got {type(seed).__name__}: {seed!r}")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    return torch.rand(n, generator=generator, dtype=torch.float64)


def reseed_global_rngs(group: dist.ProcessGroup | None = None) -> None:
    """Seed the process-global RNGs (``random``, numpy, torch on the CPU and every CUDA device)
    from a fresh ``os.urandom`` seed agreed by every rank of ``group`` (a collective when
    distributed: TP peers must keep drawing the same dropout masks). DP-SGD's own randomness
    never comes from these RNGs; this is for what does (dropout, collators): after it, their
    state no longer depends on how many values the sampled batches consumed. The seed is not
    kept or stored anywhere."""
    import random

    import numpy as np

    seed = share_seed(None, group)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also every CUDA device
