"""The ChaCha20 stream cipher of RFC 8439 in torch integer ops, on whatever device the tensors are.

Secure mode makes its noise keystream with this where the noise is for a CUDA tensor, so the
keystream never touches the host (hf_dp_tp/noise.py). The computation is RFC 8439 ChaCha20 word for
word: a 16-word state (the constants ``"expand 32-byte k"``, the 256-bit key, a 32-bit block
counter and a 96-bit nonce), 20 rounds (10 column + diagonal double rounds of the quarter round
``a += b; d ^= a; d <<<= 16; c += d; b ^= c; b <<<= 12; a += b; d ^= a; d <<<= 8; c += d;
b ^= c; b <<<= 7``), the input state added to the result, and the 16 words serialised
little-endian: 64 keystream bytes per block.

Vectorised over blocks: the state of ``n`` blocks is an int32 tensor ``[4, 4, n]`` (row, column,
block), so one quarter-round step is a handful of in-place ops on ``[4, n]`` rows (the four
column quarter rounds at once); the diagonal round reads rows 1-3 shifted by 1-3 columns through
doubled row buffers (``[8, n]``: the shifted row is a view, two row copies per double round and
row keep the halves in step). int32 addition wraps modulo ``2**32`` (two's complement), left
shifts drop the high bits, and right shifts are made logical with a mask, so rotations are exact;
the test against ``cryptography``'s (OpenSSL's) ChaCha20 pins this bit for bit
(tests/test_chacha.py), on CPU tensors in CI and on CUDA tensors against the CPU where there is a
GPU. Measured on one CPU core: int32 with masked shifts beats int64 with ``& 0xFFFFFFFF`` masking
(half the memory traffic, the same number of ops).

Counter rules. :func:`chacha20_keystream` is RFC 8439 ChaCha20 (32-bit counter, 12-byte nonce)
and refuses to run its 32-bit counter past ``2**32`` blocks (256 GiB). :class:`ChaCha20Stream`,
for one key that encrypts one stream, uses the first nonce word as the high half of a 64-bit block
counter (words 12-13 of the state, as in the original ChaCha and as OpenSSL carries its counter);
the other two nonce words are 0. So a stream's blocks are ``(key, nonce, counter)`` triples that
never repeat for ``2**64`` blocks, which it refuses to go beyond; each call starts at the next
unused block (a partly used last block is discarded, never reused).
"""

from __future__ import annotations

import sys

import torch

__all__ = ["ChaCha20Stream", "chacha20_keystream"]

#: RFC 8439 §2.3: the words of "expand 32-byte k", little-endian.
_CONSTANTS = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)
KEY_BYTES = 32
NONCE_BYTES = 12
BLOCK_BYTES = 64
_WORD = 1 << 32
_DOUBLE_ROUNDS = 10
#: (shift, row updated, row added into it, row xored into it) of the four quarter-round steps,
#: rows a=0, b=1, c=2, d=3: ``x[add_to] += x[src]; x[dst] ^= x[add_to]; x[dst] <<<= shift``.
_STEPS = ((16, 0, 1, 3), (12, 2, 3, 1), (8, 0, 1, 3), (7, 2, 3, 1))


def _signed(word: int) -> int:
    """A 32-bit word as the int32 with the same bits."""
    return word - _WORD if word >= 1 << 31 else word


def _words(data: bytes) -> list[int]:
    """Little-endian 32-bit words of ``data`` (a multiple of 4 bytes), as int32 values."""
    return [_signed(int.from_bytes(data[i : i + 4], "little")) for i in range(0, len(data), 4)]


def _rotate_left(row: torch.Tensor, shift: int, tmp: torch.Tensor) -> None:
    """``row <<<= shift`` on 32-bit words held in int32, in place (``tmp``: a buffer like row)."""
    torch.bitwise_right_shift(row, 32 - shift, out=tmp)  # arithmetic: sign bits on top ...
    tmp.bitwise_and_((1 << shift) - 1)  # ... masked off: the logical shift
    row.bitwise_left_shift_(shift).bitwise_or_(tmp)


def _quarter_rounds(a, b, c, d, tmp) -> None:
    """Four quarter rounds at once: column ``j`` of rows ``a, b, c, d`` (each ``[4, n]``)."""
    rows = (a, b, c, d)
    for shift, add_to, src, dst in _STEPS:
        rows[add_to].add_(rows[src])
        rows[dst].bitwise_xor_(rows[add_to])
        _rotate_left(rows[dst], shift, tmp)


