"""The noise sources and the secure uniforms, in one process (contract rule 6, "The DP-SGD
contract" in docs/usage.md; hf_dp_tp/noise.py for the construction).

- Statistics of secure noise (float32 and float64): mean 0, std σ·C within 1 %, kurtosis 3, the
  mass beyond 4σ within a binomial tolerance, uniform low-order mantissa bits, float64 noise with
  float64 variety.
- Independence: two TP shards' sources and two steps' sources are uncorrelated and share no
  value; the optimizer's noise stage draws replicated noise on TP rank 0 only and nothing on DP
  ranks other than 0. Mutations (a key reused across steps or across shards, a seed that ignores
  the TP rank) make exactly these checks fail.
- The seeded float32 stream is unchanged (resume reproducibility rests on it).
- Secure uniforms of the Poisson sampler: prefix property across internal chunk boundaries,
  independent counters and keys, inclusion rate q.
- A CUDA run (when there is a GPU: ChaCha20 on the device) matches the CPU torch ChaCha20 and
  transform value for value on the same key.
"""

from __future__ import annotations

import math
import pickle
import warnings

import pytest
import torch

from hf_dp_tp import noise, randomness
from hf_dp_tp.noise import NoiseSource, SecureNormalStream
from hf_dp_tp.parallel import MeshInfo, ParamLayout
from hf_dp_tp.randomness import derive_seed, secure_uniform
from hf_dp_tp.sampling import DistributedPoissonBatchSampler

SIGMA, CLIP = 1.5, 2.0
STD = SIGMA * CLIP
TAIL_4SIGMA = math.erfc(4 / math.sqrt(2))  # P(|Z| > 4) = 6.334e-5


# ---------------------------------------------------------------------------- checks


def check_gaussian(x: torch.Tensor, std: float) -> None:
    """Mean, std, kurtosis (each within 6 standard errors), tail mass beyond 4σ (within 6
    binomial standard deviations)."""
    x = x.double().flatten()
    n = x.numel()
    assert abs(x.mean().item()) < 6 * std / math.sqrt(n)
    rel = x.std().item() / std - 1
    assert abs(rel) < 6 / math.sqrt(2 * n), rel
    kurtosis = ((x / std) ** 4).mean().item()
    assert abs(kurtosis - 3) < 6 * math.sqrt(96 / n), kurtosis  # var of z^4 is 96
    tail = (x.abs() > 4 * std).sum().item()
    expected = n * TAIL_4SIGMA
    assert abs(tail - expected) < 6 * math.sqrt(expected), (tail, expected)


def check_independent(a: torch.Tensor, b: torch.Tensor) -> None:
    """Two noise draws that must be independent: uncorrelated, and no value in common at the same
    position (equal draws publish S1 - S2 without noise)."""
    a, b = a.double().flatten(), b.double().flatten()
    m = min(a.numel(), b.numel())
    a, b = a[:m], b[:m]
    assert not torch.equal(a, b), "identical noise"
    assert (a == b).sum().item() == 0, "noise values shared"
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr) < 6 / math.sqrt(m), corr


def _source(step: int, tp_rank: int, secure: bool = True, seed: int | None = None) -> NoiseSource:
    return NoiseSource(seed=None if secure else seed, tp_rank=tp_rank, step=step, secure=secure)


def shard_and_step_noise(
    secure: bool = True, n: int = 50_000
) -> dict[tuple[int, int], torch.Tensor]:
    """Noise of (step, tp_rank) for two steps and two TP ranks, drawn in the order the optimizer
    creates its sources (step by step, each rank its own source)."""
    return {
        (step, tp): _source(step, tp, secure, seed=7).normal((n,), STD, "cpu")
        for step in (0, 1)
        for tp in (0, 1)
    }


def check_shards_independent(draws: dict) -> None:
    for step in (0, 1):
        check_independent(draws[(step, 0)], draws[(step, 1)])


def check_steps_fresh(draws: dict) -> None:
    for tp in (0, 1):
        check_independent(draws[(0, tp)], draws[(1, tp)])


