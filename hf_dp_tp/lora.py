"""LoRA adapters (peft) on a tensor-parallel model, ready for exact per-sample gradients.

Recommended order (every rank runs the same code)::

    model = AutoModelForCausalLM.from_pretrained(path)        # full weights on every rank
    apply_tp_plan(model, mesh["tp"], "auto")                  # colwise q/k/v/gate/up, rowwise o/down
    model = get_peft_model(model, LoraConfig(...))            # adapters, still inconsistent under TP
    prepare_lora_for_tp(model, mesh["tp"])                    # shard/sync adapters (collective)
    controller = GradSampleControllerTP(model, device_mesh=mesh)   # only then attach DP-SGD
    optimizer = DPOptimizerTP(torch.optim.SGD(model.parameters(), ...), ...)
    ...
    save_lora_adapter(model, output_dir)                      # collective; rank 0 writes

What peft 0.21 does on its own (measured: torch 2.13, transformers 5.24, gloo, t = 2), and what
:func:`prepare_lora_for_tp` changes:

- **apply_tp_plan, then get_peft_model** (base weights are DTensors, the model has no
  ``_device_mesh``): peft sizes the adapters from the *local* weight shape and creates plain
  tensors only. Column-wise layer ``W [out/t, in]``: ``lora_A [r, in]``, ``lora_B [out/t, r]``;
  row-wise layer ``W [out, in/t]``: ``lora_A [r, in/t]``, ``lora_B [out, r]``, all drawn from each
  rank's own RNG state. The forward runs but is silently wrong: on row-wise layers each rank adds
  ``B (A_k x_k)``, a partial sum never all-reduced, to the all-reduced base output (logits off by
  ~130% relative to the single-process model even with identical, correctly sliced adapters).
- **transformers TP loading** (``from_pretrained(..., distributed_config=DistributedConfig(tp_size=t))``,
  the model carries ``_device_mesh``): peft sizes the adapters from local shapes as above, then makes
  ``lora_B`` of column-wise layers a ``Shard(0)`` DTensor and ``lora_A`` of row-wise layers a
  ``Shard(1)`` DTensor (global shapes right, values drawn per rank with the *local* fan-in) and
  installs transformers' ``colwise``/``rowwise`` forward on them (without ``_is_hooked``). It
  broadcasts the plain factor over the TP group, but leaves ``lora_A.in_features`` at the local
  width, so the row-wise forward crashes ("shape '[16, 8]' is invalid for input of size 256").
  :func:`prepare_lora_for_tp` handles this model too (base styles are read from the installed
  forward).
- **get_peft_model, then apply_tp_plan**: plan names no longer match (``...q_proj`` is now the
  LoRA wrapper, the linear layer is ``...q_proj.base_layer``): ``apply_tp_plan(peft_model, ...)``
  refuses ("entries match no module"), and ``apply_tp_plan(peft_model.get_base_model(), ...)``
  installs the style on the wrapper, leaves the weights plain and crashes in forward (mixed
  Tensor/DTensor). Use ``apply_tp_plan(peft_model, tp_mesh, peft_tp_plan(peft_model))``: the
  adapters are then full-sized and :func:`prepare_lora_for_tp` only syncs and shards them. This is
  also the only order in which peft builds DoRA adapters at all (after TP, ``get_peft_model`` with
  ``use_dora=True`` fails with "mixed torch.Tensor and DTensor"); they are then refused here.

:func:`prepare_lora_for_tp` makes each LoRA layer on a column-wise base layer compute
``base(x) + s·B(A(x))`` with ``A [r, in]`` replicated and ``B [out, r]`` sharded on dim 0 (the
base's transformers style installed on ``lora_B``: input replicated, output the local slice, or
gathered for ``colwise_rep``/``colwise_gather_output``), and on a row-wise base layer ``A [r, in]``
sharded on dim 1 with its output all-reduced (the base's style installed on ``lora_A``) and ``B``
replicated. Each adapter parameter's *full* value is broadcast from global rank 0 before sharding,
so TP peers and DP replicas start identical. Adapters peft sized to a local width are re-drawn at
full width with the adapter's ``init_lora_weights`` (``True``, ``False`` or ``"gaussian"``), i.e.
from the same distribution as in a single process (fan-in of the full layer).

Refused with a clear :class:`LoraTPError`: LoRA on embeddings, DoRA and other LoRA variants, base
layers with a TP style outside the column-wise (``colwise``, ``colwise_rep``,
``colwise_gather_output``) and row-wise (``rowwise``, ``rowwise_rep``, ``rowwise_split_input``)
families or sharded with a torch ``ParallelStyle``, ``lora_dropout > 0`` where the dropout input is
replicated (column-wise and unsharded layers: each rank would draw its own mask, so the replicated
``lora_A`` would get different per-sample grads on different ranks; on row-wise layers each rank
masks its own disjoint slice of the input, which is consistent, so it is allowed),
weight-dependent initialisations (PiSSA, OLoRA, LoftQ, ...) computed on shards, and
``modules_to_save`` / trainable-token wrappers around sharded modules. Base-layer biases made
trainable by ``bias="all"/"lora_only"`` and ``lora_bias=True`` keep the layouts the controller
handles exactly.

Saving: ``PeftModel.save_pretrained`` on a model sharded with ``apply_tp_plan`` fails ("Attempted
to access the data pointer on an invalid python storage": safetensors is handed DTensors). For a
model loaded with transformers TP, peft gathers the whole filtered state dict, base weights
included, on every rank. :func:`save_lora_adapter` gathers only the adapter entries (a collective)
and writes a standard peft adapter from rank 0, which ``PeftModel.from_pretrained`` loads in one
process onto the full base model.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .parallel import HF_STYLE_ATTR, full_state_dict, installed_tp_style, shard_extent
from .parallel.groups import collective_device

__all__ = [
    "gather_lora_state_dict",
    "peft_tp_plan",
    "prepare_lora_for_tp",
    "save_lora_adapter",
]

# transformers TP styles of a base layer -> which LoRA factor takes the same style.
# Column-wise family: the output features are split, so lora_B [out, r] is split the same way.
_COLWISE_STYLES = ("colwise", "colwise_rep", "colwise_gather_output")
# Row-wise family: the input features are split, so lora_A [r, in] is split the same way.
_ROWWISE_STYLES = ("rowwise", "rowwise_rep", "rowwise_split_input")
_REINIT_SUPPORTED = (True, False, "gaussian")
_PREPARED_ATTR = "_hf_dp_tp_lora_prepared"


class LoraTPError(ValueError):
    """A LoRA configuration that cannot be trained exactly under tensor parallelism."""


# --------------------------------------------------------------------------- style detection
def _has_dtensor_params(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters(recurse=False))


# --------------------------------------------------------------------------- peft helpers
def _lora_layer_types():
    from peft.tuners.lora import Embedding as LoraEmbedding
    from peft.tuners.lora import LoraLayer

    return LoraLayer, LoraEmbedding


def _find_peft_configs(model: nn.Module) -> dict:
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict):
        return configs
    for module in model.modules():
        configs = getattr(module, "peft_config", None)
        if isinstance(configs, dict):
            return configs
    return {}


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a peft ``PeftModel`` (False when peft is not installed)."""
    try:
        from peft import PeftModel  # optional dependency
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def peft_tp_plan(model: nn.Module, plan: str | dict = "auto") -> dict[str, object]:
    """The TP plan of a model that already carries LoRA wrappers (``get_peft_model`` applied
    *before* tensor parallelism), re-targeted for ``apply_tp_plan(model, tp_mesh, plan)``.

    Entries are prefixed with the path of the wrapped transformers model inside ``model`` and
    pointed at ``<name>.base_layer`` where ``<name>`` is a LoRA wrapper, so the base linear layer is
    sharded and gets the style (the adapters stay plain and full-sized until
    :func:`prepare_lora_for_tp`).
    """
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

    lora_layer_cls, _ = _lora_layer_types()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if plan == "auto":
        plan = dict(getattr(base, "tp_plan", None) or {})
        if not plan:
            raise ValueError(f"{type(base).__name__} has no HF tp_plan; pass an explicit plan.")
    prefix = next((name for name, m in model.named_modules() if m is base), "")
    prefix = f"{prefix}." if prefix else ""
    wrappers = set()
    for name, m in model.named_modules():
        if isinstance(m, lora_layer_cls) and name.startswith(prefix):
            name = name.removeprefix(prefix)
            wrappers.update((name, replace_layer_number_by_wildcard(name)))
    return {
        f"{prefix}{key}{'.base_layer' if key in wrappers else ''}": style
        for key, style in plan.items()
    }


