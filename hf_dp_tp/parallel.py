"""The ``("dp", "tp")`` device mesh (or ``("dp_replicate", "dp_shard", "tp")`` for HSDP) and how
each parameter is laid out on it.

Vocabulary (see "The DP-SGD contract" in docs/usage.md): ranks of one **TP group** hold different
shards of the same model and see the same batch; ranks of one **DP group** see disjoint
sub-batches. Under HSDP the DP group is the product of ``dp_replicate`` (full replicas) and
``dp_shard`` (FSDP shards of one replica), flattened as ``"dp"``. Every reduction in this package
names one of those groups, never WORLD.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

DP_DIM = "dp"
TP_DIM = "tp"
DP_REPLICATE_DIM = "dp_replicate"
DP_SHARD_DIM = "dp_shard"
DP_DIMS = (DP_DIM, DP_REPLICATE_DIM, DP_SHARD_DIM)


def init_distributed(timeout: timedelta | None = None) -> torch.device:
    """Initialise torch.distributed from the launcher's environment (torchrun, accelerate) and
    return this process's device: NCCL with one GPU per process when the node has at least as
    many GPUs as local processes, otherwise gloo on CPU with the cores split between them.

    ``timeout`` bounds every collective on the default group (torch's default otherwise: 30 min
    for gloo, 10 min for NCCL): a rank that stops responding makes the others fail after it."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    kwargs = {} if timeout is None else {"timeout": timeout}
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", **kwargs)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        dist.init_process_group("gloo", **kwargs)
    return device


def set_collective_timeout(timeout: timedelta, group: dist.ProcessGroup | None = None) -> None:
    """Bound every later collective on ``group`` (default: the default group) by ``timeout``.

    Sub-groups (``new_group``, a ``DeviceMesh``'s dims) do not inherit the default group's
    timeout, and accelerate does not pass ``ddp_timeout`` on to CPU (gloo) runs; this sets it
    after the fact."""
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if setter is not None:
        setter(timeout, group)


def destroy_process_groups(timeout: timedelta = timedelta(seconds=60)) -> None:
    """Tear torch.distributed down (the mesh's sub-groups included); a no-op if it is not up.

    Under gloo every rank first waits for its peers (bounded by ``timeout``, so a rank left behind
    by a failed peer still exits): a rank tearing gloo down while another still completes the last
    collective aborts one of them ("terminate called without an active exception")."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=timeout)
        except RuntimeError:
            pass
    dist.destroy_process_group()


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
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
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


def fsdp_mesh_of(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh ``fully_shard`` takes: ``mesh["dp"]`` of a ``("dp", "tp")`` mesh, the 2-D
    ``("dp_replicate", "dp_shard")`` sub-mesh of an HSDP mesh (replicate over the first dim, shard
    over the second), a 1-D mesh as it is."""
    names = tuple(mesh.mesh_dim_names or ())
    if DP_REPLICATE_DIM in names:
        return mesh[(DP_REPLICATE_DIM, DP_SHARD_DIM)]
    return mesh[names[0]] if mesh.ndim == 2 else mesh


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


