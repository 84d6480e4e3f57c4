"""Per-sample losses with a fixed reduction: each sample's loss depends on that sample only.

The loss DP-SGD differentiates must be ``mean_i ℓ_i`` (or ``Σ_i ℓ_i``) of per-sample losses. The
loss an HF model returns with ``labels`` averages over every token of the batch (or over
``num_items_in_batch``): a data-dependent, cross-sample denominator that changes each sample's
gradient with the others — so it is never used here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
#: How per-sample losses are reduced to the loss that is differentiated: ``"mean"`` (the
#: controller rescales per-sample gradients by the batch size, the optimizer divides by B̄) or
#: ``"sum"``.
LOSS_REDUCTIONS = ("mean", "sum")
PerSampleLoss = Callable[[nn.Module, Mapping[str, Any]], tuple[torch.Tensor, Any]]


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision values upcast to float32 for the loss; float32 and float64 kept as they are
    (a float64 run keeps float64 losses)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def token_mean_per_sample(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = True
) -> torch.Tensor:
    """Each sample's mean cross-entropy over its own non-ignored labels (``-100`` is ignored);
    next-token targets when ``shift``. A sample without any label contributes 0. Shape ``[B]``."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    labels = labels.to(logits.device)
    per_token = F.cross_entropy(
        _at_least_fp32(logits).reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(labels.shape)
    counts = (labels != IGNORE_INDEX).sum(1)
    return per_token.sum(1) / counts.clamp_min(1)


def default_per_sample_loss(
    model: nn.Module, inputs: Mapping[str, Any]
) -> tuple[torch.Tensor, Any]:
    """Per-sample losses ``[B]`` and the model outputs, for causal LMs (shifted next-token loss),
    token classification (unshifted) and sequence classification / regression.

    ``labels`` are taken out of the inputs so the model does not compute its own batch loss.
    Explicit ``[B, T]`` ``position_ids`` are passed when the model accepts them and none are given
    (sequence-parallel plans need them, and a ``[1, T]`` broadcast would hide per-sample grads).
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    if labels is None:
        raise ValueError(
            "DPTrainer needs `labels` in every batch to compute per-sample losses (or pass "
            "per_sample_loss=... to DPTrainer)."
        )
    ids = inputs.get("input_ids")
    if ids is not None and "position_ids" not in inputs and _accepts(model, "position_ids"):
        inputs["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    with warnings.catch_warnings():
        # FSDP2 warns when the root module's output is a view (a TP model's logits can come
        # back from the output gather as one): an in-place op on it would drop FSDP's
        # pre-backward hook. This loss only reads the outputs (slicing, reshape,
        # cross-entropy: all out of place), so the warning is silenced for this forward; a
        # user's per_sample_loss still gets it.
        warnings.filterwarnings(
            "ignore",
            message=r"FSDP2-wrapped module .* returned a view tensor",
            category=UserWarning,
        )
        outputs = model(**inputs)
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
    if hasattr(logits, "full_tensor"):
        logits = logits.full_tensor()
    if logits.ndim == 3 and labels.ndim == 2:
        return token_mean_per_sample(logits, labels, shift=_is_causal_lm(model)), outputs
    if logits.ndim == 2 and labels.ndim == 1:
        if logits.shape[-1] == 1 and labels.is_floating_point():
            logits = _at_least_fp32(logits)
            return (logits.squeeze(-1) - labels.to(logits.dtype)).pow(2), outputs
        return (
            F.cross_entropy(_at_least_fp32(logits), labels.to(logits.device), reduction="none"),
            outputs,
        )
    raise ValueError(
        f"cannot infer a per-sample loss for logits {tuple(logits.shape)} and labels "
        f"{tuple(labels.shape)}; pass per_sample_loss=... to DPTrainer."
    )


def _base_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _accepts(model: nn.Module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(_base_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def _is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .grad_samplers import module_class  # FSDP2 re-classes a model as FSDP<Class>

    return module_class(_base_model(model)).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
