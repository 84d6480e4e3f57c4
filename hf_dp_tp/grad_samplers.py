"""Per-layer, per-sample gradients on a rank's local shard.

A grad sampler turns one call of a module — its input activation and the gradient of its raw
output, both plain local tensors — into ``{param_name: grad_sample}`` with
``grad_sample.shape == (B, *local_param.shape)``. Inputs may be *full* (replicated) or this rank's
*slice* along the feature dimension; each sampler reads the parameter's :class:`ParamLayout` and
narrows a full tensor to the local slice (never sums a global-shaped gradient into a shard).

Every sampler also declares which layouts it supports; anything else is refused when the
controller attaches, naming the module, the parameter and its placement.

Rules are looked up by exact module type (a subclass may compute something else). Opacus's
sampler is reused for ``nn.RMSNorm``; linear, ``Conv1D``, embedding and layer-norm samplers are
TP-aware and written here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .parallel import ParamLayout

Layouts = dict[str, ParamLayout]
ComputeFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, Layouts], dict[str, torch.Tensor]]
CheckFn = Callable[[nn.Module, Layouts], None]


class UnsupportedLayoutError(ValueError):
    """A layer, parameter placement or activation layout the controller cannot compute exactly."""


@dataclass(frozen=True)
class GradSampler:
    """``compute`` gives per-sample grads of one module call; ``check`` validates layouts early."""

    compute: ComputeFn
    check: CheckFn


_BY_TYPE: dict[type, GradSampler] = {}
_BY_PREDICATE: list[tuple[Callable[[nn.Module], bool], GradSampler]] = []


def register_grad_sampler(
    target: type | Callable[[nn.Module], bool], *, check: CheckFn | None = None
) -> Callable[[ComputeFn], ComputeFn]:
    """Register ``compute(module, activation, backprops, layouts)`` for a module class (or for
    every module a predicate accepts). Without ``check``, only replicated parameters are allowed."""

    def decorator(fn: ComputeFn) -> ComputeFn:
        sampler = GradSampler(fn, check or require_replicated)
        if isinstance(target, type):
            _BY_TYPE[target] = sampler
        else:
            _BY_PREDICATE.append((target, sampler))
        return fn

    return decorator


def register_grad_sampler_alias(subclass: type, base: type) -> None:
    """Opt in: use ``base``'s rule for ``subclass`` (whose forward must compute the same function
    of its input and parameters). Rules are looked up by exact type, so a subclass is refused
    until it is registered or aliased; the controller's first-step self-check then compares the
    rule's per-sample gradients with autograd's gradient and refuses a mismatch."""
    if base not in _BY_TYPE:
        raise ValueError(f"{base.__name__} has no registered grad sampler to alias")
    if not issubclass(subclass, base):
        raise ValueError(f"{subclass.__name__} is not a subclass of {base.__name__}")
    _BY_TYPE[subclass] = _BY_TYPE[base]


def find_grad_sampler(module: nn.Module) -> GradSampler | None:
    """The rule registered for exactly ``type(module)``, else the first predicate that accepts it.

    Raises:
        UnsupportedLayoutError: for a subclass of a registered type: its ``forward`` may compute
            something else (a scaled output, another input), and the parent's rule would give a
            silently wrong per-sample gradient.
    """
    cls = type(module)
    if cls in _BY_TYPE:
        return _BY_TYPE[cls]
    for predicate, sampler in _BY_PREDICATE:
        if predicate(module):
            return sampler
    parent = next((base for base in cls.__mro__[1:] if base in _BY_TYPE), None)
    if parent is not None:
        raise UnsupportedLayoutError(
            f"{cls.__name__} subclasses {parent.__name__}, but per-sample gradient rules are "
            "looked up by exact type: its forward may differ from the parent's. If it computes "
            f"the same function, opt in with hf_dp_tp.register_grad_sampler_alias({cls.__name__}, "
            f"{parent.__name__}); otherwise register its own rule (hf_dp_tp.register_grad_sampler)"
            " or freeze it."
        )
    return None


def require_replicated(module: nn.Module, layouts: Layouts) -> None:
    for name, layout in layouts.items():
        if layout.sharded:
            raise UnsupportedLayoutError(
                f"{type(module).__name__}.{name} is {layout.describe()}: this layer type supports "
                "only replicated parameters."
            )


def _local_slice(
    t: torch.Tensor, full: int, layout: ParamLayout | None, what: str, dim: int = -1
) -> torch.Tensor:
    """``t`` restricted to the layout's slice along ``dim`` (``t`` may already be that slice)."""
    size = t.shape[dim]
    if layout is None or not layout.sharded:
        if size != full:
            raise UnsupportedLayoutError(
                f"{what} has width {size} on dim {dim} but this parameter is replicated and needs "
                f"the full width {full}: the activation layout does not match the parameter."
            )
        return t
    if size == layout.length and size != full:
        return t
    if size == full:
        return t.narrow(dim, layout.offset, layout.length)
    raise UnsupportedLayoutError(
        f"{what} has width {size} on dim {dim}; expected the full width {full} or this rank's "
        f"shard width {layout.length}."
    )


