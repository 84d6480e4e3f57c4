"""Poisson sampling for DP-SGD under data and tensor parallelism (contract rule 1, docs/usage.md).

One Poisson mask per *logical batch* (= one optimizer step): sample ``i`` is in the batch iff
``u_i < q``, where ``u`` is a vector of uniforms that depends only on ``(seed or key, epoch,
batch index)``. Every rank recomputes the same mask without communication, so all ranks agree
and resuming from a checkpoint is exact. The selected indices are dealt to the data-parallel
ranks round-robin (DP rank ``r`` takes ``selected[r::dp_size]``); tensor-parallel peers pass the
same ``dp_rank`` and get identical lists. Each DP share is cut into ``num_micro_batches``
consecutive chunks for gradient accumulation. Empty (micro-)batches are yielded like any other:
every rank must run every step's collectives or the job deadlocks.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    Sampler,
    default_collate,
    default_convert,
)

from .privacy_plan import steps_per_epoch as default_steps_per_epoch
from .randomness import agree_on_key, agree_on_seed, derive_seed, secure_uniform, seeded_uniform

__all__ = [
    "DistributedPoissonBatchSampler",
    "build_poisson_data_loader",
    "collate_with_empty",
    "stand_in_batch",
]

_STATE_VERSION = 1


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class DistributedPoissonBatchSampler(Sampler[list[int]]):
    """Batch sampler drawing one Poisson batch per optimizer step, identical on every rank.

    For logical batch ``b`` of epoch ``e`` the mask is ``u < sample_rate`` with

    - ``u = seeded_uniform(num_samples, derive_seed(seed, "poisson", e, b))`` (default), or
    - ``u = secure_uniform(num_samples, key, (e, b))`` with ``secure_mode=True``.

    The ascending selected indices are split across DP ranks (``selected[dp_rank::dp_size]``),
    and that share into ``num_micro_batches`` consecutive chunks (``numpy.array_split``
    semantics: sizes differ by at most one, larger chunks first, chunks may be empty). Each chunk
    is yielded as a ``list[int]``; empty lists are yielded too, never skipped. An epoch has
    ``steps_per_epoch`` logical batches, i.e. ``len(self) = steps_per_epoch * num_micro_batches``
    yielded lists, and every rank yields the same number of lists.

    Construction is a **collective** over ``group`` (default: the whole world) when
    ``torch.distributed`` is initialised and the seed (or, in secure mode, the key) is not given:
    the first rank of ``group`` draws it from ``os.urandom`` and broadcasts it. Every rank that
    consumes batches (all DP and all TP ranks) must therefore construct the sampler with the same
    ``group``. Nothing here reads or advances a process-global RNG.

    The sampler is stateful: it remembers the epoch and how many lists it has yielded in it.
    A new ``__iter__`` continues from that position (after a ``break``, or after
    :meth:`load_state_dict`), and a completed pass advances the epoch by one, so a plain
    ``for epoch ...: for batch in loader`` loop draws fresh masks every epoch and a mask is never
    reused unless :meth:`set_epoch` explicitly rewinds to an earlier epoch. Only the most recently
    created iterator may be advanced; an older one raises ``RuntimeError``. With DataLoader
    workers, the DataLoader fetches indices ahead of the training loop, so :meth:`state_dict`
    counts lists *handed out* (up to ``prefetch_factor * num_workers`` more than consumed);
    resuming from it skips those fresh batches but never repeats one.

    Args:
        num_samples: dataset size ``N`` (> 0); indices are drawn from ``range(num_samples)``.
        sample_rate: Poisson rate ``q`` in ``(0, 1]``, global (not per rank).
        dp_rank: this rank's index in the data-parallel group, ``0 <= dp_rank < dp_size``.
        dp_size: number of data-parallel replicas ``d`` (>= 1).
        num_micro_batches: gradient-accumulation chunks per logical batch (>= 1).
        steps_per_epoch: logical batches per epoch; default ``max(1, round(1 / sample_rate))``.
        seed: base seed (same on all ranks), or ``None`` to agree on a random one. Not allowed
            with ``secure_mode``.
        secure_mode: draw masks from a keyed PRF (a BLAKE2b subkey per logical batch and its
            AES-256-CTR keystream) instead of a seeded torch generator.
        secure_key: secure mode only: the secret key (16-64 bytes, same on all ranks), or
            ``None`` to agree on a random 32-byte key.
        group: process group over which a missing seed/key is agreed (default: world).

    Raises:
        ValueError: on an invalid argument (see the messages).
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_micro_batches: int = 1,
        steps_per_epoch: int | None = None,
        seed: int | None = None,
        secure_mode: bool = False,
        secure_key: bytes | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if not _is_int(num_samples) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if (
            isinstance(sample_rate, bool)
            or not isinstance(sample_rate, numbers.Real)
            or not 0.0 < float(sample_rate) <= 1.0
        ):
            raise ValueError(f"sample_rate must be a float in (0, 1], got {sample_rate!r}")
        if not _is_int(dp_size) or dp_size < 1:
            raise ValueError(f"dp_size must be an int >= 1, got {dp_size!r}")
        if not _is_int(dp_rank) or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be an int in [0, dp_size={dp_size}), got {dp_rank!r}")
        if not _is_int(num_micro_batches) or num_micro_batches < 1:
            raise ValueError(f"num_micro_batches must be an int >= 1, got {num_micro_batches!r}")
        if steps_per_epoch is None:
            steps_per_epoch = default_steps_per_epoch(float(sample_rate))
        elif not _is_int(steps_per_epoch) or steps_per_epoch < 1:
            raise ValueError(
                f"steps_per_epoch must be an int >= 1 or None, got {steps_per_epoch!r}"
            )
        if secure_mode and seed is not None:
            raise ValueError(
                "seed must not be given with secure_mode=True: secure sampling is keyed by a secret "
                "key (pass secure_key, or None to agree on a random one)"
            )
        if not secure_mode and secure_key is not None:
            raise ValueError("secure_key is only used with secure_mode=True")

        self._num_samples = int(num_samples)
        self._sample_rate = float(sample_rate)
        self._dp_rank = int(dp_rank)
        self._dp_size = int(dp_size)
        self._num_micro_batches = int(num_micro_batches)
        self._steps_per_epoch = int(steps_per_epoch)
        self._secure_mode = bool(secure_mode)
        self._seed: int | None = None
        self._key: bytes | None = None
        if self._secure_mode:
            self._key = agree_on_key(secure_key, group)
        else:
            self._seed = int(agree_on_seed(seed, group))
        self._epoch = 0
        self._num_yielded = 0  # lists yielded so far in the current epoch
        self._generation = 0  # bumped by __iter__/set_epoch/load_state_dict: stale iterators stop

    # ------------------------------------------------------------------ properties
    @property
    def num_samples(self) -> int:
        """Dataset size ``N``."""
        return self._num_samples

    @property
    def sample_rate(self) -> float:
        """Global Poisson sampling rate ``q``."""
        return self._sample_rate

    @property
    def dp_rank(self) -> int:
        return self._dp_rank

    @property
    def dp_size(self) -> int:
        return self._dp_size

    @property
    def num_micro_batches(self) -> int:
        return self._num_micro_batches

    @property
    def steps_per_epoch(self) -> int:
        """Logical batches (optimizer steps) per epoch."""
        return self._steps_per_epoch

    @property
    def secure_mode(self) -> bool:
        return self._secure_mode

    @property
    def seed(self) -> int | None:
        """The agreed base seed (``None`` in secure mode)."""
        return self._seed

    @property
    def epoch(self) -> int:
        """The epoch the next yielded list belongs to (before a completed pass advances it)."""
        return self._epoch

    @property
    def expected_batch_size(self) -> float:
        """``B̄ = q * N``: expected size of the *global* logical batch (all DP ranks together)."""
        return self._sample_rate * self._num_samples

    def __len__(self) -> int:
        """Lists yielded per epoch: ``steps_per_epoch * num_micro_batches`` (on every rank)."""
        return self._steps_per_epoch * self._num_micro_batches

    # ------------------------------------------------------------------ masks
    def _uniforms(self, epoch: int, batch_index: int) -> torch.Tensor:
        if self._secure_mode:
            assert self._key is not None
            return secure_uniform(self._num_samples, self._key, (epoch, batch_index))
        assert self._seed is not None
        return seeded_uniform(
            self._num_samples, derive_seed(self._seed, "poisson", epoch, batch_index)
        )

    def logical_batch(self, epoch: int, batch_index: int) -> torch.Tensor:
        """Ascending int64 indices of the *global* logical batch ``batch_index`` of ``epoch``.

        A pure function of ``(seed or key, epoch, batch_index)``: identical on every rank and
        independent of the sampler's position.
        """
        return torch.nonzero(self._uniforms(epoch, batch_index) < self._sample_rate).flatten()

    def dp_share(self, epoch: int, batch_index: int) -> torch.Tensor:
        """This DP rank's share of a logical batch: ``logical_batch(...)[dp_rank::dp_size]``."""
        return self.logical_batch(epoch, batch_index)[self._dp_rank :: self._dp_size]

    def micro_batches(self, epoch: int, batch_index: int) -> list[list[int]]:
        """The ``num_micro_batches`` lists (possibly empty) yielded for one logical batch."""
        share = self.dp_share(epoch, batch_index)
        return [chunk.tolist() for chunk in torch.tensor_split(share, self._num_micro_batches)]

    # ------------------------------------------------------------------ iteration
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next ``__iter__`` draws from.

        Setting a different epoch starts it from its first list; setting the current epoch keeps
        the position (so calling ``set_epoch`` at the top of each epoch after
        :meth:`load_state_dict` does not discard the resumed position). Invalidates live
        iterators.
        """
        if not _is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if epoch != self._epoch:
            self._epoch = int(epoch)
            self._num_yielded = 0
        self._generation += 1

    def __iter__(self) -> Iterator[list[int]]:
        """Yield the remaining lists of the current epoch, then advance the epoch by one."""
        self._generation += 1
        return self._iterate(self._generation)

    def _iterate(self, generation: int) -> Iterator[list[int]]:
        m = self._num_micro_batches
        epoch = self._epoch
        batch_index, chunk_index = divmod(self._num_yielded, m)
        while batch_index < self._steps_per_epoch:
            chunks = self.micro_batches(epoch, batch_index)
            for chunk in chunks[chunk_index:]:
                self._check_current(generation)
                self._num_yielded += 1  # counted before the yield: state_dict() after
                yield chunk  # receiving k lists says k
            batch_index, chunk_index = batch_index + 1, 0
        self._check_current(generation)
        self._epoch = epoch + 1
        self._num_yielded = 0

    def _check_current(self, generation: int) -> None:
        if generation != self._generation:
            raise RuntimeError(
                "DistributedPoissonBatchSampler iterator is stale: the sampler was re-iterated, "
                "set_epoch() or load_state_dict() was called since it was created"
            )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self, *, include_secret: bool = False) -> dict[str, Any]:
        """Plain-dict state: the position (``epoch``, ``num_yielded``) and the configuration that
        fixes its meaning.

        The seed or secret key is left out unless ``include_secret=True``: whoever holds it can
        rebuild every Poisson batch, which voids amplification by subsampling. A resumed sampler
        with a fresh seed/key draws fresh batches from the saved position on (steps are
        independent, so that is exactly as private); only bit-for-bit replay needs the secret,
        and then it must be stored apart from checkpoints.
        """
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "num_yielded": self._num_yielded,
            "secure_mode": self._secure_mode,
            "num_samples": self._num_samples,
            "sample_rate": self._sample_rate,
            "steps_per_epoch": self._steps_per_epoch,
            "num_micro_batches": self._num_micro_batches,
        }
        if include_secret and self._secure_mode:
            state["secure_key"] = self._key
        elif include_secret:
            state["seed"] = self._seed
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`: the next ``__iter__`` continues from the saved position.
        With the secret in the state (``include_secret=True``) it yields exactly the lists an
        uninterrupted run would have yielded; without it, fresh draws of this sampler's own
        seed/key.

        ``dp_rank``/``dp_size`` may differ from the saved run (the masks do not depend on them);
        ``num_samples``, ``sample_rate``, ``steps_per_epoch``, ``num_micro_batches`` and
        ``secure_mode`` must match. Invalidates live iterators.

        Raises:
            ValueError: on a malformed state or a configuration mismatch.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a mapping, got {type(state).__name__}")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"unsupported sampler state version {state.get('version')!r} "
                f"(expected {_STATE_VERSION})"
            )
        for name in ("secure_mode", "num_samples", "steps_per_epoch", "num_micro_batches"):
            if state.get(name) != getattr(self, name):
                raise ValueError(
                    f"sampler state has {name}={state.get(name)!r} but this sampler has "
                    f"{name}={getattr(self, name)!r}"
                )
        saved_rate = state.get("sample_rate")
        if saved_rate != self._sample_rate:
            raise ValueError(
                f"sampler state has sample_rate={saved_rate!r} but this sampler has "
                f"sample_rate={self._sample_rate!r}"
            )
        epoch, num_yielded = state.get("epoch"), state.get("num_yielded")
        if not _is_int(epoch) or epoch < 0:
            raise ValueError(f"sampler state has an invalid epoch {epoch!r}")
        if not _is_int(num_yielded) or not 0 <= num_yielded <= len(self):
            raise ValueError(
                f"sampler state has num_yielded={num_yielded!r}, expected an int in [0, {len(self)}]"
            )
        if self._secure_mode and "secure_key" in state:
            key = state["secure_key"]
            if key is None:
                raise ValueError("secure sampler state has secure_key=None")
            self._key = agree_on_key(key)  # a given key is only validated, no communication
        elif not self._secure_mode and "seed" in state:
            seed = state["seed"]
            if not _is_int(seed):
                raise ValueError(f"sampler state has an invalid seed {seed!r}")
            self._seed = int(seed)
        self._epoch = int(epoch)
        self._num_yielded = int(num_yielded)
        self._generation += 1

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self._num_samples}, "
            f"sample_rate={self._sample_rate}, dp_rank={self._dp_rank}, dp_size={self._dp_size}, "
            f"num_micro_batches={self._num_micro_batches}, "
            f"steps_per_epoch={self._steps_per_epoch}, secure_mode={self._secure_mode}, "
            f"epoch={self._epoch}, num_yielded={self._num_yielded})"
        )


# ---------------------------------------------------------------------- collation
def _map_leaves(value: Any, tensor_fn: Callable[[torch.Tensor, str], Any], other_fn, key=""):
    """Apply ``tensor_fn(tensor, key)`` to every tensor and ``other_fn(leaf)`` to every other
    leaf of a (nested) collated batch, keeping mappings, lists, tuples and namedtuples; ``key``
    is the name of the innermost mapping entry the leaf sits under."""
    if isinstance(value, torch.Tensor):
        return tensor_fn(value, key)
    if isinstance(value, Mapping):
        items = {k: _map_leaves(v, tensor_fn, other_fn, str(k)) for k, v in value.items()}
        try:
            return type(value)(items)
        except TypeError:
            return items
    if isinstance(value, tuple):
        items_t = [_map_leaves(v, tensor_fn, other_fn, key) for v in value]
        if hasattr(value, "_fields"):  # namedtuple
            return type(value)(*items_t)
        return tuple(items_t)
    if isinstance(value, list):
        return [_map_leaves(v, tensor_fn, other_fn, key) for v in value]
    return other_fn(value)


def _empty_like(value: Any) -> Any:
    """Slice every tensor in a (nested) collated batch to length 0 along dim 0."""
    return _map_leaves(value, lambda t, _: t[:0] if t.dim() > 0 else t, lambda leaf: leaf)


def _constant_fill(t: torch.Tensor, key: str) -> torch.Tensor:
    """A tensor of ``t``'s shape and dtype holding no value of ``t``: ones for attention-style
    masks (a key containing ``"mask"``: every position attended, no empty row), zeros otherwise
    (token id 0, label 0, zero features)."""
    return torch.full_like(t, 1 if "mask" in key.lower() else 0)


def stand_in_batch(template: Any) -> Any:
    """A batch with the structure, keys, shapes and dtypes of ``template`` (a collated batch) and
    none of its values: every tensor filled with a constant (:func:`_constant_fill`), every
    non-tensor leaf replaced by None. FSDP's discarded pass for an empty micro-batch runs on it,
    so that no record enters a forward pass that carries no record: forward passes have side
    effects (buffers a module updates in train mode) that nothing clips or noises."""
    return _map_leaves(template, _constant_fill, lambda leaf: None)


class _EmptyAwareCollate:
    """Picklable collate wrapper (usable with spawn-started DataLoader workers)."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any], dataset: Dataset) -> None:
        self.collate_fn = collate_fn
        self.dataset = dataset
        self._first: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_first": None}  # workers collate their own

    def __call__(self, samples: list[Any]) -> Any:
        if len(samples) > 0:
            return self.collate_fn(samples)
        return _empty_like(self.first_record())

    def first_record(self) -> Any:
        """``dataset[0]`` collated as a batch of one, collated once: the template of the
        structure, dtypes and shapes of a batch (empty batches, stand-ins, probes)."""
        if self._first is None:
            self._first = self.collate_fn([self.dataset[0]])
        return self._first

    def stand_in(self) -> Any:
        """A stand-in batch of one row that carries no record (:func:`stand_in_batch`): the
        structure and shapes of ``dataset[0]`` as collated, none of its values."""
        return stand_in_batch(self.first_record())