@dataclass(frozen=True)
class ParamLayout:
    """Where this rank's local piece of a parameter sits in the full parameter.

    ``shard_dim`` is None for a replicated parameter (every TP rank holds all of it); otherwise the
    local tensor is ``full.narrow(shard_dim, offset, length)`` — or, for a packed parameter
    (``split_factor`` s > 1, DTensor ``_StridedShard``: e.g. a fused q|k|v projection), the
    concatenation over the s equal blocks of ``shard_dim`` of each block's slice ``(offset,
    length / s)``.
    """

    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    shard_dim: int | None = None
    offset: int = 0
    length: int = 0
    split_factor: int = 1

    @property
    def sharded(self) -> bool:
        return self.shard_dim is not None

    def describe(self) -> str:
        if self.shard_dim is None:
            return "Replicate()"
        if self.split_factor != 1:
            return f"_StridedShard({self.shard_dim}, split_factor={self.split_factor})"
        return f"Shard({self.shard_dim})"

    def take_local(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's piece of ``full`` (full size along ``dim``, which stands for
        ``shard_dim``)."""
        if self.split_factor == 1:
            return full.narrow(dim, self.offset, self.length)
        block = full.shape[dim] // self.split_factor
        piece = self.length // self.split_factor
        return torch.cat(
            [full.narrow(dim, k * block + self.offset, piece) for k in range(self.split_factor)],
            dim=dim,
        )


def shard_extent(size: int, rank: int, world: int) -> tuple[int, int]:
    """``(offset, length)`` of rank ``rank``'s slice when ``size`` is sharded over ``world`` ranks
    (torch.chunk semantics, as DTensor ``Shard``: ceil-sized leading chunks)."""
    chunk = -(-size // world)
    offset = min(rank * chunk, size)
    return offset, max(0, min(chunk, size - offset))


def full_state_dict(
    model: nn.Module, keep: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """Entries of ``model.state_dict()`` (those ``keep`` accepts) as full CPU copies, never views
    of the parameters. A collective for DTensor entries: every rank must call it. Tied entries
    stay one tensor, as ``save_pretrained`` expects."""
    gathered: dict[int, torch.Tensor] = {}
    out = {}
    with _quiet_sequential_gathers():
        for name, tensor in model.state_dict().items():
            if not isinstance(tensor, torch.Tensor) or (keep is not None and not keep(name)):
                continue
            key = id(tensor)
            if key not in gathered:
                full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
                gathered[key] = full.detach().to("cpu", copy=True).contiguous()
            out[name] = gathered[key]
    return out


@contextlib.contextmanager
def _quiet_sequential_gathers() -> Iterator[None]:
    """Gathering an FSDP × TP parameter (``_StridedShard`` over dp, ``Shard`` over tp) to
    ``Replicate`` takes two all-gathers, one per mesh dim, and torch's DTensor logs a warning that
    this is "suboptimal" and "may give inconsistent results between ranks due to different
    reduction orders". An all-gather reduces nothing — every rank receives the same bytes — so the
    gathered tensor is exact; the extra latency is one more gather per parameter when a full
    checkpoint is written. That logger is raised to ERROR for these gathers only."""
    redistribute_logger = logging.getLogger("torch.distributed.tensor._redistribute")
    level = redistribute_logger.level
    redistribute_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        redistribute_logger.setLevel(level)


def is_fsdp_mesh(mesh: DeviceMesh) -> bool:
    """Whether a parameter's mesh includes a data-parallel dim (``"dp"``, ``"dp_shard"``,
    ``"dp_replicate"``): the parameter is then sharded by FSDP over DP (``fully_shard`` over
    :func:`fsdp_mesh_of`), replicated over ``"dp_replicate"`` under HSDP, and sharded over TP too
    when the mesh has a ``"tp"`` dim."""
    return any(dim in DP_DIMS for dim in (mesh.mesh_dim_names or ()))


def param_layout(param: torch.Tensor, name: str = "parameter") -> ParamLayout:
    """Classify a parameter as replicated or sharded on its TP mesh; reject anything else.

    For a parameter FSDP shards over the DP dim (:func:`is_fsdp_mesh`), the layout is that of the
    TP-local *unsharded* weight the module computes with (what per-sample gradients, norms and
    clipped sums are taken on): its TP placement, or replicated when it lives on the DP mesh
    only. Its FSDP shard is only where the final gradient is written.
    """
    if not isinstance(param, DTensor):
        shape = tuple(param.shape)
        return ParamLayout(shape, shape)
    mesh = param.device_mesh
    global_shape = tuple(param.shape)
    if is_fsdp_mesh(mesh):
        names = tuple(mesh.mesh_dim_names)
        others = tuple(dim for dim in names if dim not in DP_DIMS)
        if others == ():
            return ParamLayout(global_shape, global_shape)
        if others != (TP_DIM,):
            raise ValueError(
                f"{name}: DTensor on a mesh with dims {names}: FSDP parameters must live on the "
                "('dp', 'tp') or ('dp_replicate', 'dp_shard', 'tp') mesh or its DP dims."
            )
        placement = param.placements[names.index(TP_DIM)]
        return _tp_layout(name, placement, global_shape, mesh[TP_DIM], None, param.ndim)
    if mesh.ndim != 1:
        raise ValueError(
            f"{name}: DTensor on a {mesh.ndim}-D mesh {param.placements} is not "
            "supported; parameters must be sharded on the 1-D TP mesh (or by FSDP over a 'dp' "
            "mesh dim)."
        )
    (placement,) = param.placements
    local_shape = tuple(param.to_local().shape)
    return _tp_layout(name, placement, global_shape, mesh, local_shape, param.ndim)


def _tp_layout(
    name: str,
    placement,
    global_shape: tuple[int, ...],
    mesh: DeviceMesh,
    local_shape: tuple[int, ...] | None,
    ndim: int,
) -> ParamLayout:
    """The layout of ``placement`` on the 1-D TP ``mesh`` (``local_shape`` None: derived)."""
    if isinstance(placement, Replicate):
        return ParamLayout(global_shape, global_shape if local_shape is None else local_shape)
    if isinstance(placement, _StridedShard):
        dim = placement.dim % ndim
        factor = placement.split_factor
        block, uneven = divmod(global_shape[dim], factor)
        offset, piece = shard_extent(block, mesh.get_local_rank(), mesh.size())
        if local_shape is None:
            local_shape = tuple(
                piece * factor if d == dim else n for d, n in enumerate(global_shape)
            )
        if uneven or block % mesh.size() != 0 or local_shape[dim] != piece * factor:
            raise ValueError(
                f"{name}: {placement} of size {global_shape[dim]} over {mesh.size()} ranks: only "
                "packed dims whose blocks split evenly over the TP ranks are supported."
            )
        return ParamLayout(global_shape, local_shape, dim, offset, piece * factor, factor)
    if isinstance(placement, Shard):
        dim = placement.dim % ndim
        size = global_shape[dim]
        rank, world = mesh.get_local_rank(), mesh.size()
        offset, length = shard_extent(size, rank, world)
        if local_shape is None:
            local_shape = tuple(length if d == dim else n for d, n in enumerate(global_shape))
        if local_shape[dim] != length:
            raise ValueError(
                f"{name}: local shard of size {local_shape[dim]} on dim {dim} does not match the "
                f"even split ({length}) this package expects for {placement}."
            )
        return ParamLayout(global_shape, local_shape, dim, offset, length)
    if isinstance(placement, Partial):
        raise ValueError(f"{name}: a Partial() parameter has no per-sample gradient meaning.")
    raise ValueError(f"{name}: unsupported placement {placement}.")


def fully_shard_over_dp(model: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
    """FSDP2 over the DP dims of the mesh, after TP (as torchtitan does): ``fully_shard`` on every
    block the model lists in ``_no_split_modules`` (its decoder layers), then on the root, over
    :func:`fsdp_mesh_of` (``"dp"``, or HSDP's ``("dp_replicate", "dp_shard")``). Parameters,
    gradients and optimizer state are then sharded over ``dp_shard`` too."""
    from torch.distributed.fsdp import fully_shard

    dp_mesh = fsdp_mesh_of(device_mesh)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return model


# --------------------------------------------------------------------------- TP plans
HF_STYLE_ATTR = "_hf_dp_tp_style"


def installed_tp_style(module: nn.Module) -> str | None:
    """Name of the transformers TP style installed on ``module``, else None.

    Read from :data:`~hf_dp_tp.parallel.HF_STYLE_ATTR` (set by ``apply_tp_plan``), else from the
    style object captured by the forward transformers installed (``from_pretrained`` with a
    ``DistributedConfig``). An installed style that is not a registered one gives ``"<ClassName>"``.
    """
    recorded = getattr(module, HF_STYLE_ATTR, None)
    if recorded is not None:
        return recorded
    forward = module.__dict__.get("forward")
    if forward is None:
        return None
    try:
        style_obj = inspect.getclosurevars(forward).nonlocals.get("self")
    except TypeError:
        return None
    if style_obj is None:
        return None
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES, TensorParallelLayer

    for name, style in ALL_PARALLEL_STYLES.items():
        if style is style_obj:
            return name
    if isinstance(style_obj, TensorParallelLayer):
        return f"<{type(style_obj).__name__}>"
    return None


def check_tp_divisibility(config, tp_size: int) -> None:
    """Fail early when attention heads cannot be split over ``tp_size`` ranks (transformers
    loads such a model and only crashes later, in forward)."""
    if config is None or tp_size == 1:
        return
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = {
        field: getattr(text_config, field, None)
        for field in ("num_attention_heads", "num_key_value_heads")
    }
    heads = {field: n for field, n in heads.items() if isinstance(n, int) and n > 0}
    for field, n in heads.items():
        if n % tp_size != 0:
            # a tp_size must divide every head count: suggest only the common divisors
            common = [d for d in range(1, n + 1) if all(m % d == 0 for m in heads.values())]
            counts = ", ".join(f"{f}={m}" for f, m in heads.items())
            raise ValueError(
                f"{field}={n} is not divisible by tp_size={tp_size}: choose a tp_size that "
                f"divides every head count ({counts}), e.g. {common}."
            )


def apply_tp_plan(
    model: nn.Module, tp_mesh: DeviceMesh, plan: str | dict[str, object] = "auto"
) -> nn.Module:
    """Shard ``model`` in place over the 1-D ``tp_mesh``.

    ``plan`` is ``"auto"`` (the model's own HF ``tp_plan``) or a dict from module names — with
    ``*`` for layer numbers, as in HF plans — to either an HF style name (``"colwise"``,
    ``"rowwise"``, ``"embedding_rowwise"``, ``"sequence_parallel"``, ...) or a torch
    ``ParallelStyle`` (``ColwiseParallel()``, ``SequenceParallel()``, ...). Every rank must hold
    the same full weights: each keeps its own slice, with no communication.
    """
    from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard
    from transformers.distributed.tensor_parallel import (
        ALL_PARALLEL_STYLES,
        apply_tensor_parallelism,
    )

    if tp_mesh.ndim != 1:
        raise ValueError("apply_tp_plan needs the 1-D TP mesh (device_mesh['tp']).")
    from_model = plan == "auto"
    if from_model:
        plan = dict(getattr(model, "tp_plan", None) or {})
        if not plan:
            raise ValueError(
                f"{type(model).__name__} has no HF tp_plan, so tp_plan='auto' cannot shard it. "
                + _explicit_plan_hint(model)
            )
    if not isinstance(plan, dict):
        raise TypeError(f"tp plan must be 'auto' or a dict, got {type(plan).__name__}")
    check_tp_divisibility(getattr(model, "config", None), tp_mesh.size())

    hf_plan: dict[str, str] = {}
    torch_plan: dict[str, ParallelStyle] = {}
    used: set[str] = set()
    names = [n for n, _ in model.named_modules() if n] + [n for n, _ in model.named_parameters()]
    for name in names:
        key = name if name in plan else replace_layer_number_by_wildcard(name)
        if key not in plan:
            continue
        used.add(key)
        style = plan[key]
        if isinstance(style, ParallelStyle):
            torch_plan[name] = style
        elif isinstance(style, str):
            if style not in ALL_PARALLEL_STYLES:
                raise ValueError(
                    f"unknown TP style {style!r} for {name}; HF styles: "
                    f"{sorted(ALL_PARALLEL_STYLES.keys())}, or pass a torch ParallelStyle."
                )
            hf_plan[name] = style
        else:
            raise TypeError(f"plan entry {key!r}: expected a style name or ParallelStyle")
    # an HF plan lists every module its architecture may have (dense and MoE MLPs, optional
    # norms): only a plan the user wrote must match in full
    if (unused := set(plan) - used) and not from_model:
        raise ValueError(
            f"TP plan entries {sorted(unused)} match no module of {type(model).__name__}."
        )
    _check_styles_fit_modules(model, {**hf_plan, **torch_plan})
    tied = _tied_parameter_names(model)
    modules_by_name = dict(model.named_modules())
    if hf_plan:
        # transformers shards parameters while loading; on an already-loaded model each style
        # shards its module's own parameters here (every rank keeps its slice of the same
        # weights), then installs its forward.
        for name, style in hf_plan.items():
            if name in modules_by_name:
                module = modules_by_name[name]
                for param_name in list(module._parameters):
                    ALL_PARALLEL_STYLES[style].shard_param(module, param_name, tp_mesh)
        if getattr(model, "config", None) is not None:
            apply_tensor_parallelism(model, tp_mesh, hf_plan)
        else:
            _install_hf_styles(model, tp_mesh, hf_plan)
        for name, style in hf_plan.items():
            if name in modules_by_name:
                setattr(modules_by_name[name], HF_STYLE_ATTR, style)
    if torch_plan:
        parallelize_module(model, tp_mesh, torch_plan)
    _retie(model, tied)
    return model


def _has_conv1d(model: nn.Module) -> bool:
    from .tp_plans import is_conv1d

    return any(is_conv1d(m) for m in model.modules())


def _explicit_plan_hint(model: nn.Module) -> str:
    """How to shard a model without an HF plan: only suggestions that work for its layers."""
    if _has_conv1d(model):
        return (
            "Its layers are transformers Conv1D (GPT-2 style, weight [in, out]), which neither "
            "the HF style names nor torch's ColwiseParallel/RowwiseParallel can shard. For a "
            "GPT-2-architecture model pass tp_plan=hf_dp_tp.gpt2_tp_plan(); for another Conv1D "
            "model write a plan with hf_dp_tp.Conv1DParallel('colwise' | 'rowwise') for its "
            "Conv1D layers (packed=3 for a fused q|k|v projection). Or train without TP "
            "(tp_size=1, grad_sample_mode='hooks')."
        )
    return (
        "Pass an explicit plan: module name patterns (with * for layer numbers) to HF style names "
        "for nn.Linear / nn.Embedding layers, e.g. {'model.layers.*.mlp.up_proj': 'colwise', "
        "'model.layers.*.mlp.down_proj': 'rowwise', ...}, or torch ParallelStyle objects "
        "(ColwiseParallel(), RowwiseParallel(), ...). Or train without TP (tp_size=1, "
        "grad_sample_mode='hooks')."
    )


def _check_styles_fit_modules(model: nn.Module, styles: dict[str, object]) -> None:
    """Refuse, before anything is sharded, a style that cannot shard its module (the failure
    would otherwise come from deep inside torch or transformers)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from .tp_plans import Conv1DParallel, is_conv1d

    linear_styles = {"colwise", "rowwise", "colwise_rep", "rowwise_rep", "colwise_gather_output"}
    modules = dict(model.named_modules())
    for name, style in styles.items():
        module = modules.get(name)
        if module is None:
            continue
        if is_conv1d(module) and (
            isinstance(style, (ColwiseParallel, RowwiseParallel)) or style in linear_styles
        ):
            kind = "rowwise" if "rowwise" in str(style).lower() else "colwise"
            raise ValueError(
                f"{name} is a transformers Conv1D (weight [in, out]): {style!r} shards nn.Linear "
                f"only. Use hf_dp_tp.Conv1DParallel({kind!r}) for it (or, for a GPT-2 model, "
                "tp_plan=hf_dp_tp.gpt2_tp_plan())."
            )
        if isinstance(style, Conv1DParallel) and not is_conv1d(module):
            raise ValueError(
                f"{name} is a {type(module).__name__}, not a transformers Conv1D: "
                "Conv1DParallel does not apply; use ColwiseParallel/RowwiseParallel or an HF style."
            )


def _install_hf_styles(model: nn.Module, tp_mesh: DeviceMesh, hf_plan: dict[str, str]) -> None:
    """Install transformers' TP forwards on a model without an HF ``config`` (a plain
    ``nn.Module``), which ``apply_tensor_parallelism`` requires: each module entry gets its
    style's forward, as transformers does for its own models; parameters are already sharded."""
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

    modules = dict(model.named_modules())
    for name, style_name in hf_plan.items():
        if name in modules:
            ALL_PARALLEL_STYLES[style_name].install_forward(modules[name], tp_mesh)
            modules[name]._is_hooked = True


def _tied_parameter_names(model: nn.Module) -> list[list[str]]:
    """Groups of names under which one parameter object appears (e.g. tied embeddings)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _retie(model: nn.Module, tied: list[list[str]]) -> None:
    """Sharding replaces each module's parameter on its own; point tied names at one object again."""
    for names in tied:
        first = model.get_parameter(names[0])
        for name in names[1:]:
            other = model.get_parameter(name)
            if other is first:
                continue
            same_layout = isinstance(first, DTensor) == isinstance(other, DTensor) and getattr(
                first, "placements", None
            ) == getattr(other, "placements", None)
            if not same_layout:
                raise ValueError(
                    f"tied parameters {names[0]} and {name} got different TP layouts "
                    f"({getattr(first, 'placements', 'plain')} vs "
                    f"{getattr(other, 'placements', 'plain')}): shard both the same way."
                )
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr, first)


def llama_sequence_parallel_plan() -> dict:
    """A torchtitan-style plan of torch ``ParallelStyle`` objects for Llama-architecture models
    (Llama, Qwen2, Mistral, ...): the residual stream is sharded over the sequence between blocks
    (so the RMSNorms see a slice of the tokens, ``SequenceParallel``) and gathered for attention
    and the MLP, which are column/row-wise; the embedding is vocab-parallel and the gathered
    ``lm_head`` returns full logits. Pass ``position_ids`` of shape ``[B, T]`` explicitly."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    tokens = Shard(1)
    gather = {"input_layouts": (tokens,), "desired_input_layouts": (Replicate(),)}
    to_tokens = {"output_layouts": tokens, "use_local_output": False}
    return {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), **to_tokens),
        "model.layers.*.input_layernorm": SequenceParallel(),
        "model.layers.*.self_attn": PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": tokens},
            desired_input_kwarg_layouts={"hidden_states": Replicate()},
        ),
        "model.layers.*.self_attn.q_proj": ColwiseParallel(),
        "model.layers.*.self_attn.k_proj": ColwiseParallel(),
        "model.layers.*.self_attn.v_proj": ColwiseParallel(),
        "model.layers.*.self_attn.o_proj": RowwiseParallel(**to_tokens),
        "model.layers.*.post_attention_layernorm": SequenceParallel(),
        "model.layers.*.mlp": PrepareModuleInput(**gather),
        "model.layers.*.mlp.gate_proj": ColwiseParallel(),
        "model.layers.*.mlp.up_proj": ColwiseParallel(),
        "model.layers.*.mlp.down_proj": RowwiseParallel(**to_tokens),
        "model.norm": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=tokens, output_layouts=Replicate()),
    }
