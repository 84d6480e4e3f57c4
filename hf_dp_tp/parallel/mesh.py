"""The ``("dp", "tp")`` device mesh (or ``("dp_replicate", "dp_shard", "tp")`` for HSDP), its
named dims, and this rank's groups on it (:class:`MeshInfo`).

Vocabulary (see "The DP-SGD contract" in docs/usage.md): ranks of one **TP group** hold different
shards of the same model and see the same batch; ranks of one **DP group** see disjoint
sub-batches. Under HSDP the DP group is the product of ``dp_replicate`` (full replicas) and
``dp_shard`` (FSDP shards of one replica), flattened as ``"dp"``. Every reduction in this package
names one of those groups, never WORLD.

The sizes of the dims are decided once, by :class:`hf_dp_tp.parallel.dims.ParallelDims`, whose
``build_mesh`` calls :func:`init_dp_tp_mesh`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from .groups import collective_device_type, set_collective_timeout

DP_DIM = "dp"
TP_DIM = "tp"
DP_REPLICATE_DIM = "dp_replicate"
DP_SHARD_DIM = "dp_shard"
DP_DIMS = (DP_DIM, DP_REPLICATE_DIM, DP_SHARD_DIM)


def init_dp_tp_mesh(
    tp_size: int,
    device_type: str | None = None,
    timeout: timedelta | None = None,
    *,
    dp_replicate_size: int = 1,
) -> DeviceMesh:
    """Build the device mesh over all ranks.

    - ``dp_replicate_size`` 1 (default): the 2-D ``("dp", "tp")`` mesh, ``dp_size = world_size //
      tp_size``.
    - ``dp_replicate_size`` r > 1 (HSDP): the 3-D ``("dp_replicate", "dp_shard", "tp")`` mesh with
      ``dp_shard = world_size // (r · tp_size)``; its two DP dims are also flattened as ``"dp"``
      (``mesh["dp"]``: every rank that sees a different sub-batch).

    TP groups are blocks of ``tp_size`` consecutive ranks (ranks on one node share the fast links);
    the replicas of HSDP are the outermost blocks (one per node or group of nodes).
    ``timeout`` bounds every collective on the mesh's groups (they do not inherit the default
    group's timeout: without it, torch's default applies).
    """
    if not dist.is_initialized():
        raise RuntimeError("init_dp_tp_mesh needs torch.distributed to be initialised first.")
    world = dist.get_world_size()
    if tp_size < 1 or world % tp_size != 0:
        raise ValueError(
            f"tp_size={tp_size} must divide the world size {world}; choose a tp_size among "
            f"{[d for d in range(1, world + 1) if world % d == 0]}."
        )
    dp_size = world // tp_size
    if dp_replicate_size < 1 or dp_size % dp_replicate_size != 0:
        raise ValueError(
            f"dp_replicate_size={dp_replicate_size} must divide the data-parallel size {dp_size} "
            f"(world {world} / tp_size {tp_size}); choose among "
            f"{[d for d in range(1, dp_size + 1) if dp_size % d == 0]}."
        )
    if device_type is None:
        device_type = collective_device_type()
    if dp_replicate_size == 1:
        mesh = init_device_mesh(device_type, (dp_size, tp_size), mesh_dim_names=(DP_DIM, TP_DIM))
        dims: tuple[str, ...] = (DP_DIM, TP_DIM)
    else:
        shape = (dp_replicate_size, dp_size // dp_replicate_size, tp_size)
        mesh = init_device_mesh(
            device_type, shape, mesh_dim_names=(DP_REPLICATE_DIM, DP_SHARD_DIM, TP_DIM)
        )
        mesh[(DP_REPLICATE_DIM, DP_SHARD_DIM)]._flatten(DP_DIM)
        dims = (DP_REPLICATE_DIM, DP_SHARD_DIM, DP_DIM, TP_DIM)
    if timeout is not None:
        for dim in dims:
            set_collective_timeout(timeout, dim_mesh(mesh, dim).get_group())
    return mesh


def dim_mesh(mesh: DeviceMesh, dim: str) -> DeviceMesh:
    """``mesh[dim]``, also for the flattened ``"dp"`` dim of an HSDP mesh (kept by the mesh)."""
    if dim == DP_DIM and DP_REPLICATE_DIM in (mesh.mesh_dim_names or ()):
        return mesh[(DP_REPLICATE_DIM, DP_SHARD_DIM)]._flatten(DP_DIM)  # the cached one
    return mesh[dim]


def _check_mesh_dims(names: tuple[str, ...] | None) -> None:
    allowed = ((DP_DIM, TP_DIM), (DP_SHARD_DIM, TP_DIM), (DP_REPLICATE_DIM, DP_SHARD_DIM, TP_DIM))
    if names is None or tuple(names) not in allowed:
        raise ValueError(
            f"device_mesh dims {names}: expected ('dp', 'tp') or, for HSDP, ('dp_replicate', "
            "'dp_shard', 'tp') (hf_dp_tp.init_dp_tp_mesh builds both)."
        )


@dataclass(frozen=True)
class MeshInfo:
    """The process groups of one rank, with its coordinates in each.

    ``tp_group`` is None when there is no tensor parallelism (tp_size 1); ``dp_group`` is None when
    there is a single data-parallel rank (dp_size 1). ``dp_shard_*`` is the DP dim FSDP shards
    over and ``dp_replicate_*`` the one HSDP replicates over (``dp = dp_replicate × dp_shard``);
    without HSDP ``dp_shard`` is ``dp`` and there is one replica.
    """

    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    tp_rank: int = 0
    tp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_mesh: DeviceMesh | None = None
    dp_shard_group: dist.ProcessGroup | None = None
    dp_shard_rank: int | None = None
    dp_shard_size: int | None = None
    dp_replicate_group: dist.ProcessGroup | None = None
    dp_replicate_rank: int = 0
    dp_replicate_size: int = 1

    def __post_init__(self) -> None:
        if self.dp_shard_size is None:  # no HSDP: FSDP (if any) shards over the whole DP group
            object.__setattr__(self, "dp_shard_group", self.dp_group)
            object.__setattr__(self, "dp_shard_rank", self.dp_rank)
            object.__setattr__(self, "dp_shard_size", self.dp_size)

    def tp_root(self) -> int:
        """Global rank of TP rank 0 of this rank's TP group (the source of replicated values)."""
        return dist.get_global_rank(self.tp_group, 0) if self.tp_group is not None else 0

    def all_reduce_tp(self, tensor: torch.Tensor) -> torch.Tensor:
        return _all_reduce(tensor, self.tp_group, self.tp_size)

    def all_reduce_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        return _all_reduce(tensor, self.dp_group, self.dp_size)

    def all_reduce_dp_shard(self, tensor: torch.Tensor) -> torch.Tensor:
        return _all_reduce(tensor, self.dp_shard_group, self.dp_shard_size)

    def all_reduce_dp_replicate(self, tensor: torch.Tensor) -> torch.Tensor:
        return _all_reduce(tensor, self.dp_replicate_group, self.dp_replicate_size)

    def broadcast_tp(self, tensor: torch.Tensor) -> torch.Tensor:
        """Overwrite ``tensor`` with TP rank 0's copy, on every rank of the TP group."""
        if self.tp_group is not None and self.tp_size > 1:
            dist.broadcast(tensor, src=self.tp_root(), group=self.tp_group)
        return tensor


