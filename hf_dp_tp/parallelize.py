"""One entry point that parallelizes a model: :func:`parallelize`, in torchtitan's order — TP
plan, then LoRA adapters prepared for TP, then FSDP over the DP dims — for sizes decided once
(:class:`~hf_dp_tp.parallel.ParallelDims`) on the mesh they built.

It sits above :mod:`hf_dp_tp.parallel` (mesh, TP plans, FSDP) and :mod:`hf_dp_tp.lora` (which
itself reads TP styles from :mod:`hf_dp_tp.parallel`), so that neither imports the other's
caller. Used by DPTrainer, the Llama engine example and the step-time bench.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from .lora import is_peft_model, peft_tp_plan, prepare_lora_for_tp
from .parallel import ParallelDims, apply_tp_plan, fully_shard_over_dp


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    mesh: DeviceMesh | None,
    plan: str | dict[str, object] | None = "auto",
    *,
    device: torch.device | None = None,
) -> nn.Module:
    """Shard ``model`` in place for ``dims`` on ``mesh`` (built by ``dims.build_mesh``; None for
    a single process without torch.distributed) and return it.

    1. **TP.** A model whose parameters are already DTensors (loaded with a TP plan, or
       parallelized by the caller) is kept as it is, its TP degree checked against ``dims.tp``.
       Otherwise ``plan`` (``"auto"``: the model's HF ``tp_plan``; a dict: see
       :func:`~hf_dp_tp.parallel.apply_tp_plan`; for a PEFT model the base model's plan is
       extended to its LoRA layers) is applied over ``mesh["tp"]`` — also when that dim has one
       rank —, after moving the model to ``device`` when given (not CPU). ``plan=None``: no TP,
       which ``dims.tp > 1`` refuses.
    2. **LoRA.** With TP, the adapters of a PEFT model are sharded like their base layers and
       made identical on every rank (:func:`~hf_dp_tp.prepare_lora_for_tp`).
    3. **FSDP.** When ``dims.fsdp_enabled``: ``fully_shard`` per decoder layer, then the root,
       over the DP dims of ``mesh`` (:func:`~hf_dp_tp.parallel.fully_shard_over_dp`).
    """
    sizes = {p.device_mesh.size() for p in model.parameters() if isinstance(p, DTensor)}
    if sizes:
        if sizes != {dims.tp}:
            raise ValueError(
                f"the model is already sharded over {sorted(sizes)} ranks but tp_size="
                f"{dims.tp}: set tp_size to the TP degree the model was loaded with."
            )
    elif plan is None:
        if dims.tp_enabled:
            raise ValueError(
                f"tp_size={dims.tp} with tp_plan=None, but the model is not parallelized:"
                " pass tp_plan='auto' (the model's HF plan) or an explicit plan."
            )
    else:
        if mesh is None:
            raise ValueError("a TP plan needs a device mesh (torch.distributed initialised).")
        if device is not None and device.type != "cpu":
            model = model.to(device)
        apply_tp_plan(
            model, mesh["tp"], peft_tp_plan(model, plan) if is_peft_model(model) else plan
        )
    if is_peft_model(model) and dims.tp_enabled:
        # adapters sharded like their base layers and identical on every rank
        prepare_lora_for_tp(model, mesh["tp"])
    if dims.fsdp_enabled:
        if mesh is None:
            raise ValueError("FSDP (fsdp=... or parallelism_config) needs a distributed launch.")
        fully_shard_over_dp(model, mesh)
    return model