def _require_full(t: torch.Tensor, full: int, what: str) -> torch.Tensor:
    if t.shape[-1] != full:
        raise UnsupportedLayoutError(
            f"{what} has width {t.shape[-1]} but this parameter layout needs the full width {full}: "
            "the layer receives a rank-local slice its parameters do not match. Shard the layer "
            "in the TP plan, or gather its input (e.g. output_layouts=Replicate() upstream)."
        )
    return t


# --------------------------------------------------------------------------- dense layers
def _dense_grad_sample(
    activation: torch.Tensor,
    backprops: torch.Tensor,
    layouts: Layouts,
    *,
    in_features: int,
    out_features: int,
    weight_out_dim: int,
) -> dict[str, torch.Tensor]:
    """``y = x W^T + b`` (Linear, ``weight_out_dim=0``) or ``y = x W + b`` (Conv1D, ``=1``)."""
    out: dict[str, torch.Tensor] = {}
    weight = layouts.get("weight")
    if weight is not None:
        if weight.sharded and weight.shard_dim == weight_out_dim:
            g = _local_slice(backprops, out_features, weight, "output gradient")
            a = _require_full(activation, in_features, "input activation")
        elif weight.sharded:
            g = _require_full(backprops, out_features, "output gradient")
            a = _local_slice(activation, in_features, weight, "input activation")
        else:
            g = _require_full(backprops, out_features, "output gradient")
            a = _require_full(activation, in_features, "input activation")
        a = a.to(g.dtype)
        pattern = "n...o,n...i->noi" if weight_out_dim == 0 else "n...o,n...i->nio"
        out["weight"] = torch.einsum(pattern, g, a)
    bias = layouts.get("bias")
    if bias is not None:
        g = _local_slice(backprops, out_features, bias, "output gradient (bias)")
        out["bias"] = torch.einsum("n...o->no", g)
    return out


def _check_dense(module: nn.Module, layouts: Layouts, weight_out_dim: int) -> None:
    for name, layout in layouts.items():
        if layout.sharded and name == "bias" and layout.shard_dim != 0:
            raise UnsupportedLayoutError(f"bias sharded on dim {layout.shard_dim}")
    weight, bias = layouts.get("weight"), layouts.get("bias")
    weight_in_sharded = weight is not None and weight.sharded and weight.shard_dim != weight_out_dim
    if weight_in_sharded and bias is not None and bias.sharded:
        raise UnsupportedLayoutError(
            "a row-wise (input-sharded) weight with a sharded bias: the bias must be Replicate()."
        )


@register_grad_sampler(nn.Linear, check=lambda m, lay: _check_dense(m, lay, 0))
def linear_grad_sample(
    layer: nn.Linear, activation: torch.Tensor, backprops: torch.Tensor, layouts: Layouts
) -> dict[str, torch.Tensor]:
    return _dense_grad_sample(
        activation,
        backprops,
        layouts,
        in_features=layer.in_features,
        out_features=layer.out_features,
        weight_out_dim=0,
    )


def _is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


@register_grad_sampler(_is_hf_conv1d, check=lambda m, lay: _check_dense(m, lay, 1))
def conv1d_grad_sample(
    layer: nn.Module, activation: torch.Tensor, backprops: torch.Tensor, layouts: Layouts
) -> dict[str, torch.Tensor]:
    """transformers' GPT-2 ``Conv1D``: weight ``[in, out]``."""
    return _dense_grad_sample(
        activation,
        backprops,
        layouts,
        in_features=layer.nx,
        out_features=layer.nf,
        weight_out_dim=1,
    )


# --------------------------------------------------------------------------- embeddings
def _check_embedding(module: nn.Module, layouts: Layouts) -> None:
    if getattr(module, "sparse", False) or getattr(module, "scale_grad_by_freq", False):
        raise UnsupportedLayoutError("embeddings with sparse=True or scale_grad_by_freq=True")
    if getattr(module, "max_norm", None) is not None:
        raise UnsupportedLayoutError(
            "embeddings with max_norm (the forward rescales rows in place)"
        )


@register_grad_sampler(nn.Embedding, check=_check_embedding)
def embedding_grad_sample(
    layer: nn.Embedding, ids: torch.Tensor, backprops: torch.Tensor, layouts: Layouts
) -> dict[str, torch.Tensor]:
    """Rows touched by each sample's ids, restricted to this rank's rows (vocab-parallel,
    ``Shard(0)``: ids outside the local range are masked) or columns (``Shard(1)``)."""
    weight = layouts.get("weight")
    if weight is None:
        return {}
    vocab, dim = layer.num_embeddings, layer.embedding_dim
    if weight.sharded and weight.shard_dim == 1:
        g = _local_slice(backprops, dim, weight, "embedding output gradient")
    else:
        g = _require_full(backprops, dim, "embedding output gradient")
    batch = ids.shape[0]
    rows_lo, rows = (weight.offset, weight.length) if weight.shard_dim == 0 else (0, vocab)
    ids = ids.flatten(1) if ids.ndim > 1 else ids.unsqueeze(1)  # [B, tokens]; B may be 0
    g = g.reshape(batch, ids.shape[1], g.shape[-1])
    local_ids = ids - rows_lo
    keep = (local_ids >= 0) & (local_ids < rows)
    if layer.padding_idx is not None:
        keep &= ids != layer.padding_idx
    flat_index = (torch.arange(batch, device=ids.device).unsqueeze(1) * rows + local_ids)[keep]
    grad_sample = torch.zeros(batch * rows, g.shape[-1], dtype=g.dtype, device=g.device)
    grad_sample.index_add_(0, flat_index, g[keep])
    return {"weight": grad_sample.view(batch, rows, g.shape[-1])}


