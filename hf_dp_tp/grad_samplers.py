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
TP-aware and written here, and so are the HF norm families (:data:`NORM_FAMILIES`: Llama-style,
fp32 ``w`` or ``1 + w`` scaling as in Gemma, T5, Cohere), registered for the transformers classes
they were written for.

A rule attached to a class it was not written for — a subclass opted in with
:func:`register_grad_sampler_alias`, or an HF norm class matched to a family — is first checked
numerically: on a small probe input, its per-sample gradients must equal autograd's, sample by
sample (:func:`verify_rule`). Nothing is decided by comparing source text.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .ghost import OuterProducts, Term, materialise_terms, tokens_view
from .parallel import ParamLayout

Layouts = dict[str, ParamLayout]
ComputeFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, Layouts], dict[str, torch.Tensor]]
#: Like :data:`ComputeFn`, but matrix weights may come back as factors
#: (:class:`~hf_dp_tp.ghost.OuterProducts`) instead of materialised ``[B, ...]`` tensors.
FactorsFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, Layouts], dict[str, Term]]
CheckFn = Callable[[nn.Module, Layouts], None]
ProbeFn = Callable[[nn.Module], torch.Tensor]


class UnsupportedLayoutError(ValueError):
    """A layer, parameter placement or activation layout the controller cannot compute exactly."""


@dataclass(frozen=True)
class GradSampler:
    """``compute`` gives per-sample grads of one module call; ``check`` validates layouts early;
    ``probe_input`` (optional) builds a small float64 input for a module of the rule's kind, on
    which :func:`verify_rule` checks the rule against autograd; ``factors`` (optional) gives the
    same gradients with matrix weights as factors, for ghost clipping (``compute`` then
    materialises them, so both forms come from one rule)."""

    compute: ComputeFn
    check: CheckFn
    probe_input: ProbeFn | None = None
    factors: FactorsFn | None = None

    def compute_factored(
        self, module: nn.Module, activation: torch.Tensor, backprops: torch.Tensor, layouts: Layouts
    ) -> dict[str, Term]:
        """``factors`` where the rule has them, else the materialised gradients."""
        fn = self.factors or self.compute
        return fn(module, activation, backprops, layouts)


_BY_TYPE: dict[type, GradSampler] = {}
_BY_PREDICATE: list[tuple[Callable[[nn.Module], bool], GradSampler]] = []
# subclass -> the base whose rule it borrows, until a probe has verified it for the subclass
_UNVERIFIED_ALIASES: dict[type, type] = {}
# HF norm classes matched to a family by a probe (or found to match none: the reason)
_MATCHED: dict[type, GradSampler | str] = {}

#: Relative tolerance of the probe check (float64 probe; forwards may compute in fp32 inside).
PROBE_TOLERANCE = 1e-5
#: Row scales of the four samples of a float probe input: very different (one near a norm's
#: eps), and more than two samples, so that a statistic over the batch shows even when it only
#: appears for batches of three or more.
PROBE_SCALES = torch.tensor([1.0, 1e-3, 10.0, 0.1], dtype=torch.float64)


def register_grad_sampler(
    target: type | Callable[[nn.Module], bool],
    *,
    check: CheckFn | None = None,
    probe_input: ProbeFn | None = None,
    factors: FactorsFn | None = None,
) -> Callable[[ComputeFn], ComputeFn]:
    """Register ``compute(module, activation, backprops, layouts)`` for a module class (or for
    every module a predicate accepts). Without ``check``, only replicated parameters are allowed.
    ``factors`` (optional, same arguments) returns matrix weights as
    :class:`~hf_dp_tp.ghost.OuterProducts` for ghost clipping; without it, ghost clipping
    materialises this layer's per-sample gradients with ``compute``.
    ``probe_input(module)`` (optional) lets subclasses aliased to this class be verified
    numerically when they are attached (see :func:`register_grad_sampler_alias`)."""

    def decorator(fn: ComputeFn) -> ComputeFn:
        sampler = GradSampler(fn, check or require_replicated, probe_input, factors)
        if isinstance(target, type):
            _BY_TYPE[target] = sampler
            _UNVERIFIED_ALIASES.pop(target, None)
        else:
            _BY_PREDICATE.append((target, sampler))
        return fn

    return decorator