# --------------------------------------------------------------------------- validation
def _check_layer(name: str, layer: nn.Module, style: str | None) -> None:
    lora_layer_cls, lora_embedding_cls = _lora_layer_types()
    if isinstance(layer, lora_embedding_cls) or len(getattr(layer, "lora_embedding_A", {})) > 0:
        raise LoraTPError(
            f"LoRA on the embedding layer '{name}' is not supported by hf_dp_tp (no exact "
            "per-sample gradient rule for lora_embedding_A/B, and peft's vocab-parallel LoRA "
            "embedding is not handled): remove it from target_modules."
        )
    adapters = sorted(set(layer.lora_A) | set(getattr(layer, "lora_variant", {})))
    for adapter in adapters:
        if getattr(layer, "use_dora", {}).get(adapter, False) or adapter in getattr(
            layer, "lora_magnitude_vector", {}
        ):
            raise LoraTPError(
                f"DoRA (use_dora=True) on '{name}' (adapter '{adapter}') is not supported: the "
                "magnitude vector normalises by the norm of the full merged weight, which has no "
                "exact per-sample gradient rule here. Use plain LoRA (use_dora=False)."
            )
        if adapter in getattr(layer, "lora_variant", {}):
            variant = type(layer.lora_variant[adapter]).__name__
            raise LoraTPError(
                f"the LoRA variant {variant} on '{name}' (adapter '{adapter}') is not supported "
                "by prepare_lora_for_tp; only vanilla LoRA is."
            )
    base = layer.get_base_layer()
    sharded_base = style is not None or _has_dtensor_params(base)
    if not sharded_base:
        return
    if style is None:
        raise LoraTPError(
            f"'{name}': its base layer has DTensor parameters but no transformers TP style "
            "(torch ParallelStyle / parallelize_module sharding). LoRA under TP supports the "
            "transformers styles only: shard with HF style names ('colwise', 'rowwise')."
        )
    if style not in _COLWISE_STYLES + _ROWWISE_STYLES:
        raise LoraTPError(
            f"'{name}': LoRA on a base layer with the TP style {style!r} is not supported; "
            f"supported: {list(_COLWISE_STYLES + _ROWWISE_STYLES)}. Remove it from target_modules."
        )
    if not isinstance(base, nn.Linear) or not isinstance(base.weight, DTensor):
        raise LoraTPError(
            f"'{name}': LoRA under TP needs an nn.Linear base layer with a DTensor weight, got "
            f"{type(base).__name__} with a {type(base.weight).__name__} weight."
        )
    for adapter in layer.lora_A:
        for factor in ("lora_A", "lora_B"):
            if not isinstance(getattr(layer, factor)[adapter], nn.Linear):
                raise LoraTPError(f"'{name}': {factor}['{adapter}'] is not an nn.Linear.")


