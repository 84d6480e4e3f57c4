"""Tests for sampling (contract rule 1, docs/usage.md) and the randomness primitives behind it.

Every test here fails if the rule it names is broken: ranks disagreeing on the Poisson mask, a DP
share overlapping another or missing indices, fixed-size instead of Poisson batches, skipped
empty batches, inexact resume, or use of a process-global RNG.
"""

from __future__ import annotations

import itertools
import pickle
import random
import time
from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, IterableDataset

from hf_dp_tp.randomness import (
    KEY_BYTES,
    agree_on_key,
    agree_on_seed,
    derive_seed,
    secure_uniform,
    seeded_uniform,
)
from hf_dp_tp.sampling import (
    DistributedPoissonBatchSampler,
    build_poisson_data_loader,
    collate_with_empty,
)
from tests.distributed_harness import run_distributed

# ---------------------------------------------------------------------------- helpers


def reference_mask(n: int, q: float, epoch: int, batch: int, *, seed=None, key=None) -> list[int]:
    """The Poisson batch computed straight from the randomness primitives (not the sampler)."""
    if key is not None:
        u = secure_uniform(n, key, (epoch, batch))
    else:
        u = seeded_uniform(n, derive_seed(seed, "poisson", epoch, batch))
    return [i for i in range(n) if u[i].item() < q]


def group_logical(batches: list[list[int]], m: int) -> list[list[int]]:
    """Concatenate each run of ``m`` micro-batches into its logical-batch share."""
    assert len(batches) % m == 0
    return [sum(batches[i : i + m], []) for i in range(0, len(batches), m)]


def consume(sampler: DistributedPoissonBatchSampler, k: int) -> list[list[int]]:
    """Take exactly ``k`` lists, running through epochs like a training loop that stops early."""
    out: list[list[int]] = []
    while len(out) < k:
        for batch in sampler:
            out.append(batch)
            if len(out) == k:
                break
    return out


class DictDataset(Dataset):
    def __init__(self, n: int = 10) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": torch.arange(6, dtype=torch.int64) + i,
            "attention_mask": torch.ones(6, dtype=torch.bool),
            "pixels": torch.full((3, 4), float(i), dtype=torch.float16),
            "name": f"sample{i}",
        }


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(3))


class TupleDataset(Dataset):
    def __len__(self) -> int:
        return 7

    def __getitem__(self, i: int) -> tuple:
        return torch.full((5,), float(i), dtype=torch.float64), i


Pair = namedtuple("Pair", ["x", "y"])


def nested_collate(samples: list[tuple]) -> tuple:
    xs = torch.stack([s[0] for s in samples])
    ys = torch.tensor([s[1] for s in samples], dtype=torch.int32)
    return ({"x": xs, "meta": [xs.sum(dim=1)]}, Pair(x=xs * 2, y=ys), "tag")


# ---------------------------------------------------------------------------- 1. distributed

N_DIST, Q_DIST, STEPS_DIST, M_DIST, EPOCHS_DIST = 200, 0.1, 6, 2, 2


