"""FSDP2 over the DP dims of the mesh, applied after TP (torchtitan's order; the one entry point
that applies both is :func:`hf_dp_tp.parallel.parallelize`).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from .mesh import DP_REPLICATE_DIM, DP_SHARD_DIM


def fsdp_mesh_of(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh ``fully_shard`` takes: ``mesh["dp"]`` of a ``("dp", "tp")`` mesh, the 2-D
    ``("dp_replicate", "dp_shard")`` sub-mesh of an HSDP mesh (replicate over the first dim, shard
    over the second), a 1-D mesh as it is."""
    names = tuple(mesh.mesh_dim_names or ())
    if DP_REPLICATE_DIM in names:
        return mesh[(DP_REPLICATE_DIM, DP_SHARD_DIM)]
    return mesh[names[0]] if mesh.ndim == 2 else mesh


def fully_shard_over_dp(model: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
    """FSDP2 over the DP dims of the mesh, after TP (as torchtitan does): ``fully_shard`` on every
    block the model lists in ``_no_split_modules`` (its decoder layers), then on the root, over
    :func:`fsdp_mesh_of` (``"dp"``, or HSDP's ``("dp_replicate", "dp_shard")``). Parameters,
    gradients and optimizer state are then sharded over ``dp_shard`` too."""
    dp_mesh = fsdp_mesh_of(device_mesh)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return model
