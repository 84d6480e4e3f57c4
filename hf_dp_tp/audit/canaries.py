"""Canaries for the one-run audit: which ones are in, how they enter the training data, and the
directions of gradient canaries.

The training set of an audit run is ``N`` ordinary records followed by ``m`` canary records:
index ``N + j`` is canary ``j``. All ``N + m`` indices are drawn by the run's own Poisson sampler
(the same mask on every rank, each DP rank its share), so a canary is in a step's batch exactly
when a record would be. Canary ``j`` is *included* with probability 1/2, independently
(:func:`draw_inclusion`); an excluded canary's index may still be drawn but contributes nothing,
which under Poisson sampling is the same as not being in the data at all (records are sampled
independently, and a record acts only through its gradient).

Two kinds:

- **gradient** (white box): an included canary drawn into a micro-batch adds one extra per-sample
  gradient, a fixed random direction ``û_j`` scaled to norm ``G`` (≥ C), to that micro-batch's
  per-sample gradients *before* clipping. The package's own norm, clip and sum turn it into
  ``C·û_j`` in the clipped sum (a bug in those stages shows up in the scores); then noise, the DP
  reduction and scaling run as usual. Score: the inner product of the sum of the privatised
  gradients of all steps with ``û_j``, in units of one clipped canary (an included canary scores
  about ``q·T`` plus noise of std ``σ·√T``; an excluded one 0 plus the same noise).
- **input** (black box): random token sequences added as ordinary records when included. Score:
  the drop of the canary's loss from the initial to the trained model.

Directions are balanced over the TP group: on a parameter sharded over ``t`` ranks, the canary
puts the same random block on every shard, multiplied by a rank coefficient ``c_r`` with
``Σ_r c_r = 0`` and ``Σ_r c_r² = t``. For correct noise (independent per shard) this changes
nothing; noise drawn *equal* on the shards (an ε = ∞ bug, contract rule 6 in docs/usage.md)
cancels from every score, and the audit sees the canaries without noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from ..parallel import MeshInfo, ParamLayout, shard_extent
from ..randomness import derive_seed, seeded_uniform

#: Key of the canary ids in a collated batch (removed before the model sees the batch).
CANARY_KEY = "__audit_canary__"
CANARY_KINDS = ("gradient", "input")
#: Base elements a gradient canary is spread over (at most): dense on small models.
DEFAULT_SUPPORT = 1 << 16
#: The directions of all canaries are kept (float32) when they hold at most this many numbers.
_CACHE_ELEMENTS = 1 << 24


def draw_inclusion(num_canaries: int, seed: int) -> torch.Tensor:
    """``[m]`` bool: canary ``j`` is included with probability 1/2, independently."""
    return seeded_uniform(num_canaries, derive_seed(seed, "audit", "inclusion")) < 0.5


def tp_coefficients(tp_size: int) -> list[float]:
    """``c_r = √2 cos(2πr/t + π/4)``: ``Σ c_r = 0`` and ``Σ c_r² = t`` for ``t ≥ 2``, no
    ``c_r = 0`` (every shard carries canary mass), and ``c = [1]`` for ``t = 1``."""
    if tp_size == 1:
        return [1.0]
    return [
        math.sqrt(2.0) * math.cos(2.0 * math.pi * r / tp_size + math.pi / 4.0)
        for r in range(tp_size)
    ]


# --------------------------------------------------------------------------- data
class CanaryDataset(Dataset):
    """``records`` followed by ``num_canaries`` canary placeholders (``{CANARY_KEY: j}``); the
    collator (:class:`CanaryCollator`) turns them into what the canary kind needs."""

    def __init__(self, records: Any, num_canaries: int) -> None:
        if len(records) == 0:
            raise ValueError("an audit needs at least one ordinary training record")
        if num_canaries < 1:
            raise ValueError(f"num_canaries must be >= 1, got {num_canaries}")
        self.records = records
        self.num_canaries = int(num_canaries)

    def with_records(self, records: Any) -> CanaryDataset:
        return CanaryDataset(records, self.num_canaries)

    def __len__(self) -> int:
        return len(self.records) + self.num_canaries

    def __getitem__(self, index: int) -> Any:
        n = len(self.records)
        if index < n:
            return self.records[index]
        if index >= n + self.num_canaries:
            raise IndexError(index)
        return {CANARY_KEY: index - n}


class CanaryCollator:
    """Collates a micro-batch of a :class:`CanaryDataset`.

    Ordinary records go to ``collate``; excluded canaries are dropped; included ones become, for
    gradient canaries, ids in ``batch[CANARY_KEY]`` (their gradients are added by the optimizer),
    and for input canaries ordinary records (``canary_records[j]``) collated with the data, also
    listed in ``batch[CANARY_KEY]``. Picklable (DataLoader workers).
    """

    def __init__(
        self,
        collate: Callable[[list[Any]], Any],
        included: torch.Tensor,
        canary_records: Sequence[Mapping[str, Any]] | None = None,
        empty_example: Any = None,
    ) -> None:
        self.collate = collate
        self.included = included.bool().cpu()
        self.canary_records = canary_records
        self.empty_example = empty_example

    def __call__(self, features: list[Any]) -> dict[str, Any]:
        ordinary, ids = [], []
        for feature in features:
            if isinstance(feature, Mapping) and CANARY_KEY in feature:
                j = int(feature[CANARY_KEY])
                if self.included[j]:
                    ids.append(j)
                    if self.canary_records is not None:
                        ordinary.append(self.canary_records[j])
            else:
                ordinary.append(feature)
        if ordinary:
            batch = dict(self.collate(ordinary))
        else:  # only canaries (or nothing): a well-formed empty batch
            from ..sampling import _empty_like

            batch = dict(_empty_like(self.collate([self.empty_example])))
        batch[CANARY_KEY] = torch.tensor(ids, dtype=torch.long)
        return batch


# --------------------------------------------------------------------------- gradient canaries
class GradientCanaries:
    """The ``m`` fixed random unit directions ``û_j`` over the trainable parameters, laid out as
    this rank's local shards, and the scores of an update against them.

    The directions live on a "base" vector of the trainable parameters: every element of a
    replicated parameter, and for a parameter sharded over ``t`` TP ranks a block the size of the
    smallest shard, placed at the start of every shard and multiplied there by the rank's
    coefficient (:func:`tp_coefficients`). Canary ``j`` is a standard normal vector on the whole
    base when it has at most ``support`` elements, else ``support`` standard normals at random
    base positions (drawn with replacement; repeated positions add up), so that large models cost
    ``support`` numbers per canary. Every rank draws it from a generator seeded with
    ``(seed, j)``: the same on every rank without communication, and its norm over the whole
    model is known locally, so ``û_j`` has norm 1 exactly. Random sparse directions are as nearly
    orthogonal as dense ones (inner products of order ``1/√base``). The base is described per
    parameter (no per-element tables), and all directions are cached when they are small.

    Args:
        params: trainable parameters in the DP optimizer's order (identical on every rank).
        layouts: their :class:`~hf_dp_tp.parallel.ParamLayout`.
        mesh: this rank's TP/DP groups.
        num_canaries: m.
        seed: the audit seed (identical on every rank).
        support: base elements per canary (at most).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        layouts: Sequence[ParamLayout],
        mesh: MeshInfo,
        num_canaries: int,
        seed: int,
        support: int = DEFAULT_SUPPORT,
    ) -> None:
        if support < 1:
            raise ValueError(f"support must be >= 1, got {support}")
        self.mesh = mesh
        self.num_canaries = int(num_canaries)
        self.seed = int(seed)
        t, r = mesh.tp_size, mesh.tp_rank
        coefficient = tp_coefficients(t)[r]
        local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
        self.local_shapes = [tuple(x.shape) for x in local]
        self.device = local[0].device if local else torch.device("cpu")
        self.offsets: list[int] = []
        # one segment of the base per parameter: base element p of the segment is the local
        # element  offset + (p // (b·inner))·(L·inner) + (p // inner % b)·inner + p % inner
        # (sharded on dim k: b = block rows, L = local rows, inner = elements after dim k;
        # replicated: b = L = 1, inner = numel, i.e. offset + p)
        segments = []
        base_start = offset = 0
        for shape, layout in zip(self.local_shapes, layouts, strict=True):
            self.offsets.append(offset)
            numel = math.prod(shape)
            if numel and layout.sharded:
                dim = layout.shard_dim
                block = min(shard_extent(layout.global_shape[dim], k, t)[1] for k in range(t))
                inner = math.prod(shape[dim + 1 :])
                length = numel // shape[dim] * block
                # each TP rank scores its own shard
                info = (offset, block, shape[dim], inner, coefficient, float(t), 1.0)
            elif numel:
                length = numel
                # replicated: the same on every TP rank, scored once (TP rank 0)
                info = (offset, 1, 1, numel, 1.0, 1.0, 1.0 if r == 0 else 0.0)
            if numel and length:
                segments.append((base_start, *info))
                base_start += length
            offset += numel
        self.local_numel = offset
        self.base_numel = base_start
        if not segments:
            raise ValueError("gradient canaries need at least one trainable parameter element")
        columns = list(zip(*segments, strict=True))
        self._starts = torch.tensor(columns[0], dtype=torch.long)
        self._offset, self._block, self._rows, self._inner = (
            torch.tensor(c, dtype=torch.long) for c in columns[1:5]
        )
        self._coef, self._weight, self._counted = (
            torch.tensor(c, dtype=torch.float64) for c in columns[5:8]
        )
        self.support = min(int(support), self.base_numel)
        self._cache: torch.Tensor | None = None  # [m, base] float32
        self._full_map: tuple[torch.Tensor, ...] | None = None

    # ------------------------------------------------------------------ the base
    def _map(self, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Base positions → (local flat positions, coefficient, norm weight, scored-here)."""
        seg = torch.searchsorted(self._starts, positions, right=True) - 1
        p = positions - self._starts[seg]
        block, rows, inner = self._block[seg], self._rows[seg], self._inner[seg]
        local = (
            self._offset[seg]
            + torch.div(p, block * inner, rounding_mode="floor") * rows * inner
            + torch.div(p, inner, rounding_mode="floor") % block * inner
            + p % inner
        )
        return local, self._coef[seg], self._weight[seg], self._counted[seg]

    def _full(self) -> tuple[torch.Tensor, ...]:
        if self._full_map is None:
            self._full_map = self._map(torch.arange(self.base_numel))
        return self._full_map

    # ------------------------------------------------------------------ directions
    def direction(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Canary ``j`` on the base: ``(positions, values)``, sorted distinct positions and
        float64 values scaled so that the full direction over the whole model has norm 1."""
        generator = torch.Generator(device="cpu")
        generator.manual_seed(derive_seed(self.seed, "audit", "direction", int(j)))
        if self.support == self.base_numel:
            positions = torch.arange(self.base_numel)
            values = torch.randn(self.base_numel, generator=generator, dtype=torch.float64)
        else:
            draws = torch.randint(0, self.base_numel, (self.support,), generator=generator)
            normals = torch.randn(self.support, generator=generator, dtype=torch.float64)
            positions, slot = torch.unique(draws, return_inverse=True)
            values = torch.zeros(positions.numel(), dtype=torch.float64)
            values.index_add_(0, slot, normals)
        if self._full_map is not None:
            weight = self._full_map[2][positions]
        else:
            weight = self._map(positions)[2]
        return positions, values / (values.square() @ weight).sqrt()

    def _cached(self) -> torch.Tensor | None:
        """``[m, base]`` float32 of all directions, when that is at most ``_CACHE_ELEMENTS``."""
        if self._cache is None and self.num_canaries * self.base_numel <= _CACHE_ELEMENTS:
            self._full()
            cache = torch.zeros(self.num_canaries, self.base_numel, dtype=torch.float32)
            for j in range(self.num_canaries):
                positions, values = self.direction(j)
                cache[j, positions] = values.float()
            self._cache = cache
        return self._cache

    def local_directions(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[k, local numel]``: this rank's part of ``û_j`` for each id, flattened in parameter
        order."""
        out = torch.zeros(len(ids), self.local_numel, dtype=dtype)
        cache = self._cached()
        if cache is not None:
            local, coef, _, _ = self._full()
            out[:, local] = (cache[ids] * coef.float()).to(dtype)
        else:
            for row, j in enumerate(ids.tolist()):
                positions, values = self.direction(j)
                local, coef, _, _ = self._map(positions)
                out[row, local] = (values * coef).to(dtype)
        return out.to(self.device)

    def per_sample_rows(
        self, ids: torch.Tensor, norm: float, dtypes: Sequence[torch.dtype]
    ) -> list[torch.Tensor]:
        """Per-sample gradients ``norm · û_j`` of the canaries ``ids``, one ``[k, *local_shape]``
        tensor per parameter (in ``dtypes[i]``)."""
        flat = self.local_directions(ids, torch.float32).mul_(norm)
        rows = []
        for shape, offset, dtype in zip(self.local_shapes, self.offsets, dtypes, strict=True):
            numel = math.prod(shape)
            part = flat[:, offset : offset + numel].reshape(len(ids), *shape)
            rows.append(part.to(dtype).contiguous())
        return rows

    # ------------------------------------------------------------------ scores
    def scores(self, local_update: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """``[m]`` float64 ``⟨update, û_j⟩`` for a flat local update (this rank's shards, in
        parameter order): each rank's part, summed over the TP group (a collective on it);
        identical on every rank of the group."""
        if local_update.numel() != self.local_numel:
            raise ValueError(
                f"the update has {local_update.numel()} local elements, expected {self.local_numel}"
            )
        update = local_update.detach().to("cpu", torch.float64).reshape(-1)
        out = torch.empty(self.num_canaries, dtype=torch.float64)
        cache = self._cached()
        if cache is not None:
            local, coef, _, counted = self._full()
            weights = update[local] * coef * counted
            for start in range(0, self.num_canaries, chunk):
                stop = min(start + chunk, self.num_canaries)
                out[start:stop] = cache[start:stop].double() @ weights
        else:
            for j in range(self.num_canaries):
                positions, values = self.direction(j)
                local, coef, _, counted = self._map(positions)
                out[j] = values @ (update[local] * coef * counted)
        if self.mesh.tp_size > 1 and self.mesh.tp_group is not None:
            out = out.to(self.device)
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.mesh.tp_group)
        return out.cpu()


# --------------------------------------------------------------------------- input canaries
def random_token_canaries(
    num_canaries: int, seq_len: int, vocab_size: int, seed: int, low: int = 0
) -> list[dict[str, list[int]]]:
    """``m`` records of ``seq_len`` uniformly random token ids in ``[low, vocab_size)`` (causal-LM
    records: ``labels`` = ``input_ids``), identical on every rank for one seed."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(derive_seed(seed, "audit", "input-canaries"))
    ids = torch.randint(low, vocab_size, (num_canaries, seq_len), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids.tolist()]
