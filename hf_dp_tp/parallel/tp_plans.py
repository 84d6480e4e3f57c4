"""TP plans for model families: GPT-2-style ``Conv1D`` models (no usable HF ``tp_plan``) and a
torchtitan-style sequence-parallel plan for Llama-architecture models.

transformers' ``Conv1D`` (GPT-2, and models copied from it) stores its weight as ``[in, out]``
and computes ``y = x W + b``. Neither the HF style names (``"colwise"`` needs ``out_features``)
nor torch's ``ColwiseParallel``/``RowwiseParallel`` (``nn.Linear`` and ``nn.Embedding`` only)
shard it. :class:`Conv1DParallel` does, keeping the checkpoint layout: a column-wise ``Conv1D``
holds ``Shard(1)`` of its weight, a row-wise one ``Shard(0)`` (bias replicated, added after the
all-reduce). A fused projection whose output packs several blocks (GPT-2's ``c_attn``: q | k |
v) is sharded block by block (DTensor ``_StridedShard``): each rank holds the q, k and v columns
of its own heads, and gathering (``full_tensor``, ``save_model``) gives back the original
layout, so checkpoints load in one process with ``from_pretrained`` as usual.

Like transformers' own styles, these replace ``module.forward`` with one on local tensors (the
per-sample gradient hooks see the local input and the final output; see docs/usage.md, "The
DP-SGD contract").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)
from torch.distributed.tensor.placement_types import _StridedShard

from .styles import HF_STYLE_ATTR


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (weight ``[in, out]``), by its attributes ``nf``/``nx``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


class _CopyToTP(torch.autograd.Function):
    """Identity forward; backward sums the input gradient over the TP group (the input of a
    column-wise layer is replicated, each rank's output columns give part of its gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Sum of each rank's partial output over the TP group; backward is the identity (every
    rank's partial contributes once to the one, replicated, result)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _conv1d_local(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    out = x.reshape(-1, x.shape[-1]) @ weight
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[-1])


class Conv1DParallel(ParallelStyle):
    """Shard a transformers ``Conv1D`` over the TP mesh (a torch ``ParallelStyle``: use it in a
    plan dict passed to ``apply_tp_plan`` / ``DPTrainingArguments(tp_plan=...)``).

    Args:
        kind: ``"colwise"`` (output features sharded: weight ``Shard(1)``, bias ``Shard(0)``; the
            input is replicated, the output is this rank's columns) or ``"rowwise"`` (input
            features sharded: weight ``Shard(0)``, bias replicated; the input is this rank's
            columns, the output is all-reduced and replicated).
        packed: for ``"colwise"``, the number of equal blocks the output packs (3 for GPT-2's
            fused q | k | v ``c_attn``): each block is sharded on its own, so each rank's output
            is its slice of every block, in order.
    """

    def __init__(self, kind: str, packed: int = 1) -> None:
        if kind not in ("colwise", "rowwise"):
            raise ValueError(f"Conv1DParallel kind must be 'colwise' or 'rowwise', got {kind!r}")
        if packed < 1 or (packed > 1 and kind != "colwise"):
            raise ValueError("packed > 1 applies to column-wise (output) sharding only")
        self.kind = kind
        self.packed = packed

    def __repr__(self) -> str:
        packed = f", packed={self.packed}" if self.packed > 1 else ""
        return f"Conv1DParallel({self.kind!r}{packed})"

    def _placements(self) -> dict[str, Any]:
        if self.kind == "rowwise":
            return {"weight": Shard(0), "bias": Replicate()}
        if self.packed > 1:
            return {
                "weight": _StridedShard(1, split_factor=self.packed),
                "bias": _StridedShard(0, split_factor=self.packed),
            }
        return {"weight": Shard(1), "bias": Shard(0)}

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not is_conv1d(module):
            raise ValueError(
                f"Conv1DParallel shards transformers' Conv1D layers, not {type(module).__name__}; "
                "use ColwiseParallel/RowwiseParallel (or the HF styles) for nn.Linear."
            )
        world = device_mesh.size()
        width = module.nf if self.kind == "colwise" else module.nx
        if width % (self.packed * world) != 0:
            raise ValueError(
                f"Conv1D with {width} {'output' if self.kind == 'colwise' else 'input'} features"
                f"{f' in {self.packed} packed blocks' if self.packed > 1 else ''} cannot be split "
                f"evenly over {world} TP ranks."
            )
        for name, placement in self._placements().items():
            param = module._parameters.get(name)
            if param is None:
                continue
            sharded = distribute_tensor(param.data, device_mesh, [placement], src_data_rank=None)
            module._parameters[name] = nn.Parameter(sharded, requires_grad=param.requires_grad)
        group = device_mesh.get_group()
        if self.kind == "colwise":

            def forward(x: torch.Tensor) -> torch.Tensor:
                bias = module.bias.to_local() if module.bias is not None else None
                return _conv1d_local(_CopyToTP.apply(x, group), module.weight.to_local(), bias)

        else:

            def forward(x: torch.Tensor) -> torch.Tensor:
                out = _ReduceFromTP.apply(_conv1d_local(x, module.weight.to_local(), None), group)
                return out + module.bias.to_local() if module.bias is not None else out

        module.forward = forward
        # read by the per-sample hooks: a forward on local tensors, like transformers' styles
        setattr(module, HF_STYLE_ATTR, self.kind)
        return module


class LocalHeadsAttention(ParallelStyle):
    """For a GPT-2-style attention module whose fused ``c_attn`` output is split with
    ``split_size``: set it to this rank's share (its heads' q, k and v come out of a packed
    column-wise ``c_attn`` as three equal blocks). Refuses dropout: under TP every rank would draw
    its own mask on activations that must stay identical."""

    def __repr__(self) -> str:
        return "LocalHeadsAttention()"

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        world = device_mesh.size()
        heads = getattr(module, "num_heads", None)
        if not hasattr(module, "split_size") or heads is None:
            raise ValueError(
                f"LocalHeadsAttention needs a GPT-2-style attention (split_size, num_heads), "
                f"not {type(module).__name__}"
            )
        if heads % world != 0:
            raise ValueError(f"{heads} attention heads cannot be split over {world} TP ranks")
        config = getattr(module, "config", None)
        dropout = {
            name: getattr(config, name, 0.0) for name in ("attn_pdrop", "resid_pdrop", "embd_pdrop")
        }
        if any(dropout.values()):
            raise ValueError(
                f"dropout {dropout} under tensor parallelism: each TP rank would draw its own mask "
                "on activations that must stay identical across ranks. Set attn_pdrop, "
                "resid_pdrop and embd_pdrop to 0 in the config."
            )
        if module.split_size == module.embed_dim:
            module.split_size = module.embed_dim // world
        return module


def gpt2_tp_plan(lm_head: bool = True) -> dict[str, Any]:
    """A TP plan for GPT-2-architecture models (``GPT2LMHeadModel``, ``GPT2ForSequence
    Classification``, ...), which ship no HF ``tp_plan``: vocab-parallel token embedding (tied
    ``lm_head`` gathered), per-head attention (packed column-wise ``c_attn``, row-wise
    ``c_proj``), column-wise ``mlp.c_fc`` and row-wise ``mlp.c_proj``; position embedding and
    LayerNorms replicated. Needs dropout 0 (``attn_pdrop``, ``resid_pdrop``, ``embd_pdrop``) and
    ``position_ids`` of shape ``[B, T]`` (DPTrainer's default loss passes them). Checkpoints
    saved from the sharded model have the ordinary GPT-2 layout. ``lm_head=False`` for heads
    other than the language model's (e.g. sequence classification: its ``score`` stays
    replicated)."""
    plan = {
        "transformer.wte": "embedding_rowwise",
        "transformer.h.*.attn": LocalHeadsAttention(),
        "transformer.h.*.attn.c_attn": Conv1DParallel("colwise", packed=3),
        "transformer.h.*.attn.c_proj": Conv1DParallel("rowwise"),
        "transformer.h.*.mlp.c_fc": Conv1DParallel("colwise"),
        "transformer.h.*.mlp.c_proj": Conv1DParallel("rowwise"),
    }
    if lm_head:
        plan["lm_head"] = "colwise_gather_output"
    return plan


def llama_sequence_parallel_plan() -> dict:
    """A torchtitan-style plan of torch ``ParallelStyle`` objects for Llama-architecture models
    (Llama, Qwen2, Mistral, ...): the residual stream is sharded over the sequence between blocks
    (so the RMSNorms see a slice of the tokens, ``SequenceParallel``) and gathered for attention
    and the MLP, which are column/row-wise; the embedding is vocab-parallel and the gathered
    ``lm_head`` returns full logits. Pass ``position_ids`` of shape ``[B, T]`` explicitly."""
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