def _check_dropout(name: str, layer: nn.Module, style: str | None, tp_size: int) -> None:
    if tp_size <= 1 or style in _ROWWISE_STYLES:
        return  # row-wise: each rank masks its own disjoint input slice, consistently
    for adapter, dropout in layer.lora_dropout.items():
        if isinstance(dropout, nn.Dropout) and dropout.p > 0:
            where = f"TP style {style!r}" if style else "no TP style"
            raise LoraTPError(
                f"lora_dropout={dropout.p} on '{name}' ({where}, adapter '{adapter}'): its input is "
                "replicated across the TP group, so each rank would draw its own dropout mask and "
                "the replicated lora_A would get different per-sample gradients on different ranks. "
                "Use lora_dropout=0.0 (dropout is allowed on row-wise layers only)."
            )


def _check_wrappers(model: nn.Module) -> None:
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # pragma: no cover - peft < 0.15
        return
    for name, module in model.named_modules():
        if not isinstance(module, AuxiliaryTrainingWrapper):
            continue
        sharded = any(isinstance(p, DTensor) for p in module.parameters()) or any(
            installed_tp_style(m) is not None for m in module.modules()
        )
        if sharded:
            raise LoraTPError(
                f"'{name}' ({type(module).__name__}, modules_to_save / trainable tokens) wraps a "
                "tensor-parallel module: peft copies it without its TP forward. Leave sharded "
                "modules out of modules_to_save."
            )