def collate_with_empty(
    collate_fn: Callable[[list[Any]], Any] | None, dataset: Dataset
) -> Callable[[list[Any]], Any]:
    """Wrap ``collate_fn`` so that an empty list of samples gives a well-formed empty batch.

    Non-empty lists go straight to ``collate_fn`` (``default_collate`` if ``None``). An empty
    list returns ``collate_fn([dataset[0]])`` with every tensor sliced to length 0 along dim 0,
    recursively through mappings, lists, tuples and namedtuples: the empty batch has the
    structure, dtypes and trailing shapes of a real one. Non-tensor leaves (and 0-dim tensors)
    are kept as ``collate_fn`` returned them for ``dataset[0]`` — only tensors are emptied. The
    returned callable is picklable if ``collate_fn`` and ``dataset`` are.
    """
    if isinstance(collate_fn, _EmptyAwareCollate):
        collate_fn = collate_fn.collate_fn
    return _EmptyAwareCollate(default_collate if collate_fn is None else collate_fn, dataset)


# ---------------------------------------------------------------------- data loader
def build_poisson_data_loader(
    data_loader: DataLoader,
    *,
    sample_rate: float,
    dp_rank: int = 0,
    dp_size: int = 1,
    num_micro_batches: int = 1,
    seed: int | None = None,
    secure_mode: bool = False,
    secure_key: bytes | None = None,
    group: dist.ProcessGroup | None = None,
    steps_per_epoch: int | None = None,
) -> DataLoader:
    """A new DataLoader over ``data_loader.dataset`` whose batches are Poisson samples.

    Its ``batch_sampler`` is a :class:`DistributedPoissonBatchSampler` (arguments as there;
    constructing it is a collective when the seed/key is agreed), its ``collate_fn`` is the
    original one wrapped with :func:`collate_with_empty`, and the worker settings
    (``num_workers``, ``pin_memory``, ``timeout``, ``worker_init_fn``,
    ``multiprocessing_context``, ``prefetch_factor``, ``persistent_workers``,
    ``pin_memory_device``, ``in_order``, ``generator``) are kept. The original ``batch_size``,
    ``shuffle``, ``sampler`` and ``drop_last`` are dropped: the Poisson sampler replaces them.

    If the original has no ``generator``, a dedicated one seeded from the sampling seed (or key)
    and ``dp_rank`` is used for the workers' base seed, so iterating the loader does not advance
    torch's global RNG and TP peers' workers get the same seeds.

    Raises:
        ValueError: for an ``IterableDataset`` (Poisson sampling needs indexable data) and for
            the sampler's invalid arguments.
    """
    dataset = data_loader.dataset
    if isinstance(dataset, IterableDataset):
        raise ValueError("Poisson sampling needs a map-style dataset, got an IterableDataset")
    sampler = DistributedPoissonBatchSampler(
        len(dataset),  # type: ignore[arg-type]
        sample_rate,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_micro_batches=num_micro_batches,
        steps_per_epoch=steps_per_epoch,
        seed=seed,
        secure_mode=secure_mode,
        secure_key=secure_key,
        group=group,
    )
    collate_fn = data_loader.collate_fn
    if collate_fn is default_convert:
        # The original loader did not batch (batch_size=None); the Poisson loader always does.
        collate_fn = default_collate
    generator = data_loader.generator
    if generator is None:
        secret = sampler._key if sampler.secure_mode else sampler.seed
        assert secret is not None
        generator = torch.Generator()
        generator.manual_seed(derive_seed(secret, "dataloader", dp_rank))
    kwargs: dict[str, Any] = {
        "batch_sampler": sampler,
        "collate_fn": collate_with_empty(collate_fn, dataset),
        "num_workers": data_loader.num_workers,
        "pin_memory": data_loader.pin_memory,
        "timeout": data_loader.timeout,
        "worker_init_fn": data_loader.worker_init_fn,
        "multiprocessing_context": data_loader.multiprocessing_context,
        "generator": generator,
        "persistent_workers": data_loader.persistent_workers,
    }
    if data_loader.num_workers > 0:
        kwargs["prefetch_factor"] = data_loader.prefetch_factor
    pin_memory_device = getattr(data_loader, "pin_memory_device", "")
    if pin_memory_device:
        kwargs["pin_memory_device"] = pin_memory_device
    if hasattr(data_loader, "in_order"):
        kwargs["in_order"] = data_loader.in_order
    return DataLoader(dataset, **kwargs)
