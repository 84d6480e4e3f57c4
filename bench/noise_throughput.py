"""Noise and Poisson-mask throughput: seeded vs secure, float32 vs float64, per CPU core (and per
GPU where there is one). Prints ONE JSON object on stdout.

Run from the repository root with plain Python::

    python bench/noise_throughput.py                      # defaults: 2**24 values, N = 10 M
    python bench/noise_throughput.py --numel 100000 --poisson_n 100000 --repeats 1  # quick

What is timed (median of ``--repeats`` runs after one warm-up, ``torch.set_num_threads(1)``):

- ``normals_per_s_per_core``: ``NoiseSource(...).normal((numel,), std, device, dtype=...)`` on
  the CPU for ``seeded`` (a seeded ``torch.Generator``) and ``secure`` (AES-256-CTR under a fresh
  ``os.urandom`` key, hf_dp_tp/noise.py), ``float32`` and ``float64``; a new source per run, as
  the optimizer makes one per step. ``secure_chacha_torch``: the same draw with the keystream
  from the torch ChaCha20 (hf_dp_tp/chacha.py, what secure mode uses on CUDA) on the CPU. ``legacy_secure`` is the implementation secure mode used
  before issue 13 (``os.urandom`` bytes, numpy Box-Muller in float64, four draws per value,
  copied into float32), kept here as the reference point; ``--no_legacy`` skips it.
- ``normals_per_s_cuda`` (only with a CUDA device): the same calls with ``device="cuda"``
  (synchronised), all threads of the process: ``secure`` makes its ChaCha20 keystream on the GPU;
  ``secure_aes_ctr_host`` is AES-CTR made on one CPU core and copied over.
  ``cuda_secure_over_seeded``: secure over seeded normals/s on the GPU.
- ``poisson_mask_s``: seconds for one secure (and one seeded) logical batch of a
  ``DistributedPoissonBatchSampler`` over ``--poisson_n`` records at rate ``--sample_rate``
  (``logical_batch``: uniforms, comparison, indices); ``legacy_secure`` uses the previous keyed
  BLAKE2b-per-64-bytes ``secure_uniform``.
- ``machine``: CPU, cores, versions (torch, cryptography, OpenSSL), the 1-minute load average
  before and after, ``other_processes_cpu_cores`` (the machine's busy CPU time during the bench
  minus this process's own, in cores: well above 0 means other work skewed the numbers) and
  ``torch_num_threads``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import busy_cpu_seconds, machine_info  # noqa: E402

from hf_dp_tp.noise import NoiseSource, SecureNormalStream  # noqa: E402
from hf_dp_tp.randomness import _encode_parts  # noqa: E402
from hf_dp_tp.sampling import DistributedPoissonBatchSampler  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64}
KEY = bytes(range(32))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=1 << 24, help="values per noise draw")
    p.add_argument("--legacy_numel", type=int, default=1 << 21, help="values per legacy draw")
    p.add_argument("--poisson_n", type=int, default=10_000_000, help="records N of the mask")
    p.add_argument("--sample_rate", type=float, default=0.001, help="Poisson rate q")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    p.add_argument("--no_legacy", action="store_true", help="skip the pre-issue-13 reference")
    p.add_argument("--no_cuda", action="store_true", help="skip the CUDA measurements")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- references
def legacy_secure_normal(numel: int) -> torch.Tensor:
    """Secure noise as drawn before issue 13: ``os.urandom`` bytes, numpy Box-Muller in float64,
    each value the sum of four normals over 2, then float32."""
    draws = 4

    def uniform(count: int) -> np.ndarray:
        bits = np.frombuffer(os.urandom(8 * count), dtype=np.uint64) >> np.uint64(11)
        return (bits.astype(np.float64) + 1.0) * 2.0**-53

    pairs = (draws * numel + 1) // 2
    radius = np.sqrt(-2.0 * np.log(uniform(pairs)))
    angle = 2.0 * np.pi * uniform(pairs)
    normals = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
    summed = normals[: draws * numel].reshape(draws, numel).sum(0) / math.sqrt(draws)
    return torch.from_numpy(summed).to(torch.float32)


def legacy_secure_uniform(n: int, key: bytes, counter: tuple[int, ...]) -> torch.Tensor:
    """The Poisson sampler's secure uniforms before issue 13: one keyed BLAKE2b-512 per 8 values."""
    base = hashlib.blake2b(key=key, digest_size=64, person=b"hf_dp_tp.unif.v1")
    base.update(_encode_parts(counter))
    blocks = []
    for j in range(-(-n // 8)):
        h = base.copy()
        h.update(j.to_bytes(8, "little"))
        blocks.append(h.digest())
    words = np.frombuffer(b"".join(blocks), dtype="<u8")[:n]
    return torch.from_numpy((words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)))


# ---------------------------------------------------------------------------- timing
def median_seconds(fn: Callable[[], object], repeats: int, sync: bool = False) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def noise_rates(numel: int, repeats: int, device: str) -> dict[str, dict[str, float]]:
    """Normals/s of ``seeded`` and ``secure`` noise sources (secure: the cipher secure mode picks
    for ``device``) and of the other cipher pinned on ``device`` (``secure_chacha_torch`` on the
    CPU, ``secure_aes_ctr_host`` on CUDA: the host keystream copied over)."""
    sync = device == "cuda"
    other = (
        ("secure_chacha_torch", "chacha20")
        if device == "cpu"
        else ("secure_aes_ctr_host", "aes-ctr")
    )
    rates: dict[str, dict[str, float]] = {}
    for kind, secure in (("seeded", False), ("secure", True), (other[0], None)):
        rates[kind] = {}
        for name, dtype in DTYPES.items():
            steps = iter(range(10**6))

            def draw(secure=secure, dtype=dtype, steps=steps):
                if secure is None:
                    return SecureNormalStream(other[1]).normal(numel, 1.0, dtype, device)
                seed = None if secure else 1234
                src = NoiseSource(seed=seed, tp_rank=0, step=next(steps), secure=secure)
                return src.normal((numel,), 1.0, device, dtype=dtype)

            rates[kind][name] = numel / median_seconds(draw, repeats, sync)
    return rates


def mask_seconds(n: int, q: float, repeats: int, legacy: bool) -> dict[str, float]:
    out = {}
    batches = iter(range(10**6))
    secure = DistributedPoissonBatchSampler(n, q, secure_mode=True, secure_key=KEY)
    out["secure"] = median_seconds(lambda: secure.logical_batch(0, next(batches)), repeats)
    seeded = DistributedPoissonBatchSampler(n, q, seed=1)
    out["seeded"] = median_seconds(lambda: seeded.logical_batch(0, next(batches)), repeats)
    if legacy:

        def legacy_mask():
            u = legacy_secure_uniform(n, KEY, (0, next(batches)))
            return torch.nonzero(u < q).flatten()

        out["legacy_secure"] = median_seconds(legacy_mask, repeats)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if min(args.numel, args.legacy_numel, args.poisson_n, args.repeats) < 1:
        raise SystemExit("--numel, --legacy_numel, --poisson_n and --repeats must be >= 1")
    torch.set_num_threads(1)
    load_start = os.getloadavg()[0]
    wall_start, busy_start = time.perf_counter(), busy_cpu_seconds()
    own = resource.getrusage(resource.RUSAGE_SELF)
    own_start = own.ru_utime + own.ru_stime

    per_core = noise_rates(args.numel, args.repeats, "cpu")
    if not args.no_legacy:
        legacy = args.legacy_numel / median_seconds(
            lambda: legacy_secure_normal(args.legacy_numel), args.repeats
        )
        per_core["legacy_secure"] = {"float32": legacy}
    masks = mask_seconds(args.poisson_n, args.sample_rate, args.repeats, not args.no_legacy)
    cuda = None
    if torch.cuda.is_available() and not args.no_cuda:
        cuda = noise_rates(args.numel, args.repeats, "cuda")

    wall = time.perf_counter() - wall_start
    own = resource.getrusage(resource.RUSAGE_SELF)
    own_cpu = own.ru_utime + own.ru_stime - own_start
    busy_end = busy_cpu_seconds()
    foreign = None
    if busy_start is not None and busy_end is not None:
        foreign = max(0.0, (busy_end - busy_start) - own_cpu) / wall
    try:
        from cryptography.hazmat.backends.openssl import backend

        openssl = backend.openssl_version_text()
    except Exception:  # informational only
        openssl = None
    result = {
        "config": {
            "numel": args.numel,
            "legacy_numel": args.legacy_numel,
            "poisson_n": args.poisson_n,
            "sample_rate": args.sample_rate,
            "repeats": args.repeats,
        },
        "machine": {
            **machine_info(),
            "cryptography_version": importlib.metadata.version("cryptography"),
            "openssl": openssl,
            "cuda_device": torch.cuda.get_device_name(0) if cuda is not None else None,
            "torch_num_threads": torch.get_num_threads(),
            "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]},
            "other_processes_cpu_cores": foreign,
            "wall_s": wall,
        },
        "normals_per_s_per_core": per_core,
        "secure_over_seeded": {
            name: per_core["secure"][name] / per_core["seeded"][name] for name in DTYPES
        },
        "normals_per_s_cuda": cuda,
        "cuda_secure_over_seeded": None
        if cuda is None
        else {name: cuda["secure"][name] / cuda["seeded"][name] for name in DTYPES},
        "poisson_mask_s": masks,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