# --------------------------------------------------------------------------- full values
def _full_from_local(local: torch.Tensor, dim: int, full: int, mesh: DeviceMesh) -> torch.Tensor:
    shape = list(local.shape)
    shape[dim] = full
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local.detach(), mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape), stride=stride
    ).full_tensor()


def _fresh_full(
    kind: str, shape: tuple[int, ...], like: torch.Tensor, init, r: int
) -> torch.Tensor:
    """A full-width value drawn as peft initialises ``lora_A``/``lora_B`` (weight, or ``bias``)."""
    t = torch.empty(shape, dtype=like.dtype, device=like.device)
    if kind == "weight_A":
        if init == "gaussian":
            nn.init.normal_(t, std=1 / r)
        else:  # True and False both keep nn.Linear's default (kaiming_uniform, a=sqrt(5))
            nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    elif kind == "weight_B":
        if init is False:
            nn.init.kaiming_uniform_(t, a=math.sqrt(5))
        else:
            nn.init.zeros_(t)
    else:  # bias of lora_B (fan_in = r)
        if init is False:
            bound = 1 / math.sqrt(r)
            nn.init.uniform_(t, -bound, bound)
        else:
            nn.init.zeros_(t)
    return t


def _broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    """Overwrite every tensor with global rank 0's copy (flattened per dtype and device)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for key in sorted(groups, key=str):
        group = groups[key]
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src=0)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


# --------------------------------------------------------------------------- prepare
def prepare_lora_for_tp(model: nn.Module, tp_mesh: DeviceMesh | None = None) -> nn.Module:
    """Make every peft LoRA adapter of ``model`` consistent with its tensor-parallel base layer.

    Collective: every rank of the job must call it, with the same model structure. Idempotent
    (a prepared adapter is left alone). Call it after ``get_peft_model`` and before attaching
    :class:`~hf_dp_tp.GradSampleControllerTP` and building the optimizer (it replaces adapter
    parameters). ``tp_mesh`` is the 1-D TP mesh the base layers were sharded on (default: the
    mesh of their weights).

    Raises :class:`LoraTPError` for configurations that cannot be trained exactly (see the module
    docstring); nothing is modified then.
    """
    lora_layer_cls, _ = _lora_layer_types()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, lora_layer_cls)]
    if not layers:
        raise LoraTPError("prepare_lora_for_tp: the model has no peft LoRA layer.")
    configs = _find_peft_configs(model)

    # 1. validate everything before touching anything
    meshes = [
        m.get_base_layer().weight.device_mesh
        for _, m in layers
        if isinstance(getattr(m.get_base_layer(), "weight", None), DTensor)
    ]
    tp_size = max([tp_mesh.size() if tp_mesh is not None else 1] + [m.size() for m in meshes])
    plans = []
    for name, layer in layers:
        base = layer.get_base_layer()
        style = installed_tp_style(base)
        mesh = None
        if isinstance(getattr(base, "weight", None), DTensor):
            mesh = base.weight.device_mesh
        _check_layer(name, layer, style)
        if mesh is not None and mesh.ndim != 1:
            raise LoraTPError(
                f"'{name}': base weight on a {mesh.ndim}-D mesh; need the 1-D TP mesh."
            )
        if mesh is not None and tp_mesh is not None:
            ranks = sorted(int(r) for r in mesh.mesh.flatten().tolist())
            expected = sorted(int(r) for r in tp_mesh.mesh.flatten().tolist())
            if ranks != expected:
                raise LoraTPError(
                    f"'{name}': base weight sharded over ranks {ranks}, not over tp_mesh {expected}."
                )
        _check_dropout(name, layer, style, tp_size)
        plans.append((name, layer, base, style, mesh))
    _check_wrappers(model)

    # 2. full values of every adapter factor not yet prepared (identical layout on all ranks)
    todo = []  # (layer, adapter, style, mesh, {(factor, param_name): full tensor})
    for name, layer, base, style, mesh in plans:
        done = getattr(layer, _PREPARED_ATTR, set())
        for adapter in sorted(layer.lora_A):
            if adapter in done:
                continue
            fulls = {}
            for factor in ("lora_A", "lora_B"):
                lin = getattr(layer, factor)[adapter]
                for pname, p in lin.named_parameters(recurse=False):
                    fulls[(factor, pname)] = _full_value(
                        name, layer, adapter, factor, pname, p, base, style, mesh, configs
                    )
            todo.append((layer, adapter, style, mesh, fulls))

    # 3. one broadcast from global rank 0: TP peers and DP replicas start identical
    _broadcast_from_rank0([t for *_, fulls in todo for t in fulls.values()])

    # 4. write back: sharded factor gets the base's style, the other stays plain
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

    for layer, adapter, style, mesh, fulls in todo:
        sharded_factor = None
        if style in _COLWISE_STYLES:
            sharded_factor = "lora_B"
        elif style in _ROWWISE_STYLES:
            sharded_factor = "lora_A"
        for factor in ("lora_A", "lora_B"):
            lin = getattr(layer, factor)[adapter]
            for (f, pname), full in fulls.items():
                if f != factor:
                    continue
                old = lin._parameters[pname]
                lin._parameters[pname] = nn.Parameter(full, requires_grad=old.requires_grad)
            lin.__dict__.pop("forward", None)  # drop a TP forward peft may have installed
            for attr in ("_is_hooked", HF_STYLE_ATTR):
                lin.__dict__.pop(attr, None)
            lin.in_features, lin.out_features = lin.weight.shape[1], lin.weight.shape[0]
            if factor == sharded_factor:
                tp_style = ALL_PARALLEL_STYLES[style]
                for pname in list(lin._parameters):
                    tp_style.shard_param(lin, pname, mesh)
                tp_style.install_forward(lin, mesh)
                lin._is_hooked = True
                setattr(lin, HF_STYLE_ATTR, style)
        if style is not None:
            base = layer.get_base_layer()
            layer.in_features, layer.out_features = base.weight.shape[1], base.weight.shape[0]
        done = set(getattr(layer, _PREPARED_ATTR, set()))
        done.add(adapter)
        setattr(layer, _PREPARED_ATTR, done)
    return model


def _full_value(name, layer, adapter, factor, pname, p, base, style, mesh, configs) -> torch.Tensor:
    """The full (unsharded) value of one adapter parameter, on this rank (before the broadcast)."""
    r = layer.r[adapter]
    out_full, in_full = (int(s) for s in base.weight.shape)
    full_shape = {
        ("lora_A", "weight"): (r, in_full),
        ("lora_B", "weight"): (out_full, r),
        ("lora_B", "bias"): (out_full,),
    }.get((factor, pname))
    if full_shape is None:
        raise LoraTPError(f"'{name}': unexpected adapter parameter {factor}.{adapter}.{pname}.")
    what = f"'{name}': {factor}.{adapter}.{pname}"
    sharded_factor = (
        "lora_B" if style in _COLWISE_STYLES else "lora_A" if style in _ROWWISE_STYLES else None
    )
    dim = 1 if factor == "lora_A" else 0  # the dim the base layer's split applies to
    local_shape = None
    if factor == sharded_factor:
        local_shape = list(full_shape)
        local_shape[dim] = shard_extent(full_shape[dim], mesh.get_local_rank(), mesh.size())[1]
        local_shape = tuple(local_shape)
    if isinstance(p, DTensor):
        if tuple(p.shape) != full_shape:
            raise LoraTPError(
                f"{what} is a DTensor of global shape {tuple(p.shape)}, not {full_shape}."
            )
    elif tuple(p.shape) not in (full_shape, local_shape):
        raise LoraTPError(
            f"{what} has shape {tuple(p.shape)}: neither the full {full_shape} nor this rank's "
            f"shard {local_shape}."
        )
    # peft sizes the adapter from the layer width it recorded: the local one on a sharded layer
    created_width = layer.in_features if factor == "lora_A" else layer.out_features
    config = configs.get(adapter)
    if factor == sharded_factor and created_width != full_shape[dim] and config is not None:
        init = config.init_lora_weights
        if not any(init is v if isinstance(v, bool) else init == v for v in _REINIT_SUPPORTED):
            raise LoraTPError(
                f"{what}: init_lora_weights={init!r} derives the adapter from the base weight, "
                "which under TP is a shard. Initialise the adapter in a single process, save it "
                "and load it, or use init_lora_weights=True/False/'gaussian'."
            )
        # re-draw at full width (the fan-in of the full layer, as in a single process)
        kind = "bias" if pname == "bias" else f"weight_{factor[-1]}"
        local = p.to_local() if isinstance(p, DTensor) else p
        return _fresh_full(kind, full_shape, local, init, r)
    if isinstance(p, DTensor):
        return p.full_tensor().detach().clone()
    if tuple(p.shape) == full_shape:
        return p.detach().clone()
    # no config to re-draw from: keep peft's per-rank values, concatenated
    return _full_from_local(p, dim, full_shape[dim], mesh)


# --------------------------------------------------------------------------- gather / save
def _candidate_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full tensors of every state-dict entry peft may save (adapters, biases, saved modules).

    Collective over each DTensor's mesh: every rank must call it.
    """
    keep = ("lora_", "modules_to_save", "trainable_tokens")
    return full_state_dict(
        model, keep=lambda name: any(k in name for k in keep) or name.endswith(".bias")
    )