# ---------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_secure_noise_is_gaussian_with_std_sigma_c(dtype):
    x = _source(0, 0).normal((4_000_000,), STD, "cpu", dtype=dtype)
    assert x.dtype == dtype and x.shape == (4_000_000,)
    check_gaussian(x, STD)
    assert abs(x.double().std().item() / STD - 1) < 0.01


def test_secure_noise_shapes_and_dtypes():
    src = _source(0, 0)
    assert src.normal((3, 0, 2), 1.0, "cpu").shape == (3, 0, 2)
    assert src.normal((), 1.0, "cpu").shape == ()
    assert src.normal((5, 7), 1.0, "cpu").shape == (5, 7)
    half = src.normal((100_000,), STD, "cpu", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert abs(half.double().std().item() / STD - 1) < 0.03
    with pytest.raises(ValueError, match="floating point"):
        src.normal((4,), 1.0, "cpu", dtype=torch.int64)


def test_noise_has_the_variety_of_its_dtype():
    x = _source(0, 0).normal((1_000_000,), STD, "cpu", dtype=torch.float64)
    # almost no value is a float32 (a float32 draw cast to float64 would be 100 %)
    assert (x.float().double() == x).float().mean().item() < 1e-3
    # mantissa bits 16-23 are uniform: 256 buckets of ~3906 each (the lowest few bits favour 0
    # where the four summed draws cancel; hf_dp_tp/noise.py)
    counts = torch.bincount((x.view(torch.int64) >> 16) & 0xFF, minlength=256).double()
    expected = x.numel() / 256
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 255 + 6 * math.sqrt(2 * 255), chi2
    # float32 noise is a float64 draw rounded once: its lowest 8 mantissa bits are uniform
    y = _source(0, 0).normal((1_000_000,), STD, "cpu", dtype=torch.float32)
    counts = torch.bincount((y.view(torch.int32) & 0xFF).long(), minlength=256).double()
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 255 + 6 * math.sqrt(2 * 255), chi2


def test_seeded_float32_stream_is_unchanged():
    """Resuming a seeded run reproduces its noise: the float32 stream is torch's normal_ on a
    generator seeded with derive_seed(seed, "noise", tp_rank, step), as before."""
    got = _source(5, 1, secure=False, seed=123).normal((7, 9), STD, "cpu")
    gen = torch.Generator().manual_seed(derive_seed(123, "noise", 1, 5))
    assert torch.equal(got, torch.empty(7, 9).normal_(0.0, STD, generator=gen))
    again = _source(5, 1, secure=False, seed=123).normal((7, 9), STD, "cpu")
    assert torch.equal(got, again)
    wide = _source(5, 1, secure=False, seed=123).normal((1000,), STD, "cpu", dtype=torch.float64)
    assert wide.dtype == torch.float64 and (wide.float().double() != wide).any()


# ---------------------------------------------------------------------------- independence


@pytest.mark.parametrize("secure", [True, False], ids=["secure", "seeded"])
def test_tp_shards_and_steps_draw_independent_noise(secure):
    draws = shard_and_step_noise(secure)
    check_shards_independent(draws)
    check_steps_fresh(draws)


def test_one_source_never_repeats_itself():
    src = _source(0, 0)
    check_independent(src.normal((100_000,), 1.0, "cpu"), src.normal((100_000,), 1.0, "cpu"))


def test_mutation_key_reused_across_shards_and_steps_is_caught(monkeypatch):
    monkeypatch.setattr(noise, "_fresh_key", lambda: b"\x01" * 32)
    draws = shard_and_step_noise()
    with pytest.raises(AssertionError):
        check_shards_independent(draws)
    with pytest.raises(AssertionError):
        check_steps_fresh(draws)


def test_mutation_key_reused_across_steps_only_is_caught(monkeypatch):
    """Keys cycle with period 2: each step's two shards differ, but step 1 repeats step 0."""
    calls = iter(range(100))
    monkeypatch.setattr(noise, "_fresh_key", lambda: bytes([next(calls) % 2]) * 32)
    draws = shard_and_step_noise()
    check_shards_independent(draws)
    with pytest.raises(AssertionError):
        check_steps_fresh(draws)


def test_mutation_seed_ignoring_tp_rank_is_caught(monkeypatch):
    monkeypatch.setattr(noise, "derive_seed", lambda seed, label, tp, step: derive_seed(seed, step))
    draws = shard_and_step_noise(secure=False)
    check_steps_fresh(draws)
    with pytest.raises(AssertionError):
        check_shards_independent(draws)


def _optimizer(mesh: MeshInfo, secure: bool = True):
    from hf_dp_tp import DPOptimizerTP

    param = torch.nn.Parameter(torch.zeros(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPOptimizerTP(
            torch.optim.SGD([param], lr=0.1),
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            expected_batch_size=1,
            mesh=mesh,
            loss_reduction="sum",
            secure_mode=secure,
            noise_seed=None if secure else 3,
        )


SHARDED = ParamLayout((400, 500), (200, 500), shard_dim=0, offset=0, length=200)
REPLICATED = ParamLayout((300, 100), (300, 100))


def stage_noise(dtype=torch.float32, secure=True) -> dict[tuple[int, int], list[torch.Tensor]]:
    """What the optimizer's noise stage adds on each rank of a dp=2 x tp=2 mesh (zero sums)."""
    out = {}
    for dp in (0, 1):
        for tp in (0, 1):
            opt = _optimizer(MeshInfo(tp_rank=tp, tp_size=2, dp_rank=dp, dp_size=2), secure)
            sums = [torch.zeros(lay.local_shape, dtype=dtype) for lay in (SHARDED, REPLICATED)]
            opt.add_noise(sums, [SHARDED, REPLICATED])
            out[(dp, tp)] = sums
    return out


@pytest.mark.parametrize("secure", [True, False], ids=["secure", "seeded"])
def test_optimizer_noise_stage_follows_the_contract(secure):
    added = stage_noise(secure=secure)
    sharded0, replicated0 = added[(0, 0)]
    sharded1, replicated1 = added[(0, 1)]
    check_gaussian(sharded0, STD)
    check_gaussian(replicated0, STD)
    check_independent(sharded0, sharded1)  # each TP shard its own draw
    assert not replicated1.any()  # TP rank 0's replicated draw arrives by the TP broadcast
    for tp in (0, 1):  # added once: DP replicas other than 0 add nothing before the all-reduce
        assert all(not t.any() for t in added[(1, tp)])


def test_optimizer_noise_stage_mutation_is_caught(monkeypatch):
    monkeypatch.setattr(noise, "_fresh_key", lambda: b"\x02" * 32)
    added = stage_noise()
    with pytest.raises(AssertionError):
        check_independent(added[(0, 0)][0], added[(0, 1)][0])


def membership_hits(trials: int = 200) -> dict[str, int]:
    """A test on float64 sums released with the optimizer's noise: hypothesis ``S`` passes when
    ``S + round_to_float32(R - S) == R`` on every coordinate, i.e. when the noise could have been
    a float32. Counts passes for the true sum and for the sum without the target sample."""
    hits = {"true_sum": 0, "other_sum": 0}
    layout = ParamLayout((64,), (64,))
    for _ in range(trials):
        s_in = torch.rand(64, dtype=torch.float64)  # the sum with the target sample
        s_out = s_in - torch.rand(64, dtype=torch.float64)  # the sum without it
        released = s_in.clone()
        _optimizer(MeshInfo()).add_noise([released], [layout])
        assert released.dtype == torch.float64
        for name, guess in (("true_sum", s_in), ("other_sum", s_out)):
            if torch.equal(guess + (released - guess).float().double(), released):
                hits[name] += 1
    return hits


def test_optimizer_draws_noise_in_the_dtype_of_the_sum():
    """float64 sums get float64 noise: the float32-grid test above learns nothing."""
    assert membership_hits() == {"true_sum": 0, "other_sum": 0}


def test_mutation_float32_noise_on_float64_sum_is_caught(monkeypatch):
    """Drawing float32 noise for a float64 sum gives the true sum away every time."""
    original = NoiseSource.normal

    def float32_noise(self, shape, std, device, dtype=torch.float32):
        return original(self, shape, std, device, dtype=torch.float32).to(dtype)

    monkeypatch.setattr(NoiseSource, "normal", float32_noise)
    assert membership_hits(50) == {"true_sum": 50, "other_sum": 0}


def test_secure_sources_refuse_pickling_and_hide_the_key():
    src = _source(0, 0)
    with pytest.raises(TypeError, match="pickle"):
        pickle.dumps(src)
    with pytest.raises(TypeError, match="pickle"):
        pickle.dumps(SecureNormalStream())
    assert "key" in repr(SecureNormalStream()) and "not shown" in repr(SecureNormalStream())


# ---------------------------------------------------------------------------- secure uniforms

KEY = b"S" * 32


def test_secure_uniform_prefix_across_chunks():
    piece = randomness._PIECE_BYTES // 8  # uniforms per OpenSSL call
    full = secure_uniform(2 * piece + 5, KEY, (3, 4))
    for m in (1, 7, piece - 1, piece, piece + 1, 2 * piece + 5):
        assert torch.equal(secure_uniform(m, KEY, (3, 4)), full[:m]), m
    assert full.dtype == torch.float64 and 0.0 <= full.min() and full.max() < 1.0


def check_counters_independent(key: bytes = KEY, n: int = 200_000) -> None:
    streams = [secure_uniform(n, key, c) for c in ((0, 1), (1, 0), (0, 1, 0), (1,), (0, 2))]
    for i in range(len(streams)):
        for j in range(i):
            check_independent(streams[i], streams[j])
    check_independent(streams[0], secure_uniform(n, b"T" * 32, (0, 1)))


def test_secure_uniform_counters_and_keys_are_independent():
    check_counters_independent()


def test_mutation_counter_ignored_is_caught(monkeypatch):
    monkeypatch.setattr(randomness, "_encode_parts", lambda parts: b"same")
    with pytest.raises(AssertionError):
        check_counters_independent()


def test_secure_poisson_inclusion_rate():
    n, q = 1_000_000, 0.01
    u = secure_uniform(n, KEY, (0, 0))
    assert abs(u.mean().item() - 0.5) < 6 * math.sqrt(1 / 12 / n)
    sampler = DistributedPoissonBatchSampler(n, q, secure_mode=True, secure_key=KEY)
    sizes = [sampler.logical_batch(0, b).numel() for b in range(5)]
    sd = math.sqrt(n * q * (1 - q))
    for size in sizes:
        assert abs(size - n * q) < 6 * sd, sizes
    assert len({tuple(sampler.logical_batch(0, b)[:5].tolist()) for b in range(5)}) == 5


# ---------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_secure_noise_matches_cpu_transform(monkeypatch, dtype):
    """Same key on GPU (ChaCha20 made on the device, the default there) and on the CPU (the same
    torch ChaCha20, pinned): every chunk's keystream arrives intact (a repeated or skipped block
    would show as mismatches; the keystream itself is bit-exact, tests/test_chacha.py; the
    transcendental functions may differ in the last bits), and the values are Gaussian."""
    monkeypatch.setattr(noise, "_CUDA_CHUNK", 1 << 16)  # many chunks
    monkeypatch.setattr(noise, "_CPU_CHUNK", 1 << 16)  # the same chunks on the CPU
    monkeypatch.setattr(noise, "_fresh_key", lambda: b"\x03" * 32)
    n = 5 * (1 << 16) + 123
    on_gpu = SecureNormalStream().normal(n, STD, dtype, "cuda")
    on_cpu = SecureNormalStream("chacha20").normal(n, STD, dtype, "cpu")
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=tol, atol=tol)
    monkeypatch.undo()
    check_gaussian(_source(0, 0).normal((4_000_000,), STD, "cuda", dtype=dtype).cpu(), STD)