def _blocks(
    key_words: torch.Tensor, counters: torch.Tensor, nonce_tail: tuple[int, int]
) -> torch.Tensor:
    """Keystream blocks ``[n, 16]`` (int32 words) for the 64-bit block counters ``counters``
    (int64, on the device of the computation; low half in state word 12, high half in word 13),
    state words 14-15 ``nonce_tail`` and ``key_words`` (8 int32 on that device)."""
    n, device = counters.numel(), counters.device
    initial = torch.empty(16, n, dtype=torch.int32, device=device)
    for i, word in enumerate(_CONSTANTS):
        initial[i].fill_(_signed(word))  # scalars: no host-to-device copy, no synchronisation
    initial[4:12] = key_words[:, None]
    initial[12] = counters.bitwise_and(_WORD - 1).to(torch.int32)  # bits as int32 (wraps)
    initial[13] = counters.bitwise_right_shift(32).to(torch.int32)
    initial[14].fill_(nonce_tail[0])
    initial[15].fill_(nonce_tail[1])
    init = initial.view(4, 4, n)
    # Row a as is; rows b, c, d doubled: columns j and j + 4 hold the same word, so the diagonal
    # round's view (column j of row r is word (j + r) % 4) is the slice [r : r + 4].
    a = init[0].clone()
    doubled = [torch.cat([init[r], init[r]]) for r in (1, 2, 3)]
    tmp = torch.empty_like(a)
    for _ in range(_DOUBLE_ROUNDS):
        _quarter_rounds(a, *(row[:4] for row in doubled), tmp)
        for r, row in enumerate(doubled, start=1):
            row[4 : 4 + r] = row[:r]  # columns 0..r-1 changed: refresh their copies
        _quarter_rounds(a, *(row[r : r + 4] for r, row in enumerate(doubled, start=1)), tmp)
        for r, row in enumerate(doubled, start=1):
            row[:r] = row[4 : 4 + r]  # columns 0..r-1 now live in the copies
    state = torch.cat([a[None], *(row[None, :4] for row in doubled)]).view(16, n)
    return state.add_(initial).t()


def _as_bytes(blocks: torch.Tensor) -> torch.Tensor:
    """``[n, 16]`` int32 words → ``64 n`` bytes, each word little-endian."""
    if sys.byteorder != "little":  # torch's views use native order
        raise RuntimeError("the torch ChaCha20 keystream needs a little-endian host")
    return blocks.contiguous().view(torch.uint8).view(-1)


def _counters(first: int, n: int, device: torch.device) -> torch.Tensor:
    """The 64-bit block counters ``first, first + 1, ...`` (``n`` of them, below ``2**64``) as
    int64 with the same bits."""
    signed = first - (1 << 64) if first >= 1 << 63 else first
    return torch.arange(n, dtype=torch.int64, device=device).add_(signed)


def _check(key: bytes, nonce: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError(f"ChaCha20 keys are {KEY_BYTES} bytes, got {len(key)}")
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"ChaCha20 nonces are {NONCE_BYTES} bytes, got {len(nonce)}")


def chacha20_keystream(
    key: bytes, nonce: bytes, counter: int, nbytes: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The first ``nbytes`` keystream bytes of RFC 8439 ChaCha20 from block ``counter`` on:
    a uint8 tensor on ``device``. The XOR with a plaintext is the cipher (§2.4).

    Raises:
        ValueError: on a key other than 32 bytes, a nonce other than 12 bytes, ``nbytes < 0``,
            or blocks beyond the 32-bit counter (``counter + ceil(nbytes / 64) > 2**32``).
    """
    _check(key, nonce)
    n_blocks = -(-nbytes // BLOCK_BYTES)
    if nbytes < 0 or not 0 <= counter or counter + n_blocks > _WORD:
        raise ValueError(
            f"ChaCha20's 32-bit block counter covers blocks 0 .. 2**32 - 1: counter {counter}, "
            f"{n_blocks} blocks requested"
        )
    device = torch.device(device)
    nonce_words = _words(nonce)
    high = nonce_words[0] % _WORD  # nonce word 0 is state word 13: the counter's high half
    counters = _counters(counter | high << 32, n_blocks, device)
    key_words = torch.tensor(_words(key), dtype=torch.int32).to(device)
    return _as_bytes(_blocks(key_words, counters, (nonce_words[1], nonce_words[2])))[:nbytes]


class ChaCha20Stream:
    """One ChaCha20 keystream under one key, consumed in order on any device.

    Nonce ``0`` with a 64-bit block counter (state words 12-13; the first nonce word is the
    counter's high half): with a key used for this one stream only, no ``(key, nonce, counter)``
    block repeats for ``2**64`` blocks, and the stream refuses to go past them. Not picklable and
    the key not shown: the key words live in this object (and its per-device copies) only.
    """

    def __init__(self, key: bytes) -> None:
        _check(key, bytes(NONCE_BYTES))
        self._key_words = {torch.device("cpu"): torch.tensor(_words(key), dtype=torch.int32)}
        self._next_block = 0

    def __reduce__(self):
        raise TypeError("a ChaCha20 stream holds a secret key and cannot be pickled")

    def __repr__(self) -> str:
        return f"ChaCha20Stream(key not shown, next block {self._next_block})"

    @property
    def next_block(self) -> int:
        """Index of the first block the next call will use."""
        return self._next_block

    def next_bytes(self, nbytes: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The next ``nbytes`` keystream bytes, computed on ``device`` (uint8 tensor there).
        Starts at a block boundary; the rest of a partly used last block is discarded."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        n_blocks = -(-nbytes // BLOCK_BYTES)
        if nbytes < 0 or self._next_block + n_blocks > _WORD * _WORD:
            raise ValueError("a ChaCha20 stream covers 2**64 blocks; this request goes past them")
        if device not in self._key_words:
            self._key_words[device] = self._key_words[torch.device("cpu")].to(device)
        counters = _counters(self._next_block, n_blocks, device)
        self._next_block += n_blocks
        return _as_bytes(_blocks(self._key_words[device], counters, (0, 0)))[:nbytes]
