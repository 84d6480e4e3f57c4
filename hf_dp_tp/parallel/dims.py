"""The sizes of a run's parallelism, decided once: :class:`ParallelDims`, ``dp_replicate ×
dp_shard × tp`` ranks (torchtitan's named dims), and how the HF / accelerate idioms for sharded
data parallelism become those sizes.

- :func:`sharding_request` reads what the user asked for — Trainer's ``fsdp=...`` (with
  ``fsdp_config``), accelerate's ``parallelism_config=ParallelismConfig(...)``, or an
  ``accelerate launch`` FSDP / parallelism config (environment variables) — and refuses what
  DPTrainer cannot do. It only reads the environment; ``DPTrainingArguments`` calls it at
  construction (so a bad setting fails there) and keeps the answer.
- :meth:`ParallelDims.from_args` turns that request and the launch's world size into the sizes,
  checked once: DPTrainer and the engine example build the mesh from them
  (:meth:`ParallelDims.build_mesh`) and read ``fsdp_enabled`` & co. instead of the arguments.
- :func:`release_accelerate_sharding` turns accelerate's own FSDP / parallelism switches off,
  just before ``Trainer.__init__`` builds its ``Accelerator`` (which reads them): DPTrainer applies
  FSDP2 itself, after TP, and accelerate's plugin would reduce the non-private gradients.

Semantics of the sizes (as torchtitan's): without FSDP every DP rank is a full replica
(``dp_replicate = dp``, ``dp_shard = 1``); with FSDP the model is sharded over ``dp_shard`` ranks
and, under HSDP, replicated ``dp_replicate`` times. (:class:`~hf_dp_tp.parallel.MeshInfo`, which
describes one rank's groups, calls the FSDP group ``dp_shard`` and the whole DP group ``dp``.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .groups import collective_device_type, set_collective_timeout
from .mesh import init_dp_tp_mesh

#: accelerate's switches for its own FSDP plugin and parallelism config (set by ``accelerate
#: launch``); DPTrainer takes their request over and turns them off.
ACCELERATE_SWITCHES = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_PARALLELISM_CONFIG")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelDims:
    """``dp_replicate × dp_shard × tp`` ranks, validated once (sizes ≥ 1, product = world size).

    ``fsdp_requested``: FSDP was asked for explicitly (``fsdp="full_shard"``), which also holds
    when ``dp_shard`` is 1 (a single DP rank: ``fully_shard`` still wraps the model).
    """

    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int
    fsdp_requested: bool = False

    def __post_init__(self) -> None:
        sizes = {
            "dp_replicate": self.dp_replicate,
            "dp_shard": self.dp_shard,
            "tp": self.tp,
            "world_size": self.world_size,
        }
        for name, size in sizes.items():
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"ParallelDims: {name} must be an int ≥ 1, got {size!r}.")
        product = self.dp_replicate * self.dp_shard * self.tp
        if product != self.world_size:
            raise ValueError(
                f"dp_replicate={self.dp_replicate} × dp_shard={self.dp_shard} × tp={self.tp} = "
                f"{product} ranks, but the world has {self.world_size}: choose sizes whose "
                f"product is {self.world_size} (tp among {_divisors(self.world_size)})."
            )

    # ------------------------------------------------------------------ flags
    @property
    def dp_size(self) -> int:
        """Ranks that see different sub-batches: ``dp_replicate × dp_shard``."""
        return self.dp_replicate * self.dp_shard

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp_size > 1

    @property
    def fsdp_enabled(self) -> bool:
        """Whether the model is sharded by FSDP over DP (``dp_shard > 1`` or asked for)."""
        return self.dp_shard > 1 or self.fsdp_requested

    @property
    def hsdp_enabled(self) -> bool:
        """FSDP inside each of ``dp_replicate > 1`` replicas."""
        return self.fsdp_enabled and self.dp_replicate > 1

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_args(cls, args: Any, world_size: int, local_world_size: int) -> ParallelDims:
        """The sizes of a launch of ``world_size`` processes (``local_world_size`` per node) for
        ``DPTrainingArguments`` ``args``: ``tp_size`` and the sharding request the arguments took
        at construction (:func:`sharding_request`: ``dp_fully_shard``, ``dp_replicate_size``
        — None for ``fsdp="hybrid_shard"``, one replica per node —, ``dp_mesh_size``)."""
        tp = args.tp_size
        if world_size == 1 and tp > 1:
            raise ValueError(
                f"tp_size={tp} needs {tp} processes: launch with "
                f"`torchrun --nproc-per-node {tp} ...` or `accelerate launch`."
            )
        mesh_size = args.dp_mesh_size
        if mesh_size is not None and mesh_size * tp != world_size:
            raise ValueError(
                f"parallelism_config covers dp_replicate_size × dp_shard_size × tp_size = "
                f"{mesh_size * tp} ranks but the launch has {world_size}: make the sizes "
                "multiply to the number of processes."
            )
        replicas = args.dp_replicate_size if args.dp_fully_shard else 1
        if replicas is None:  # fsdp="hybrid_shard": one replica per node
            if local_world_size % tp != 0 or world_size % local_world_size != 0:
                raise ValueError(
                    f"fsdp='hybrid_shard' with {local_world_size} processes per node and tp_size="
                    f"{tp}: tp_size must divide the processes of a node."
                )
            replicas = world_size // local_world_size
        return cls.for_world(world_size, tp, fsdp=args.dp_fully_shard, replicas=replicas)

    @classmethod
    def for_world(
        cls, world_size: int, tp: int, *, fsdp: bool = False, replicas: int = 1
    ) -> ParallelDims:
        """The sizes for ``world_size`` ranks, TP over ``tp``: without ``fsdp`` every DP rank is
        a replica; with it the model is sharded over DP, or, with ``replicas`` r > 1 (HSDP),
        over ``dp / r`` ranks inside each of r replicas."""
        if tp < 1 or world_size % tp != 0:
            raise ValueError(
                f"tp_size={tp} must divide the world size {world_size}; choose a tp_size among "
                f"{_divisors(world_size)}."
            )
        dp = world_size // tp
        if replicas != 1 and not fsdp:
            raise ValueError(
                f"dp_replicate_size={replicas} without FSDP: HSDP replicates sharded groups "
                "(ask for FSDP too, or leave dp_replicate_size at 1)."
            )
        if not fsdp:
            return cls(dp_replicate=dp, dp_shard=1, tp=tp, world_size=world_size)
        if replicas < 1 or dp % replicas != 0:
            raise ValueError(
                f"dp_replicate_size={replicas} must divide the data-parallel size {dp} "
                f"(world {world_size} / tp_size {tp}); choose among {_divisors(dp)}."
            )
        return cls(
            dp_replicate=replicas,
            dp_shard=dp // replicas,
            tp=tp,
            world_size=world_size,
            fsdp_requested=True,
        )

    def build_mesh(
        self, device_type: str | None = None, timeout: timedelta | None = None
    ) -> DeviceMesh:
        """The ``("dp", "tp")`` mesh, or ``("dp_replicate", "dp_shard", "tp")`` under HSDP
        (:func:`~hf_dp_tp.parallel.init_dp_tp_mesh`). ``timeout`` bounds every collective on the
        default group and on the mesh's groups (which do not inherit it). ``device_type``
        defaults to the default group's (``"cuda"`` with NCCL, else ``"cpu"``)."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build_mesh needs torch.distributed initialised.")
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"ParallelDims for {self.world_size} ranks, but torch.distributed has "
                f"{dist.get_world_size()}: build the dims from the launch's world size."
            )
        if timeout is not None:
            set_collective_timeout(timeout)
        return init_dp_tp_mesh(
            self.tp,
            device_type or collective_device_type(),
            timeout=timeout,
            dp_replicate_size=self.dp_replicate if self.hsdp_enabled else 1,
        )


