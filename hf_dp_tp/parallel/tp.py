"""Applying a TP plan to a loaded model (:func:`apply_tp_plan`): HF style names and torch
``ParallelStyle`` objects, checks that each style fits its module and that the heads divide the
TP size, tied parameters kept tied. The plans themselves (model families) are
:mod:`hf_dp_tp.parallel.tp_plans`.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from .styles import HF_STYLE_ATTR
from .tp_plans import Conv1DParallel, is_conv1d


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
