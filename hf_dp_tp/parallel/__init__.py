"""Parallelism of a DP run: the sizes (:class:`ParallelDims`), the mesh and this rank's groups on
it, each parameter's layout, TP plans, FSDP, and :func:`parallelize`, which applies them in
torchtitan's order (TP, LoRA preparation, FSDP).

One file per job, imported in one direction only (no cycles):

- :mod:`.groups`: the default process group, collective timeouts, tear-down;
- :mod:`.mesh`: named mesh dims, :func:`init_dp_tp_mesh`, :class:`MeshInfo`, :func:`resolve_mesh`;
- :mod:`.dims`: :class:`ParallelDims` (``dp_replicate × dp_shard × tp``, decided once);
- :mod:`.layout`: :class:`ParamLayout` / :func:`param_layout` (the one reader of placements),
  full state dicts;
- :mod:`.styles`: which transformers TP style a module carries;
- :mod:`.tp_plans`: model-family plans (GPT-2 ``Conv1D``, Llama sequence parallel);
- :mod:`.tp`: :func:`apply_tp_plan` and its checks;
- :mod:`.fsdp`: :func:`fully_shard_over_dp`;
- :mod:`.parallelize`: :func:`parallelize`.

Every name this package exported as the single module ``hf_dp_tp/parallel.py`` is re-exported
here, so ``from hf_dp_tp.parallel import X`` keeps working.
"""

from .dims import ParallelDims, ShardingRequest, release_accelerate_sharding, sharding_request
from .fsdp import fsdp_mesh_of, fully_shard_over_dp
from .groups import destroy_process_groups, init_distributed, set_collective_timeout
from .layout import ParamLayout, full_state_dict, param_layout, shard_extent
from .mesh import (
    DP_DIM,
    DP_DIMS,
    DP_REPLICATE_DIM,
    DP_SHARD_DIM,
    TP_DIM,
    MeshInfo,
    dim_mesh,
    has_dtensor_parameters,
    init_dp_tp_mesh,
    is_fsdp_mesh,
    resolve_mesh,
)
from .styles import HF_STYLE_ATTR, installed_tp_style
from .tp import apply_tp_plan, check_tp_divisibility
from .tp_plans import Conv1DParallel, gpt2_tp_plan, is_conv1d, llama_sequence_parallel_plan

__all__ = [
    "DP_DIM",
    "DP_DIMS",
    "DP_REPLICATE_DIM",
    "DP_SHARD_DIM",
    "HF_STYLE_ATTR",
    "TP_DIM",
    "Conv1DParallel",
    "MeshInfo",
    "ParallelDims",
    "ParamLayout",
    "ShardingRequest",
    "apply_tp_plan",
    "check_tp_divisibility",
    "destroy_process_groups",
    "dim_mesh",
    "fsdp_mesh_of",
    "full_state_dict",
    "fully_shard_over_dp",
    "gpt2_tp_plan",
    "has_dtensor_parameters",
    "init_distributed",
    "init_dp_tp_mesh",
    "installed_tp_style",
    "is_conv1d",
    "is_fsdp_mesh",
    "llama_sequence_parallel_plan",
    "param_layout",
    "release_accelerate_sharding",
    "resolve_mesh",
    "set_collective_timeout",
    "shard_extent",
    "sharding_request",
]