# --------------------------------------------------------------------------- HF / accelerate idioms
@dataclass(frozen=True)
class ShardingRequest:
    """What the arguments asked for: FSDP over DP (``fully_shard``), HSDP's number of replicas
    (1: none; None: one per node), the DP size a ``ParallelismConfig`` covers (None: any) and the
    TP degree (a ``ParallelismConfig`` sets it)."""

    fully_shard: bool
    dp_replicate_size: int | None
    dp_mesh_size: int | None
    tp_size: int


def _env_true(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def _launcher_fsdp(environ: Mapping[str, str], given: bool) -> set[str]:
    """The FSDP options of an ``accelerate launch`` FSDP config (environment variables), as
    Trainer's ``fsdp`` options. Refuses FSDP1, CPU offload and ``reshard_after_forward=False``
    (ZeRO-2)."""
    if not _env_true(environ, "ACCELERATE_USE_FSDP"):
        return set()
    if given:
        raise ValueError(
            "accelerate launch has an FSDP config and fsdp=... is set too: give FSDP once."
        )
    version = environ.get("FSDP_VERSION", "1")
    if version.strip() != "2":
        raise ValueError(
            f"accelerate's FSDP config has fsdp_version {version}: DPTrainer supports FSDP2 only "
            "(set fsdp_version: 2)."
        )
    if _env_true(environ, "FSDP_OFFLOAD_PARAMS"):
        raise ValueError(
            "accelerate's FSDP config offloads parameters: not supported by DPTrainer."
        )
    reshard = environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower()
    if reshard in ("false", "0", "shard_grad_op", "no_shard"):
        raise ValueError(
            f"accelerate's FSDP config has fsdp_reshard_after_forward={reshard}: DPTrainer "
            "supports full (or hybrid) sharding only."
        )
    strategy = environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip().upper()
    return {"hybrid_shard"} if strategy in ("HYBRID_SHARD", "4") else {"full_shard"}


def _launcher_parallelism_config(environ: Mapping[str, str]):
    """The ``ParallelismConfig`` an ``accelerate launch`` config asked for, or None."""
    if not _env_true(environ, "ACCELERATE_USE_PARALLELISM_CONFIG"):
        return None
    from accelerate import ParallelismConfig  # optional: only when accelerate launched it

    return ParallelismConfig()  # reads PARALLELISM_CONFIG_* from the environment


def _parallelism_config_sizes(parallelism, tp_size: int) -> tuple[int, bool, int, int]:
    """``(dp_replicate_size, fsdp, dp_mesh_size, tp_size)`` of an accelerate
    ``ParallelismConfig``."""
    sizes = {
        name: int(getattr(parallelism, name, None) or 1)
        for name in ("dp_replicate_size", "dp_shard_size", "tp_size", "cp_size", "sp_size")
    }
    if sizes["cp_size"] > 1 or sizes["sp_size"] > 1:
        raise ValueError(
            "parallelism_config with cp_size or sp_size > 1: context / sequence parallelism "
            "is not supported by DPTrainer (per-sample gradients need each sample's tokens "
            "on one TP group)."
        )
    if tp_size not in (1, sizes["tp_size"]):
        raise ValueError(
            f"tp_size={tp_size} but parallelism_config.tp_size={sizes['tp_size']}: give "
            "the TP degree once (parallelism_config alone is enough)."
        )
    fsdp = sizes["dp_shard_size"] > 1
    mesh_size = sizes["dp_replicate_size"] * sizes["dp_shard_size"]
    return sizes["dp_replicate_size"], fsdp, mesh_size, sizes["tp_size"]


def sharding_request(
    fsdp: Any,
    fsdp_config: Any,
    parallelism_config: Any,
    tp_size: int,
    environ: Mapping[str, str] | None = None,
) -> ShardingRequest:
    """The sharded data parallelism the HF idioms ask for, which DPTrainer applies itself after
    TP (``fully_shard`` per decoder layer then the root,
    :func:`~hf_dp_tp.parallel.fully_shard_over_dp`); accelerate's FSDP plugin is never used (it
    would reduce the non-private gradients and wrap the model before TP).

    - Trainer's ``fsdp="full_shard"``: FSDP2 over every DP rank. ``fsdp="hybrid_shard"``: HSDP,
      FSDP inside a node and one replica per node (``dp_replicate_size`` None: the number of
      nodes, known at launch). ``"auto_wrap"`` may accompany either (the wrapping is always per
      decoder layer); offload and ZeRO-2 style options are refused.
    - ``accelerate launch`` with an FSDP2 config (``ACCELERATE_USE_FSDP``, ``FSDP_*`` in
      ``environ``, default ``os.environ``) is taken as ``fsdp="full_shard"``, or
      ``"hybrid_shard"`` for that sharding strategy; one with a parallelism config
      (``ACCELERATE_USE_PARALLELISM_CONFIG``) as its ``ParallelismConfig``. The environment is
      only read here (:func:`release_accelerate_sharding` turns the switches off later).
    - accelerate's ``parallelism_config=ParallelismConfig(dp_replicate_size=r, dp_shard_size=s,
      tp_size=t)``: TP over t, FSDP over s (when s > 1), replicas over r; it sets the TP degree
      and must cover the world (``dp_mesh_size`` r·s, checked by
      :meth:`ParallelDims.from_args`). Context and sequence parallelism are refused.
    """
    environ = os.environ if environ is None else environ
    options = fsdp.split() if isinstance(fsdp, str) else [str(o) for o in (fsdp or [])]
    options = {o.split(".")[-1].lower() for o in options}
    options |= _launcher_fsdp(environ, bool(options))
    parallelism = parallelism_config
    if parallelism is None:
        parallelism = _launcher_parallelism_config(environ)
    if options and parallelism is not None:
        raise ValueError(
            "give the sharding either as fsdp=... or as parallelism_config=ParallelismConfig"
            "(...), not both."
        )
    shard_options = options - {"auto_wrap"}
    if options and shard_options not in ({"full_shard"}, {"hybrid_shard"}):
        raise ValueError(
            f"fsdp={fsdp!r}: DPTrainer supports fsdp='full_shard' (FSDP2 over the DP "
            "dimension, on top of tp_size) and fsdp='hybrid_shard' (FSDP inside a node, one "
            "replica per node), optionally with 'auto_wrap'; offload and shard_grad_op "
            "options are not supported."
        )
    config = fsdp_config or {}
    if options and isinstance(config, dict):
        version = config.get("fsdp_version", config.get("version", 2))
        if int(version) != 2:
            raise ValueError(f"fsdp_config fsdp_version={version}: only FSDP2 is supported.")
    replicate: int | None = 1
    mesh_size, sharded = None, bool(options)
    if options == {"hybrid_shard"} or shard_options == {"hybrid_shard"}:
        replicate = None  # one replica per node
    if parallelism is not None:
        replicate, sharded, mesh_size, tp_size = _parallelism_config_sizes(parallelism, tp_size)
    return ShardingRequest(
        fully_shard=sharded,
        dp_replicate_size=replicate if sharded else 1,
        dp_mesh_size=mesh_size,
        tp_size=tp_size,
    )


def release_accelerate_sharding(environ: MutableMapping[str, str] | None = None) -> None:
    """Turn accelerate's FSDP and parallelism-config switches (:data:`ACCELERATE_SWITCHES`) off
    in ``environ`` (default ``os.environ``), so that the ``Accelerator`` ``Trainer.__init__``
    builds applies neither: DPTrainer took their request over (:func:`sharding_request`) and
    applies FSDP2 itself, after TP. Call it before ``Trainer.__init__``."""
    environ = os.environ if environ is None else environ
    for name in ACCELERATE_SWITCHES:
        if _env_true(environ, name):
            environ[name] = "false"