def _all_reduce(
    tensor: torch.Tensor, group: dist.ProcessGroup | None, size: int | None
) -> torch.Tensor:
    if group is not None and (size or 1) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def _dp_info(device_mesh: DeviceMesh) -> dict:
    """The DP fields of :class:`MeshInfo` for a mesh with dims ``("dp"|"dp_shard", "tp")`` or
    ``("dp_replicate", "dp_shard", "tp")``."""
    names = tuple(device_mesh.mesh_dim_names)
    if DP_REPLICATE_DIM not in names:
        dp_mesh = device_mesh[names[0]]
        return dict(
            dp_group=dp_mesh.get_group(), dp_rank=dp_mesh.get_local_rank(), dp_size=dp_mesh.size()
        )
    dp_mesh = dim_mesh(device_mesh, DP_DIM)
    shard, replicate = device_mesh[DP_SHARD_DIM], device_mesh[DP_REPLICATE_DIM]
    return dict(
        dp_group=dp_mesh.get_group(),
        dp_rank=dp_mesh.get_local_rank(),
        dp_size=dp_mesh.size(),
        dp_shard_group=shard.get_group(),
        dp_shard_rank=shard.get_local_rank(),
        dp_shard_size=shard.size(),
        dp_replicate_group=replicate.get_group(),
        dp_replicate_rank=replicate.get_local_rank(),
        dp_replicate_size=replicate.size(),
    )


def _group_ranks(mesh: DeviceMesh) -> list[int]:
    return sorted(int(r) for r in mesh.mesh.flatten().tolist())


