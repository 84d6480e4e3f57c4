"""Gaussian noise for DP-SGD that never touches the process-global RNG.

Two sources:

- **seeded** (default): a fresh ``torch.Generator`` per optimizer step, seeded from
  ``(noise_seed, tp_rank, step)``. Each TP rank gets its own stream (sharded noise is independent
  across shards), the stream of a step never repeats, and resuming from a checkpoint at step k
  continues with exactly the draws an uninterrupted run would have made.
- **secure**: normals built from the operating system's CSPRNG (``os.urandom``) with Box-Muller in
  float64; each value is the sum of four such normals divided by two (same std), which smooths
  the low-order bits that floating-point attacks on Gaussian samplers exploit. Slower; meant for
  runs whose privacy claim must not rest on a seeded PRNG.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from .randomness import derive_seed

_SECURE_DRAWS = 4


def _urandom_uniform(count: int) -> np.ndarray:
    """``count`` float64 uniforms in (0, 1] with 53 random bits each, from ``os.urandom``."""
    bits = np.frombuffer(os.urandom(8 * count), dtype=np.uint64) >> np.uint64(11)
    return (bits.astype(np.float64) + 1.0) * 2.0**-53


def secure_standard_normal(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Unit normals from ``os.urandom``: each is the sum of ``_SECURE_DRAWS`` Box-Muller normals
    divided by ``sqrt(_SECURE_DRAWS)``."""
    numel = math.prod(shape)
    pairs = (_SECURE_DRAWS * numel + 1) // 2
    radius = np.sqrt(-2.0 * np.log(_urandom_uniform(pairs)))
    angle = 2.0 * np.pi * _urandom_uniform(pairs)
    normals = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
    summed = normals[: _SECURE_DRAWS * numel].reshape(_SECURE_DRAWS, numel).sum(0)
    unit = summed / math.sqrt(_SECURE_DRAWS)
    return torch.from_numpy(unit.reshape(shape)).to(device=device, dtype=torch.float32)


class NoiseSource:
    """Draws ``N(0, std²)`` tensors for one optimizer step on one rank."""

    def __init__(self, *, seed: int | None, tp_rank: int, step: int, secure: bool) -> None:
        if not secure and seed is None:
            raise ValueError("a seeded noise source needs a seed (or use secure mode)")
        self.secure = secure
        self._seed = None if secure else derive_seed(seed, "noise", tp_rank, step)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed)
            self._generators[device] = gen
        return self._generators[device]

    def normal(self, shape: tuple[int, ...], std: float, device: torch.device) -> torch.Tensor:
        """fp32 noise of the given shape and std on ``device``."""
        if self.secure:
            return secure_standard_normal(shape, device).mul_(std)
        out = torch.empty(shape, dtype=torch.float32, device=device)
        return out.normal_(0.0, std, generator=self._generator(device))