# --------------------------------------------------------------------------- norms
def _norm_feature_check(
    layer: nn.Module, activation: torch.Tensor, backprops: torch.Tensor
) -> None:
    width = layer.weight.shape[-1]
    if activation.shape[-1] != width or backprops.shape[-1] != width:
        raise UnsupportedLayoutError(
            f"{type(layer).__name__} sees features of width {activation.shape[-1]} but normalises "
            f"{width}: a norm over a feature-sharded activation is not supported."
        )


def _by_param_name(
    layer: nn.Module, grads: dict[nn.Parameter, torch.Tensor]
) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in layer.named_parameters(recurse=False)}
    return {names[id(p)]: g for p, g in grads.items()}


@register_grad_sampler(nn.LayerNorm)
def layer_norm_grad_sample(
    layer: nn.LayerNorm, activation: torch.Tensor, backprops: torch.Tensor, layouts: Layouts
) -> dict[str, torch.Tensor]:
    """``y = x̂ ⊙ w + b`` over the trailing ``normalized_shape`` dims: ``Σ_tokens g ⊙ x̂`` for the
    weight and ``Σ_tokens g`` for the bias (either may be absent, e.g. ``bias=False``)."""
    _norm_feature_check(layer, activation, backprops)
    normalized = len(layer.normalized_shape)
    x_hat = F.layer_norm(activation, layer.normalized_shape, eps=layer.eps)
    token_dims = tuple(range(1, activation.ndim - normalized))
    g = backprops.to(torch.promote_types(backprops.dtype, torch.float32))  # token sums in fp32
    out: dict[str, torch.Tensor] = {}
    if "weight" in layouts:
        per_token = g * x_hat.to(g.dtype)
        out["weight"] = per_token.sum(token_dims) if token_dims else per_token
    if "bias" in layouts:
        out["bias"] = g.sum(token_dims) if token_dims else g
    return out


@register_grad_sampler(nn.RMSNorm)
def rms_norm_grad_sample(
    layer: nn.RMSNorm, activation: torch.Tensor, backprops: torch.Tensor, layouts: Layouts
) -> dict[str, torch.Tensor]:
    from opacus.grad_sample import compute_rms_norm_grad_sample

    _norm_feature_check(layer, activation, backprops)
    grads = compute_rms_norm_grad_sample(layer, [activation], backprops)
    return {k: v for k, v in _by_param_name(layer, grads).items() if k in layouts}


@functools.cache
def _llama_rmsnorm_forward_source() -> str | None:
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:  # pragma: no cover - transformers always ships Llama
        return None
    return inspect.getsource(LlamaRMSNorm.forward)


_HF_RMSNORM_CACHE: dict[type, bool] = {}


def is_llama_style_rmsnorm(module: nn.Module) -> bool:
    """HF RMSNorm classes whose forward is Llama's ``weight * (x * rsqrt(mean(x^2) + eps))``
    computed in fp32 and cast back (Llama, Qwen2, Qwen3, Mistral, ... copy it verbatim)."""
    cls = type(module)
    if cls not in _HF_RMSNORM_CACHE:
        same = False
        reference = _llama_rmsnorm_forward_source() if cls.__name__.endswith("RMSNorm") else None
        if reference is not None:
            try:
                same = inspect.getsource(cls.forward) == reference
            except (OSError, TypeError):
                same = False
        _HF_RMSNORM_CACHE[cls] = same
    return _HF_RMSNORM_CACHE[cls]


@register_grad_sampler(is_llama_style_rmsnorm)
def llama_rmsnorm_grad_sample(
    layer: nn.Module, activation: torch.Tensor, backprops: torch.Tensor, layouts: Layouts
) -> dict[str, torch.Tensor]:
    """``d/dw (w * x̂) = x̂`` with x̂ normalised in fp32 and cast to the input dtype, as the model
    computes it; the token sum is accumulated in fp32."""
    if "weight" not in layouts:
        return {}
    _norm_feature_check(layer, activation, backprops)
    x = activation.float()
    x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + layer.variance_epsilon)
    acc = torch.promote_types(backprops.dtype, torch.float32)
    per_token = backprops.to(acc) * x_hat.to(activation.dtype).to(acc)
    token_dims = tuple(range(1, per_token.ndim - 1))
    return {"weight": per_token.sum(token_dims) if token_dims else per_token}