def _dtensor_meshes(module: nn.Module) -> list[DeviceMesh]:
    meshes: list[DeviceMesh] = []
    for p in module.parameters():
        if isinstance(p, DTensor) and all(p.device_mesh is not m for m in meshes):
            meshes.append(p.device_mesh)
    return meshes


def has_dtensor_parameters(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def resolve_mesh(module: nn.Module, device_mesh: DeviceMesh | None, *, tp: bool) -> MeshInfo:
    """Work out the TP and DP groups of this rank.

    - ``device_mesh`` with dims ``("dp", "tp")`` or ``("dp_replicate", "dp_shard", "tp")``
      (HSDP): used as is.
    - ``device_mesh`` 1-D: a TP mesh; there must be no other ranks (dp_size 1).
    - ``None`` in TP mode: the 1-D mesh of the model's DTensor parameters, which must span every
      rank; with data parallelism as well, pass the 2-D mesh explicitly.
    - ``tp=False`` (``"hooks"`` mode): no TP group; every rank is a DP replica.
    """
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else 1
    if not tp:
        if device_mesh is not None and device_mesh.ndim >= 2:
            _check_mesh_dims(device_mesh.mesh_dim_names)
            if device_mesh[TP_DIM].size() != 1:
                raise ValueError("grad_sample_mode='hooks' cannot run on a mesh with tp size > 1.")
            return MeshInfo(**_dp_info(device_mesh))
        if world > 1:
            return MeshInfo(dp_group=dist.group.WORLD, dp_rank=dist.get_rank(), dp_size=world)
        return MeshInfo()

    if device_mesh is None:
        meshes = _dtensor_meshes(module)
        if not meshes:
            raise ValueError(
                "grad_sample_mode='tp' needs a tensor-parallel model (DTensor parameters) or an "
                "explicit device_mesh; for a model without TP use grad_sample_mode='hooks'."
            )
        device_mesh = meshes[0]
        if device_mesh.ndim != 1:
            raise ValueError(
                f"the model's parameters live on a {device_mesh.ndim}-D mesh; only 1-D TP meshes "
                "are supported. Pass device_mesh=init_dp_tp_mesh(tp_size)."
            )
        if device_mesh.size() != world:
            raise ValueError(
                f"the model's TP mesh spans {device_mesh.size()} of {world} ranks: with data "
                "parallelism too, pass the 2-D mesh as device_mesh (hf_dp_tp.init_dp_tp_mesh)."
            )
    if device_mesh.ndim >= 2:
        _check_mesh_dims(device_mesh.mesh_dim_names)
        tp_mesh = device_mesh[TP_DIM]
        dp_info = _dp_info(device_mesh)
    elif device_mesh.ndim == 1:
        tp_mesh = device_mesh
        if tp_mesh.size() != world:
            raise ValueError(
                f"a 1-D device_mesh of {tp_mesh.size()} ranks in a world of {world}: pass the 2-D "
                "('dp', 'tp') mesh (hf_dp_tp.init_dp_tp_mesh) so the DP groups are known."
            )
        dp_info = {}
    else:
        raise ValueError(
            f"device_mesh must be 1-D (tp), 2-D (dp, tp) or 3-D (dp_replicate, dp_shard, tp), got "
            f"{device_mesh.ndim}-D."
        )

    tp_ranks = _group_ranks(tp_mesh)
    for meshes_of_param in _dtensor_meshes(module):
        if is_fsdp_mesh(meshes_of_param):  # FSDP over DP (and TP): checked by param_layout
            continue
        if _group_ranks(meshes_of_param) != tp_ranks:
            raise ValueError(
                f"a DTensor parameter lives on mesh ranks {_group_ranks(meshes_of_param)}, not on "
                f"this rank's TP group {tp_ranks}: parallelize the model over device_mesh['tp']."
            )
    return MeshInfo(
        tp_group=tp_mesh.get_group(),
        tp_rank=tp_mesh.get_local_rank(),
        tp_size=tp_mesh.size(),
        tp_mesh=tp_mesh,
        **dp_info,
    )


def is_fsdp_mesh(mesh: DeviceMesh) -> bool:
    """Whether a parameter's mesh includes a data-parallel dim (``"dp"``, ``"dp_shard"``,
    ``"dp_replicate"``): the parameter is then sharded by FSDP over DP (``fully_shard`` over
    :func:`fsdp_mesh_of`), replicated over ``"dp_replicate"`` under HSDP, and sharded over TP too
    when the mesh has a ``"tp"`` dim."""
    return any(dim in DP_DIMS for dim in (mesh.mesh_dim_names or ()))
