"""How each parameter is laid out: :class:`ParamLayout` (this rank's piece of the full
parameter, and whether FSDP shards it over DP) from :func:`param_layout`, the one place a
parameter's placements are read; and gathering sharded entries back to full tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from .mesh import DP_DIMS, TP_DIM, is_fsdp_mesh


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
    #: FSDP shards the parameter over DP (its DTensor mesh has a DP dim, :func:`is_fsdp_mesh`):
    #: the layout above is that of the TP-local unsharded weight, and the final gradient is
    #: written to its FSDP shard.
    fsdp: bool = False

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
            return ParamLayout(global_shape, global_shape, fsdp=True)
        if others != (TP_DIM,):
            raise ValueError(
                f"{name}: DTensor on a mesh with dims {names}: FSDP parameters must live on the "
                "('dp', 'tp') or ('dp_replicate', 'dp_shard', 'tp') mesh or its DP dims."
            )
        placement = param.placements[names.index(TP_DIM)]
        layout = _tp_layout(name, placement, global_shape, mesh[TP_DIM], None, param.ndim)
        return dataclasses.replace(layout, fsdp=True)
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