def register_grad_sampler_alias(subclass: type, base: type) -> None:
    """Opt in: use ``base``'s rule for ``subclass`` (whose forward must compute the same function
    of its input and parameters). Rules are looked up by exact type, so a subclass is refused
    until it is registered or aliased. The rule was not written for ``subclass``: when the
    controller attaches to one, the rule is first checked against autograd on a small probe input
    (per-sample gradients, sample by sample; a mismatch is refused), then by the first-step
    self-check on real data. Rules registered without ``probe_input`` get the self-check only."""
    if base not in _BY_TYPE:
        raise ValueError(f"{base.__name__} has no registered grad sampler to alias")
    if not issubclass(subclass, base):
        raise ValueError(f"{subclass.__name__} is not a subclass of {base.__name__}")
    _BY_TYPE[subclass] = _BY_TYPE[base]
    _UNVERIFIED_ALIASES[subclass] = base


def module_class(module: nn.Module) -> type:
    """The class whose forward a module runs: ``type(module)``, except for a module FSDP2's
    ``fully_shard`` re-classed as ``FSDP<Class>(FSDPModule, Class)`` (same forward, FSDP's
    unshard/reshard around it as hooks): then ``Class``."""
    cls = type(module)
    from torch.distributed.fsdp import FSDPModule

    if issubclass(cls, FSDPModule) and len(cls.__bases__) == 2 and cls.__bases__[0] is FSDPModule:
        return cls.__bases__[1]
    return cls


def find_grad_sampler(module: nn.Module) -> GradSampler | None:
    """The rule for ``type(module)``: registered for exactly that class; written for it as an HF
    norm family member; else the first predicate that accepts it; else, for an HF norm class, the
    first family (or parent ``nn.LayerNorm``/``nn.RMSNorm`` rule) that passes the probe check.

    Raises:
        UnsupportedLayoutError: for a subclass of a registered type (its ``forward`` may compute
            something else: a scaled output, another input; the parent's rule would give a
            silently wrong per-sample gradient), for an aliased subclass whose forward fails the
            probe check, and for an HF norm class that matches no family.
    """
    cls = module_class(module)
    if cls in _BY_TYPE:
        sampler = _BY_TYPE[cls]
        if cls in _UNVERIFIED_ALIASES:
            base = _UNVERIFIED_ALIASES[cls]
            error = verify_rule(module, sampler)
            if error is not None:
                raise UnsupportedLayoutError(
                    f"{cls.__name__} was aliased to {base.__name__}'s rule, but on a probe input "
                    f"that rule's per-sample gradients differ from autograd's ({error}): its "
                    "forward computes another function. Register its own rule "
                    "(hf_dp_tp.register_grad_sampler) or freeze it."
                )
            del _UNVERIFIED_ALIASES[cls]
        return sampler
    written = rule_written_for(cls)
    if written is not None:
        return written
    for predicate, sampler in _BY_PREDICATE:
        if predicate(module):
            return sampler
    if _is_hf_candidate(module):
        if cls not in _MATCHED:
            _MATCHED[cls] = _match_by_probe(module)
        matched = _MATCHED[cls]
        if isinstance(matched, GradSampler):
            return matched
        raise UnsupportedLayoutError(matched)
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


def _match_by_probe(module: nn.Module) -> GradSampler | str:
    """The first candidate rule that passes :func:`verify_rule` on ``module``'s class, else the
    reason none did."""
    tried = []
    for name, sampler in _candidate_rules(module):
        error = verify_rule(module, sampler)
        if error is None:
            return sampler
        tried.append(f"{name}: {error}")
    cls = module_class(module).__name__
    return (
        f"{cls} matches none of the rules for its kind of layer on a probe input, so it has no "
        "per-sample gradient rule. Tried: "
        + ("; ".join(tried) or "nothing applicable")
        + ". Freeze it (requires_grad=False) or register a rule for it "
        "(hf_dp_tp.register_grad_sampler)."
    )