def gather_lora_state_dict(
    model: nn.Module, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """The adapter's state dict as peft saves it (``adapter_model.safetensors`` names, adapter name
    removed), as full CPU tensors. Collective: call it on every rank."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(
        model,
        state_dict=_candidate_state_dict(model),
        adapter_name=adapter_name,
        save_embedding_layers=False,
    )


def save_lora_adapter(model: nn.Module, output_dir: str | os.PathLike, **kwargs) -> None:
    """Write a standard peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``) with
    full tensors, from global rank 0. Collective: call it on every rank. ``kwargs`` go to
    ``PeftModel.save_pretrained`` (e.g. ``selected_adapters``)."""
    full = _candidate_state_dict(model)
    distributed = dist.is_available() and dist.is_initialized()
    error = None
    if not distributed or dist.get_rank() == 0:
        kwargs.setdefault("save_embedding_layers", False)
        try:
            model.save_pretrained(str(output_dir), state_dict=full, **kwargs)
        except Exception as err:  # tell the other ranks instead of leaving them in a collective
            if not distributed:
                raise
            error = f"{type(err).__name__}: {err}"
    if distributed:
        device = collective_device()
        failed = torch.tensor([error is not None], dtype=torch.uint8, device=device)
        dist.broadcast(failed, src=0)
        if error is not None:
            raise RuntimeError(f"save_lora_adapter failed: {error}")
        if bool(failed.item()):
            raise RuntimeError("save_lora_adapter failed on rank 0 (see rank 0's error)")