def _dist_worker(rank: int, world_size: int) -> dict:
    """Mesh (dp=2, tp=2): dp_rank = rank // 2, TP peers are {0, 1} and {2, 3}."""
    dp_rank, dp_size = rank // 2, world_size // 2
    out: dict = {}
    for secure in (False, True):
        sampler = DistributedPoissonBatchSampler(
            N_DIST,
            Q_DIST,
            dp_rank=dp_rank,
            dp_size=dp_size,
            num_micro_batches=M_DIST,
            steps_per_epoch=STEPS_DIST,
            seed=None,  # agreed by broadcast from rank 0
            secure_mode=secure,
        )
        batches = []
        for _ in range(EPOCHS_DIST):  # plain epoch loop: the sampler advances its own epoch
            batches.extend(list(sampler))
        out[secure] = {"batches": batches, "state": sampler.state_dict(include_secret=True)}
    # Agreement over a subgroup is rooted at that group's first global rank.
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    my_tp = tp_groups[rank // 2]
    out["tp_seed"] = agree_on_seed(None, my_tp)
    out["tp_key"] = agree_on_key(None, my_tp)
    return out


def test_distributed_ranks_agree_and_dp_shares_partition_the_batch():
    results = run_distributed(_dist_worker, 4)
    for secure in (False, True):
        res = [r[secure] for r in results]
        secret = "secure_key" if secure else "seed"
        # One seed/key agreed across the whole world.
        assert len({r["state"][secret] for r in res}) == 1
        # TP peers see identical lists for every micro-batch, and every rank yields as many.
        assert all(len(r["batches"]) == EPOCHS_DIST * STEPS_DIST * M_DIST for r in res)
        assert res[0]["batches"] == res[1]["batches"]
        assert res[2]["batches"] == res[3]["batches"]
        # Per logical batch: DP shares are disjoint, interleaved, and their union is the mask
        # computed independently in a single process from the same seed/key.
        share0 = group_logical(res[0]["batches"], M_DIST)
        share1 = group_logical(res[2]["batches"], M_DIST)
        single = DistributedPoissonBatchSampler(
            N_DIST,
            Q_DIST,
            steps_per_epoch=STEPS_DIST,
            secure_mode=secure,
            **(
                {"secure_key": res[0]["state"][secret]}
                if secure
                else {"seed": res[0]["state"][secret]}
            ),
        )
        single_batches = list(single) + list(single)
        nonempty = 0
        for j, (a, b) in enumerate(zip(share0, share1, strict=True)):
            epoch, batch = divmod(j, STEPS_DIST)
            ref = reference_mask(
                N_DIST,
                Q_DIST,
                epoch,
                batch,
                **(
                    {"key": res[0]["state"][secret]}
                    if secure
                    else {"seed": res[0]["state"][secret]}
                ),
            )
            assert not set(a) & set(b)
            assert sorted(a + b) == ref == single_batches[j]
            assert a == ref[0::2] and b == ref[1::2]
            nonempty += bool(ref)
        assert nonempty >= 2 * STEPS_DIST - 1  # q*N = 20: the comparison is not vacuous
    # Different logical batches / epochs differ (fresh masks), secure and seeded streams differ.
    plain = group_logical(results[0][False]["batches"], M_DIST)
    assert len({tuple(b) for b in plain}) == len(plain)
    assert results[0][False]["batches"] != results[0][True]["batches"]
    # Subgroup agreement: rooted per group, identical within each TP group.
    assert results[0]["tp_seed"] == results[1]["tp_seed"]
    assert results[2]["tp_seed"] == results[3]["tp_seed"]
    assert results[0]["tp_seed"] != results[2]["tp_seed"]
    assert results[0]["tp_key"] == results[1]["tp_key"] != results[2]["tp_key"]
    assert results[2]["tp_key"] == results[3]["tp_key"]
    assert len(results[0]["tp_key"]) == KEY_BYTES


# ---------------------------------------------------------------------------- 2. statistics


@pytest.mark.parametrize("secure", [False, True])
def test_poisson_statistics(secure):
    n, q, steps = 1000, 0.05, 2000
    kwargs = {"secure_key": b"\x07" * 32} if secure else {"seed": 1234}
    sampler = DistributedPoissonBatchSampler(
        n, q, steps_per_epoch=steps, secure_mode=secure, **kwargs
    )
    batches = list(sampler)
    assert len(batches) == steps
    sizes = np.array([len(b) for b in batches], dtype=np.float64)
    mean, var = q * n, q * (1 - q) * n
    # Mean batch size q*N within 5 standard errors.
    assert abs(sizes.mean() - mean) < 5 * np.sqrt(var / steps)
    # Batch sizes vary like a Binomial(N, q) (a fixed-size sampler has variance 0).
    assert abs(sizes.var(ddof=1) / var - 1) < 0.2
    # Every index is included with frequency ~q; none is systematically excluded (first/last).
    counts = np.zeros(n)
    for b in batches:
        assert b == sorted(set(b))  # ascending, no duplicates
        counts[b] += 1
    sd = np.sqrt(steps * q * (1 - q))
    assert counts.min() > 0 and counts[0] > 0 and counts[-1] > 0
    assert np.abs(counts - steps * q).max() < 6 * sd
    # Consecutive batches are independent: expected overlap is q^2 * N, not q * N.
    overlaps = [len(set(a) & set(b)) for a, b in itertools.pairwise(batches)]
    assert abs(np.mean(overlaps) - q * q * n) < 0.5


# ---------------------------------------------------------------------------- 3. empty batches


def test_empty_batches_are_yielded_not_skipped():
    n, q, m = 50, 0.002, 3
    for dp_rank in range(2):
        sampler = DistributedPoissonBatchSampler(
            n, q, dp_rank=dp_rank, dp_size=2, num_micro_batches=m, seed=3
        )
        assert sampler.steps_per_epoch == 500 and len(sampler) == 1500
        for _ in range(2):
            batches = list(sampler)
            assert len(batches) == len(sampler)
            assert all(isinstance(b, list) for b in batches)
            assert sum(not b for b in batches) > 1400  # E[|B|] = 0.1: nearly all empty
            assert any(batches)
    # A share smaller than num_micro_batches gives trailing empty chunks (array_split).
    one = DistributedPoissonBatchSampler(4, 1.0, num_micro_batches=6, steps_per_epoch=1, seed=0)
    assert list(one) == [[0], [1], [2], [3], [], []]


def test_collate_with_empty_dict_and_tuple_samples():
    ds = DictDataset()
    collate = collate_with_empty(None, ds)
    full = collate([ds[1], ds[2]])
    empty = collate([])
    assert set(empty) == set(full)
    for name in ("input_ids", "attention_mask", "pixels"):
        assert empty[name].shape == (0, *full[name].shape[1:])
        assert empty[name].dtype == full[name].dtype
    assert empty["pixels"].shape == (0, 3, 4) and empty["pixels"].dtype == torch.float16
    assert torch.equal(full["input_ids"][1], torch.arange(6) + 2)  # non-empty: plain collate

    tds = TupleDataset()
    empty_t = collate_with_empty(None, tds)([])  # default_collate of a tuple is a list
    assert empty_t[0].shape == (0, 5) and empty_t[0].dtype == torch.float64
    assert empty_t[1].shape == (0,) and empty_t[1].dtype == torch.int64

    custom = collate_with_empty(nested_collate, tds)
    batch = custom([tds[3], tds[4]])
    assert batch[0]["x"].shape == (2, 5) and batch[2] == "tag"
    e = custom([])
    assert isinstance(e, tuple) and isinstance(e[1], Pair) and e[2] == "tag"
    assert e[0]["x"].shape == (0, 5) and e[0]["meta"][0].shape == (0,)
    assert e[1].x.shape == (0, 5) and e[1].y.shape == (0,) and e[1].y.dtype == torch.int32
    pickle.loads(pickle.dumps(custom))  # usable with spawn-started workers


def test_poisson_data_loader_iterates_empty_batches():
    ds = DictDataset(12)
    original = DataLoader(ds, batch_size=4, shuffle=True, drop_last=True, num_workers=0)
    loader = build_poisson_data_loader(
        original, sample_rate=0.05, dp_rank=1, dp_size=2, num_micro_batches=2, seed=11
    )
    sampler = loader.batch_sampler
    assert isinstance(sampler, DistributedPoissonBatchSampler)
    assert sampler.expected_batch_size == pytest.approx(0.6) and len(loader) == 40
    rng_before = torch.get_rng_state()
    indices = list(sampler)
    sampler.set_epoch(0)
    seen = list(loader)
    assert torch.equal(torch.get_rng_state(), rng_before)  # no global RNG in the loader either
    assert len(seen) == len(indices) == 40
    assert any(not idx for idx in indices) and any(indices)
    for idx, batch in zip(indices, seen, strict=True):
        assert batch["input_ids"].shape == (len(idx), 6)
        assert batch["pixels"].dtype == torch.float16
        assert torch.equal(batch["input_ids"][:, 0], torch.tensor(idx, dtype=torch.int64))


# ---------------------------------------------------------------------------- 4. resume


def _make(secure: bool, seed=None, **kw) -> DistributedPoissonBatchSampler:
    return DistributedPoissonBatchSampler(
        60, 0.2, num_micro_batches=3, steps_per_epoch=4, secure_mode=secure, seed=seed, **kw
    )


@pytest.mark.parametrize("secure", [False, True])
@pytest.mark.parametrize("k", [0, 1, 5, 6, 11, 12, 13, 20, 24, 30])
def test_resume_is_exact(secure, k):
    epochs = 3
    full_sampler = _make(secure, **({"secure_key": b"s" * 32} if secure else {"seed": 5}))
    full = [b for _ in range(epochs) for b in full_sampler]
    assert len(full) == 36

    first_sampler = _make(secure, **({"secure_key": b"s" * 32} if secure else {"seed": 5}))
    head = consume(first_sampler, k)
    state = first_sampler.state_dict(include_secret=True)
    assert state["epoch"] * 12 + state["num_yielded"] == k
    assert all(isinstance(v, int | float | bool | bytes) for v in state.values())
    state = pickle.loads(pickle.dumps(state))

    resumed = _make(secure)  # fresh random seed/key, replaced by the checkpoint
    resumed.load_state_dict(state)
    tail = list(resumed)  # rest of the saved epoch (possibly nothing) ...
    for _ in range(state["epoch"] + 1, epochs):  # ... then the remaining epochs
        tail.extend(resumed)
    assert head + tail == full


@pytest.mark.parametrize("secure", [False, True])
def test_default_state_has_no_secret_and_resumes_position_with_fresh_draws(secure):
    """A checkpointed sampler state never holds the seed/key (it rebuilds every batch); a
    resumed sampler keeps the position and draws fresh batches with its own secret."""
    secret = {"secure_key": b"s" * 32} if secure else {"seed": 5}
    first = _make(secure, **secret)
    head = consume(first, 5)
    state = first.state_dict()
    assert "seed" not in state and "secure_key" not in state
    assert b"s" * 32 not in pickle.dumps(state)
    full = head + list(first)
    resumed = _make(secure)  # fresh secret
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(head) + len(tail) == len(full) == 12
    assert tail != full[5:]  # fresh draws, not a replay of the checkpointed run's batches


def test_num_micro_batches_chunks_concatenate_to_the_share():
    one = DistributedPoissonBatchSampler(97, 0.3, dp_rank=1, dp_size=3, seed=9, steps_per_epoch=5)
    three = DistributedPoissonBatchSampler(
        97, 0.3, dp_rank=1, dp_size=3, num_micro_batches=3, seed=9, steps_per_epoch=5
    )
    assert len(three) == 3 * len(one)
    for _ in range(2):
        shares, chunks = list(one), list(three)
        for j, share in enumerate(shares):
            part = chunks[3 * j : 3 * j + 3]
            assert sum(part, []) == share
            sizes = [len(c) for c in part]
            assert sizes == [len(a) for a in np.array_split(np.arange(len(share)), 3)]


def test_set_epoch_and_stale_iterators():
    s = _make(False, seed=1)
    e0 = list(s)
    assert s.epoch == 1
    e1 = list(s)
    s.set_epoch(0)
    assert list(s) == e0  # explicit rewind replays epoch 0 ...
    assert list(s) == e1  # ... and then continues with epoch 1
    it = iter(s)
    next(it)
    list(s)  # a newer iterator takes over
    with pytest.raises(RuntimeError, match="stale"):
        next(it)


# ---------------------------------------------------------------------------- 5. seeds & RNG


def test_masks_depend_on_seed_epoch_and_batch():
    def epoch_lists(seed, epoch):
        s = DistributedPoissonBatchSampler(500, 0.1, steps_per_epoch=10, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    a = epoch_lists(1, 0)
    assert a == epoch_lists(1, 0)  # deterministic across instances
    assert a != epoch_lists(2, 0)  # seed matters
    assert a != epoch_lists(1, 1)  # epoch matters
    assert len({tuple(b) for b in a}) == len(a)  # batch index matters
    key_a, key_b = b"a" * 32, b"b" * 32
    sa = DistributedPoissonBatchSampler(
        500, 0.1, steps_per_epoch=3, secure_mode=True, secure_key=key_a
    )
    sb = DistributedPoissonBatchSampler(
        500, 0.1, steps_per_epoch=3, secure_mode=True, secure_key=key_b
    )
    assert list(sa) != list(sb)
    # Unseeded samplers agree on nothing by accident.
    assert (
        DistributedPoissonBatchSampler(10, 0.5).seed != DistributedPoissonBatchSampler(10, 0.5).seed
    )


@pytest.mark.parametrize("secure", [False, True])
def test_no_global_rng(secure):
    kwargs = {"secure_key": b"k" * 32} if secure else {"seed": 77}

    def run():
        s = DistributedPoissonBatchSampler(
            300, 0.1, num_micro_batches=2, steps_per_epoch=8, secure_mode=secure, **kwargs
        )
        return list(s) + list(s)

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    a = run()
    torch.manual_seed(12345)
    np.random.seed(12345)
    random.seed(12345)
    torch_state, np_state, py_state = (
        torch.get_rng_state(),
        np.random.get_state(),
        random.getstate(),
    )
    b = run()
    assert a == b  # global seeds do not influence the masks
    assert torch.equal(torch.get_rng_state(), torch_state)  # ... and are not consumed
    assert all(np.array_equal(x, y) for x, y in zip(np.random.get_state(), np_state, strict=True))
    assert random.getstate() == py_state


def test_randomness_primitives():
    assert derive_seed(1, 23) != derive_seed(12, 3)
    assert len({derive_seed(1), derive_seed("1"), derive_seed(b"\x01"), derive_seed(1, 0)}) == 4
    assert derive_seed(7, "poisson", 0, 1) == derive_seed(7, "poisson", 0, 1)
    assert derive_seed(-1) != derive_seed(2**64 - 1)
    assert all(0 <= derive_seed(i) < 2**63 for i in range(100))
    assert agree_on_seed(42) == 42 and agree_on_seed(None) != agree_on_seed(None)
    assert agree_on_key(b"x" * 32) == b"x" * 32 and len(agree_on_key(None)) == KEY_BYTES

    key = b"K" * 32
    u = secure_uniform(1_000_000, key, (3, 4))
    assert u.dtype == torch.float64 and u.shape == (1_000_000,)
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.002 and abs(u.var().item() - 1 / 12) < 0.001
    assert torch.equal(secure_uniform(13, key, (3, 4)), u[:13])  # counter mode: prefix-stable
    assert not torch.equal(secure_uniform(13, key, (3, 5)), u[:13])
    assert not torch.equal(secure_uniform(13, key, (34,)), u[:13])
    assert not torch.equal(secure_uniform(13, b"L" * 32, (3, 4)), u[:13])
    assert secure_uniform(0, key, (0,)).shape == (0,)
    v = seeded_uniform(1000, 5)
    assert v.dtype == torch.float64 and torch.equal(v, seeded_uniform(1000, 5))
    assert not torch.equal(v, seeded_uniform(1000, 6))


def test_secure_uniform_is_fast():
    secure_uniform(1000, b"k" * 32, (0,))
    start = time.perf_counter()
    secure_uniform(1_000_000, b"k" * 32, (1, 2))
    assert time.perf_counter() - start < 5.0  # ~0.1 s on one core; generous for CI


# ---------------------------------------------------------------------------- 6. bad arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": -0.1}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"sample_rate": float("nan")}, "sample_rate"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": -3}, "num_samples"),
        ({"dp_rank": 2, "dp_size": 2}, "dp_rank"),
        ({"dp_rank": -1}, "dp_rank"),
        ({"dp_size": 0}, "dp_size"),
        ({"num_micro_batches": 0}, "num_micro_batches"),
        ({"steps_per_epoch": 0}, "steps_per_epoch"),
        ({"seed": 1, "secure_mode": True}, "secure_mode"),
        ({"secure_key": b"k" * 32}, "secure_key"),
        ({"secure_mode": True, "secure_key": b"short"}, "key"),
        ({"seed": "abc"}, "seed"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"num_samples": 10, "sample_rate": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        DistributedPoissonBatchSampler(args.pop("num_samples"), args.pop("sample_rate"), **args)


def test_bad_state_and_epoch():
    s = _make(False, seed=1)
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(-1)
    good = s.state_dict(include_secret=True)
    for change, match in [
        ({"num_micro_batches": 2}, "num_micro_batches"),
        ({"sample_rate": 0.3}, "sample_rate"),
        ({"num_samples": 61}, "num_samples"),
        ({"secure_mode": True}, "secure_mode"),
        ({"num_yielded": 13}, "num_yielded"),
        ({"seed": None}, "seed"),
        ({"version": 99}, "version"),
    ]:
        with pytest.raises(ValueError, match=match):
            s.load_state_dict({**good, **change})
    with pytest.raises(ValueError, match="secure_key"):
        _make(True).load_state_dict(
            {**_make(True).state_dict(include_secret=True), "secure_key": None}
        )
    with pytest.raises(ValueError, match="n must be"):
        secure_uniform(-1, b"k" * 32, (0,))
    with pytest.raises(ValueError, match="key"):
        secure_uniform(4, b"k", (0,))
    with pytest.raises(TypeError, match="int, str or bytes"):
        derive_seed(1.5)
    with pytest.raises(ValueError, match="IterableDataset"):
        build_poisson_data_loader(DataLoader(Stream()), sample_rate=0.1, seed=0)
