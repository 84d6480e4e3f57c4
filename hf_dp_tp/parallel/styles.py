"""Which transformers TP style a module carries: recorded by :func:`~hf_dp_tp.parallel.apply_tp_plan`
and by the plans of :mod:`hf_dp_tp.parallel.tp_plans` under :data:`HF_STYLE_ATTR`, else read from
the forward transformers installed. The grad-sample rules and LoRA read it.
"""

from __future__ import annotations

import inspect

from torch import nn

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