def _stand_in(module: nn.Module) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """A shallow copy of ``module`` with fresh random float64 parameters (of the full, global
    shapes) and float64 buffers: the class's own ``forward`` runs on it without touching the
    model, its hooks, or any forward a TP style installed on the instance."""
    g = torch.Generator().manual_seed(1)
    stand_in = copy.copy(module)
    params = {
        name: nn.Parameter(
            0.5 + torch.rand(tuple(p.shape), generator=g, dtype=torch.float64)
            if p.is_floating_point()
            else p.detach().clone()
        )
        for name, p in module._parameters.items()
        if p is not None
    }
    buffers = {}
    for name, b in module._buffers.items():
        if b is None:
            continue
        if b.__class__ is not torch.Tensor and not isinstance(b, nn.Parameter):
            raise UnsupportedLayoutError(f"buffer {name} is a {type(b).__name__}")
        b = b.detach().cpu()
        buffers[name] = b.to(torch.float64) if b.is_floating_point() else b.clone()
    stand_in._parameters = dict(params)
    stand_in._buffers = buffers
    return stand_in, params


def verify_rule(module: nn.Module, sampler: GradSampler) -> str | None:
    """Check ``sampler`` against autograd on ``type(module)``'s own forward: on a float64 probe
    of four samples (built by ``sampler.probe_input``) with random output gradients, the rule's
    per-sample gradients must equal each sample's autograd gradient to ``PROBE_TOLERANCE``.
    Returns None if they do (or if the rule has no probe input: the controller's first-step
    self-check then remains the only check), else what differed."""
    if sampler.probe_input is None:
        return None
    cls = module_class(module)
    try:
        stand_in, params = _stand_in(module)
        x = sampler.probe_input(stand_in)
        with torch.enable_grad():
            out = cls.forward(stand_in, x)
            if not isinstance(out, torch.Tensor) or out.shape[:1] != x.shape[:1]:
                return "its forward does not return one tensor with the batch as dim 0"
            g = torch.Generator().manual_seed(2)
            cotangent = torch.randn(out.shape, generator=g, dtype=out.dtype)
            names = list(params)
            expected = {name: [] for name in names}
            for i in range(x.shape[0]):
                sample_out = cls.forward(stand_in, x[i : i + 1])
                scale = out[i : i + 1].detach().abs().max().clamp_min(1e-30)
                if not (sample_out.detach() - out[i : i + 1].detach()).abs().max() <= (
                    PROBE_TOLERANCE * scale
                ):
                    return "its forward mixes samples (a sample's output depends on the others)"
                grads = torch.autograd.grad(
                    (sample_out * cotangent[i : i + 1]).sum(),
                    [params[n] for n in names],
                    allow_unused=True,
                )
                for name, grad in zip(names, grads, strict=True):
                    expected[name].append(
                        torch.zeros_like(params[name]) if grad is None else grad.detach()
                    )
        from .parallel import ParamLayout

        layouts = {n: ParamLayout(tuple(p.shape), tuple(p.shape)) for n, p in params.items()}
        with torch.no_grad():
            got = sampler.compute(stand_in, x, cotangent, layouts)
    except Exception as err:  # any failure to run the probe is a failed check
        return f"the probe failed: {type(err).__name__}: {err}"
    for name in names:
        want = torch.stack(expected[name]).double()
        have = got.get(name)
        if have is None or tuple(have.shape) != tuple(want.shape):
            shape = None if have is None else tuple(have.shape)
            return f"'{name}': per-sample gradient of shape {shape}, expected {tuple(want.shape)}"
        error = ((have.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
        if not error <= PROBE_TOLERANCE:
            return f"'{name}': relative error {error:.3g}"
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
        return layout.take_local(t, dim)
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
def _dense_factors(
    activation: torch.Tensor,
    backprops: torch.Tensor,
    layouts: Layouts,
    *,
    in_features: int,
    out_features: int,
    weight_out_dim: int,
) -> dict[str, Term]:
    """``y = x W^T + b`` (Linear, ``weight_out_dim=0``) or ``y = x W + b`` (Conv1D, ``=1``): the
    weight's per-sample gradient as outer products of this rank's slices of the output gradient
    and the activation, the bias's materialised."""
    out: dict[str, Term] = {}
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
        g, a = tokens_view(g), tokens_view(a)
        left, right = (g, a) if weight_out_dim == 0 else (a, g)
        out["weight"] = OuterProducts(left, right, rows=left.shape[-1], dtype=g.dtype)
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


def _features_probe(width: int) -> torch.Tensor:
    """Four samples of three tokens, of very different scales, in float64."""
    x = torch.randn(4, 3, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return x * PROBE_SCALES.view(4, 1, 1)


def linear_factors(
    layer: nn.Linear, activation: torch.Tensor, backprops: torch.Tensor, layouts: Layouts
) -> dict[str, Term]:
    return _dense_factors(
        activation,
        backprops,
        layouts,
        in_features=layer.in_features,
        out_features=layer.out_features,
        weight_out_dim=0,
    )


@register_grad_sampler(
    nn.Linear,
    check=lambda m, lay: _check_dense(m, lay, 0),
    probe_input=lambda m: _features_probe(m.in_features),
    factors=linear_factors,
)
def linear_grad_sample(
    layer: nn.Linear, activation: torch.Tensor, backprops: torch.Tensor, layouts: Layouts
) -> dict[str, torch.Tensor]:
    return materialise_terms(linear_factors(layer, activation, backprops, layouts))


def _is_hf_conv1d(module: nn.Module) -> bool:
    return (
        module_class(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and hasattr(module, "nx")
    )


def conv1d_factors(
    layer: nn.Module, activation: torch.Tensor, backprops: torch.Tensor, layouts: Layouts
) -> dict[str, Term]:
    """transformers' GPT-2 ``Conv1D``: weight ``[in, out]``."""
    return _dense_factors(
        activation,
        backprops,
        layouts,
        in_features=layer.nx,
        out_features=layer.nf,
        weight_out_dim=1,
    )


@register_grad_sampler(
    _is_hf_conv1d,
    check=lambda m, lay: _check_dense(m, lay, 1),
    probe_input=lambda m: _features_probe(m.nx),
    factors=conv1d_factors,
)
def conv1d_grad_sample(
    layer: nn.Module, activation: torch.Tensor, backprops: torch.Tensor, layouts: Layouts
) -> dict[str, torch.Tensor]:
    """transformers' GPT-2 ``Conv1D``: weight ``[in, out]``."""
    return materialise_terms(conv1d_factors(layer, activation, backprops, layouts))


# --------------------------------------------------------------------------- embeddings
def _check_embedding(module: nn.Module, layouts: Layouts) -> None:
    if any(layout.split_factor != 1 for layout in layouts.values()):
        raise UnsupportedLayoutError("a packed (_StridedShard) embedding")
    if getattr(module, "sparse", False) or getattr(module, "scale_grad_by_freq", False):
        raise UnsupportedLayoutError("embeddings with sparse=True or scale_grad_by_freq=True")
    if getattr(module, "max_norm", None) is not None:
        raise UnsupportedLayoutError(
            "embeddings with max_norm (the forward rescales rows in place)"
        )


def embedding_factors(
    layer: nn.Embedding, ids: torch.Tensor, backprops: torch.Tensor, layouts: Layouts
) -> dict[str, Term]:
    """Rows touched by each sample's ids (one-hot rows times the output gradient), restricted to
    this rank's rows (vocab-parallel, ``Shard(0)``: ids outside the local range touch no row) or
    columns (``Shard(1)``)."""
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
    local_ids = torch.where(keep, local_ids, torch.full_like(local_ids, -1))
    return {"weight": OuterProducts(local_ids, g, rows=rows, dtype=g.dtype)}


@register_grad_sampler(
    nn.Embedding,
    check=_check_embedding,
    probe_input=lambda m: torch.randint(
        0, m.num_embeddings, (4, 3), generator=torch.Generator().manual_seed(0)
    ),
    factors=embedding_factors,
)
def embedding_grad_sample(
    layer: nn.Embedding, ids: torch.Tensor, backprops: torch.Tensor, layouts: Layouts
) -> dict[str, torch.Tensor]:
    """:func:`embedding_factors`, materialised ``[B, local rows, local cols]``."""
    return materialise_terms(embedding_factors(layer, ids, backprops, layouts))


# --------------------------------------------------------------------------- norms
def _norm_feature_check(
    layer: nn.Module, activation: torch.Tensor, backprops: torch.Tensor
) -> None:
    shape = tuple(layer.weight.shape)
    for what, t in (("features", activation), ("output gradients", backprops)):
        if tuple(t.shape[t.ndim - len(shape) :]) != shape:
            raise UnsupportedLayoutError(
                f"{type(layer).__name__} sees {what} of trailing shape "
                f"{tuple(t.shape[t.ndim - len(shape) :])} but its weight has shape {shape}: a "
                "norm over a feature-sharded activation is not supported."
            )


def _norm_probe_input(layer: nn.Module) -> torch.Tensor:
    """Four samples of three tokens over the weight's trailing shape, of very different scales
    (one comparable to eps), so a wrong eps or a cross-sample statistic shows (also one that
    only appears above two samples)."""
    shape = tuple(layer.weight.shape) if isinstance(layer.weight, torch.Tensor) else ()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, *shape, generator=g, dtype=torch.float64)
    return x * PROBE_SCALES.view(4, *([1] * (x.ndim - 1)))


def _token_sum_of_products(
    layer: nn.Module, x_hat: torch.Tensor, backprops: torch.Tensor
) -> torch.Tensor:
    """``Σ_tokens g ⊙ x̂`` per sample, over every dim between the batch and the weight's dims,
    accumulated in at least fp32."""
    acc = torch.promote_types(torch.promote_types(backprops.dtype, x_hat.dtype), torch.float32)
    per_token = backprops.to(acc) * x_hat.to(acc)
    token_dims = tuple(range(1, per_token.ndim - layer.weight.ndim))
    return per_token.sum(token_dims) if token_dims else per_token


def _by_param_name(
    layer: nn.Module, grads: dict[nn.Parameter, torch.Tensor]
) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in layer.named_parameters(recurse=False)}
    return {names[id(p)]: g for p, g in grads.items()}


@register_grad_sampler(nn.LayerNorm, probe_input=_norm_probe_input)
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


@register_grad_sampler(nn.RMSNorm, probe_input=_norm_probe_input)
def rms_norm_grad_sample(
    layer: nn.RMSNorm, activation: torch.Tensor, backprops: torch.Tensor, layouts: Layouts
) -> dict[str, torch.Tensor]:
    from opacus.grad_sample import compute_rms_norm_grad_sample

    _norm_feature_check(layer, activation, backprops)
    grads = compute_rms_norm_grad_sample(layer, [activation], backprops)
    return {k: v for k, v in _by_param_name(layer, grads).items() if k in layouts}


# HF norm families. Each computes ``y = s(w) ⊙ x̂`` with ``s(w) = w`` or ``1 + w`` (Gemma): either
# way ``∂y/∂w = x̂``, so a family is the normalised input x̂ in the precision the model multiplies
# it by the weight, and the per-sample gradient of the weight is ``Σ_tokens g ⊙ x̂``.
def _eps(layer: nn.Module) -> float:
    eps = getattr(layer, "variance_epsilon", None)
    return getattr(layer, "eps", 1e-6) if eps is None else eps


def _rms_fp32(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _eps(layer))


def _x_hat_llama(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _rms_fp32(layer, x).to(x.dtype)


def _x_hat_t5(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x_hat = x * torch.rsqrt(variance + _eps(layer))
    if layer.weight.dtype in (torch.float16, torch.bfloat16):
        x_hat = x_hat.to(layer.weight.dtype)
    return x_hat


def _x_hat_layer_norm_fp32(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    centred = x - x.mean(-1, keepdim=True)
    return centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + _eps(layer))


@dataclass(frozen=True)
class NormFamily:
    """``y = s(w) ⊙ x̂(x)`` for a family of HF norm classes: ``x_hat`` gives x̂ as the model
    computes it (dtype included); ``classes`` are the transformers classes written this way."""

    name: str
    formula: str
    x_hat: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    classes: tuple[str, ...]

    def grad_sample(
        self, layer: nn.Module, activation: torch.Tensor, backprops: torch.Tensor, layouts: Layouts
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        _norm_feature_check(layer, activation, backprops)
        if "weight" in layouts:
            x_hat = self.x_hat(layer, activation)
            out["weight"] = _token_sum_of_products(layer, x_hat, backprops)
        if "bias" in layouts:
            out["bias"] = _token_sum_of_products(layer, torch.ones_like(backprops[:1]), backprops)
        return out

    @functools.cached_property
    def sampler(self) -> GradSampler:
        return GradSampler(self.grad_sample, require_replicated, _norm_probe_input)


def _hf(*names: str) -> tuple[str, ...]:
    """``"llama.LlamaRMSNorm"`` -> ``"transformers.models.llama.modeling_llama.LlamaRMSNorm"``."""
    out = []
    for name in names:
        module, cls = name.split(".")
        out.append(f"transformers.models.{module}.modeling_{module}.{cls}")
    return tuple(out)


#: The HF norm families, with the classes each rule is written for (checked against the installed
#: transformers by the tests). Other HF norm classes are matched to a family by a probe.
NORM_FAMILIES = (
    NormFamily(
        "llama",
        "w * (x * rsqrt(mean(x²) + eps)) with x̂ in fp32, cast to the input dtype first",
        _x_hat_llama,
        _hf(
            "llama.LlamaRMSNorm",
            "llama4.Llama4TextRMSNorm",
            "mistral.MistralRMSNorm",
            "mixtral.MixtralRMSNorm",
            "ministral.MinistralRMSNorm",
            "qwen2.Qwen2RMSNorm",
            "qwen2_moe.Qwen2MoeRMSNorm",
            "qwen3.Qwen3RMSNorm",
            "qwen3_moe.Qwen3MoeRMSNorm",
            "phi3.Phi3RMSNorm",
            "granite.GraniteRMSNorm",
            "granitemoe.GraniteMoeRMSNorm",
            "deepseek_v2.DeepseekV2RMSNorm",
            "deepseek_v3.DeepseekV3RMSNorm",
            "smollm3.SmolLM3RMSNorm",
            "glm.GlmRMSNorm",
            "glm4.Glm4RMSNorm",
            "exaone4.Exaone4RMSNorm",
            "seed_oss.SeedOssRMSNorm",
        ),
    ),
    NormFamily(
        "fp32_scale",
        "(w or 1 + w) * (x * rsqrt(mean(x²) + eps)), all in fp32, cast to the input dtype last",
        _rms_fp32,
        _hf(
            "gemma.GemmaRMSNorm",
            "gemma2.Gemma2RMSNorm",
            "gemma3.Gemma3RMSNorm",
            "recurrent_gemma.RecurrentGemmaRMSNorm",
            "vaultgemma.VaultGemmaRMSNorm",
            "qwen3_next.Qwen3NextRMSNorm",
            "olmo2.Olmo2RMSNorm",
            "olmo3.Olmo3RMSNorm",
            "gpt_oss.GptOssRMSNorm",
            "helium.HeliumRMSNorm",
        ),
    ),
    NormFamily(
        "t5",
        "w * (x * rsqrt(mean(x²) in fp32 + eps)), cast to a half-precision weight's dtype",
        _x_hat_t5,
        _hf(
            "t5.T5LayerNorm",
            "mt5.MT5LayerNorm",
            "umt5.UMT5LayerNorm",
            "longt5.LongT5LayerNorm",
            "switch_transformers.SwitchTransformersLayerNorm",
            "pix2struct.Pix2StructLayerNorm",
        ),
    ),
    NormFamily(
        "fp32_layer_norm",
        "w * ((x - mean) * rsqrt(var + eps)) in fp32, no bias, weight [..., D] (Cohere)",
        _x_hat_layer_norm_fp32,
        _hf("cohere.CohereLayerNorm", "cohere2.Cohere2LayerNorm"),
    ),
)
# Tried (by probe only) on HF layer norms with a bias: w * x̂ + b in fp32 (DeBERTa-style).
_AFFINE_LAYER_NORM = NormFamily(
    "fp32_affine_layer_norm",
    "w * ((x - mean) * rsqrt(var + eps)) + b in fp32",
    _x_hat_layer_norm_fp32,
    (),
)


# HF scaled word embeddings (Gemma, BART, ...): ``y = E[ids] · s`` with a constant ``embed_scale``.
def _embed_scale(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor | float:
    scale = layer.embed_scale
    return scale.to(dtype) if isinstance(scale, torch.Tensor) else scale


def _check_scaled_embedding(module: nn.Module, layouts: Layouts) -> None:
    _check_embedding(module, layouts)
    if isinstance(getattr(module, "embed_scale", None), nn.Parameter):
        raise UnsupportedLayoutError("a trainable embed_scale")


def scaled_embedding_factors(
    layer: nn.Embedding, ids: torch.Tensor, backprops: torch.Tensor, layouts: Layouts
) -> dict[str, Term]:
    """``y = E[ids] · s``: the embedding rule on ``s · g``."""
    scale = _embed_scale(layer, backprops.dtype)
    return embedding_factors(layer, ids, backprops * scale, layouts)


def scaled_embedding_grad_sample(
    layer: nn.Embedding, ids: torch.Tensor, backprops: torch.Tensor, layouts: Layouts
) -> dict[str, torch.Tensor]:
    return materialise_terms(scaled_embedding_factors(layer, ids, backprops, layouts))


SCALED_EMBEDDING = GradSampler(
    scaled_embedding_grad_sample,
    _check_scaled_embedding,
    _BY_TYPE[nn.Embedding].probe_input,
    scaled_embedding_factors,
)
_SCALED_EMBEDDING_CLASSES = _hf(
    "gemma.GemmaTextScaledWordEmbedding",
    "gemma2.Gemma2TextScaledWordEmbedding",
    "gemma3.Gemma3TextScaledWordEmbedding",
    "vaultgemma.VaultGemmaTextScaledWordEmbedding",
    "bart.BartScaledWordEmbedding",
    "mbart.MBartScaledWordEmbedding",
)

#: transformers classes -> the rule written for them (qualified class names: nothing imported).
_WRITTEN_FOR: dict[str, GradSampler] = {
    **{name: family.sampler for family in NORM_FAMILIES for name in family.classes},
    **dict.fromkeys(_SCALED_EMBEDDING_CLASSES, SCALED_EMBEDDING),
}


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def rule_written_for(cls: type) -> GradSampler | None:
    """The rule written for the transformers class ``cls`` (an HF norm family member or a
    scaled word embedding), by its qualified name; else None."""
    return _WRITTEN_FOR.get(_qualified_name(cls))


def _is_hf_candidate(module: nn.Module) -> bool:
    """A transformers layer no rule was written for, worth matching to one on a probe: a class
    named ``*Norm*`` whose only parameters are a weight (and a bias), or a subclass of
    ``nn.Embedding``."""
    cls = module_class(module)
    if not cls.__module__.startswith("transformers.") or any(True for _ in module.children()):
        return False
    if isinstance(module, nn.Embedding):
        return True
    names = {n for n, _ in module.named_parameters(recurse=False)}
    weight = getattr(module, "weight", None)
    return (
        "Norm" in cls.__name__
        and "weight" in names
        and names <= {"weight", "bias"}
        and isinstance(weight, torch.Tensor)
        and weight.ndim >= 1
    )


def _candidate_rules(module: nn.Module) -> list[tuple[str, GradSampler]]:
    """Rules to try on an HF layer that none was written for, most common first."""
    if isinstance(module, nn.Embedding):
        candidates = [("nn.Embedding", _BY_TYPE[nn.Embedding])]
        if hasattr(module, "embed_scale"):
            candidates.append(("scaled embedding (E[ids] * embed_scale)", SCALED_EMBEDDING))
        return candidates
    names = {n for n, _ in module.named_parameters(recurse=False)}
    candidates = []
    if isinstance(module, nn.LayerNorm):
        candidates.append(("nn.LayerNorm", _BY_TYPE[nn.LayerNorm]))
    if isinstance(module, nn.RMSNorm):
        candidates.append(("nn.RMSNorm", _BY_TYPE[nn.RMSNorm]))
    families = NORM_FAMILIES if names == {"weight"} else (_AFFINE_LAYER_NORM,)
    candidates += [(f"{family.name} ({family.formula})", family.sampler) for family in families]
    return candidates
