"""Per-sample gradients on a tensor-parallel model, by hooks, without wrapping the model.

:class:`GradSampleControllerTP` attaches a forward hook to every module that owns trainable
parameters. The hook runs *before* any parallel style's output transform (``prepend=True``), so
it sees the activation after the style's input transform and the module's *raw* output; a tensor
hook on that raw output then receives its gradient during backward. Both are turned into plain
local tensors (contract rule 2, docs/usage.md) and a grad sampler
(:mod:`hf_dp_tp.grad_samplers`) produces ``param.grad_sample``: with per-sample hooks
(``"tp"``/``"hooks"``) a tensor of shape ``[B, *param.to_local().shape]``; with ghost clipping
(``"ghost"``) a :class:`~hf_dp_tp.ghost.FactoredGradSample` holding matrix weights as factors
(their norms and clipped sums are computed without building the ``[B, ...]`` tensor).

The model object is untouched apart from those hooks and the ``grad_sample`` attribute on
trainable parameters; :meth:`GradSampleControllerTP.cleanup` removes both.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from .ghost import (
    FactoredGradSample,
    OuterProducts,
    batch_size_of,
    keeps_factors,
    squared_norms_of,
    sum_of,
)
from .grad_samplers import GradSampler, UnsupportedLayoutError, find_grad_sampler
from .layout import GHOST, check_grad_sample_mode, model_layout
from .losses import LOSS_REDUCTIONS
from .norms import reduce_squared_norms
from .parallel import (
    HF_STYLE_ATTR,
    MeshInfo,
    ParamLayout,
    installed_tp_style,
    param_layout,
    resolve_mesh,
)
from .separability import check_forward

# transformers' own TP styles (they replace ``module.forward``): which ones the controller
# understands, and which leave a replicated parameter with a *partial* per-sample gradient that
# must be summed over the TP group (sequence-sharded tokens, or per-head slices).
_HF_STYLES_EXACT = {
    "colwise",
    "colwise_rep",
    "colwise_gather_output",
    "rowwise",
    "rowwise_rep",
    "rowwise_split_input",
    "embedding_rowwise",
    "embedding_colwise",
    "replicate",
}
_HF_STYLES_PARTIAL = {"sequence_parallel", "replicated_with_grad_allreduce"}


@dataclass
class _HookedModule:
    name: str
    module: nn.Module
    sampler: GradSampler
    params: dict[str, nn.Parameter]
    layouts: dict[str, ParamLayout]
    partial_over_tp: bool


def _hf_tp_style(root: nn.Module, name: str, module: nn.Module) -> str | None:
    """The name of the transformers TP style installed on ``module``, or None if it has none:
    recorded by :func:`~hf_dp_tp.parallel.apply_tp_plan`, else the registered style object the
    installed forward captured, else the model's resolved HF plan (styles whose forward keeps no
    reference to their object, e.g. ``replicated_with_grad_allreduce``)."""
    if "forward" not in module.__dict__ and HF_STYLE_ATTR not in module.__dict__:
        return None
    style = installed_tp_style(module)
    if style is not None and not style.startswith("<"):
        return style
    plan = getattr(root, "_tp_plan", None) or {}
    if plan:
        from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

        planned = plan.get(name) or plan.get(replace_layer_number_by_wildcard(name))
        if planned is not None:
            return planned
    if style is not None:
        return style
    return "unknown" if getattr(module, "_is_hooked", False) else None


def _settle_partial(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, DTensor) and any(isinstance(p, Partial) for p in t.placements):
        return t.redistribute(placements=[Replicate()] * len(t.placements))
    return t


def _token_shard_dim(t: torch.Tensor, *, is_activation: bool) -> int | None:
    """The sharded non-feature dim of a DTensor (a token/sequence dim), else None."""
    if not isinstance(t, DTensor):
        return None
    (placement,) = t.placements
    if not isinstance(placement, Shard):
        return None
    dim = placement.dim % t.ndim
    feature_sharded = dim == t.ndim - 1 and (t.is_floating_point() or not is_activation)
    if feature_sharded:
        return None
    if dim == 0:
        raise UnsupportedLayoutError(
            "activations sharded on the batch dim across the TP group: TP peers must see the "
            "same samples."
        )
    return dim


def localize(
    activation: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Plain local ``(activation, grad_of_output, token_partial)`` for one module call.

    ``Partial`` DTensors are reduced first. Feature-sharded tensors stay local (samplers narrow
    or accept them). If either side is sharded along a token dim, the other is cut to the same
    local tokens and ``token_partial`` is True: per-sample grads of replicated parameters are then
    partial sums that must be all-reduced over the TP group.
    """
    activation, grad = _settle_partial(activation), _settle_partial(grad)
    act_dim = _token_shard_dim(activation, is_activation=True)
    grad_dim = _token_shard_dim(grad, is_activation=False)
    token_dim = act_dim if act_dim is not None else grad_dim
    if act_dim is not None and grad_dim is not None and act_dim != grad_dim:
        raise UnsupportedLayoutError(
            f"activation sharded on dim {act_dim} but its output gradient on dim {grad_dim}."
        )
    if token_dim is not None:
        for which, t in (("activation", activation), ("output gradient", grad)):
            if not isinstance(t, DTensor):
                raise UnsupportedLayoutError(
                    f"{which} is a plain tensor while the other side is sequence-sharded: "
                    "cannot tell which tokens it holds."
                )
        if act_dim is None:
            activation = activation.redistribute(placements=[Shard(token_dim)])
        if grad_dim is None:
            grad = grad.redistribute(placements=[Shard(token_dim)])
    if isinstance(activation, DTensor):
        activation = activation.to_local()
    if isinstance(grad, DTensor):
        grad = grad.to_local()
    return activation, grad, token_dim is not None


def mixes_samples_in_train_mode(module: nn.Module) -> bool:
    """Modules whose train-mode forward computes statistics across the batch (BatchNorm*,
    SyncBatchNorm, InstanceNorm with running statistics): one sample then changes every other
    sample's output, so per-sample clipping no longer bounds a record's influence — with or
    without trainable parameters (running statistics are published with the model too)."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm

    if isinstance(module, _BatchNorm):
        return True
    return isinstance(module, _InstanceNorm) and module.track_running_stats


def _mixing_error(name: str, module: nn.Module) -> UnsupportedLayoutError:
    return UnsupportedLayoutError(
        f"module '{name or '<root>'}' ({type(module).__name__}) computes statistics across the "
        "batch in train mode: a single record changes every other sample's output and the "
        "running statistics, which per-sample clipping cannot bound. Replace it with a per-sample "
        "normalisation (nn.GroupNorm or nn.LayerNorm), or keep it in eval() mode with fixed "
        "statistics for the whole training (DPTrainer puts the model in train() mode, so replace "
        "it there)."
    )


# Relative tolerance of the first-step self-check, by the dtype of the gradient. The check is for
# structural mistakes (a weight used outside its module, a rule for another function: O(1)
# errors). A float64 model's layers may still compute in fp32 inside (Gemma-style norms cast to
# fp32 and back), so autograd's float64 gradient can carry fp32 rounding (~1e-7).
SELF_CHECK_TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-3}
SELF_CHECK_HALF_TOLERANCE = 1e-1


def _not_batch_first_message(name: str, shape: tuple[int, ...], batch: int) -> str:
    """Why a module input whose dim 0 is not the batch cannot get per-sample gradients, told
    from its shape: broadcast over the batch, batch and tokens flattened together, or
    sequence-first."""
    rows = shape[0]
    head = (
        f"module '{name}' got an input with dim 0 of size {rows} (shape {list(shape)}) while the "
        f"model's batch is {batch}: per-sample gradients need the batch as dim 0 of every module "
        "input."
    )
    if rows == 1:
        return (
            f"{head} Its dim 0 is 1: the input is broadcast over the batch (e.g. position ids "
            "of shape [1, T]). Expand it to [B, ...] (pass position_ids of shape [B, T]) or freeze "
            "the module."
        )
    if batch > 1 and rows % batch == 0 and len(shape) == 2:
        return (
            f"{head} Its dim 0 is {rows} = {batch} x {rows // batch}: the model flattens batch and "
            f"tokens into one dim before this module ([B, T, H] -> [B·T, H], as OPT's decoder "
            "MLP does with reshape(-1, hidden)), so each row is a token of some sample, and no "
            "hook can tell which rows belong to which record. Freeze this module (e.g. train "
            "LoRA adapters on the attention projections only, or requires_grad_(False) on the "
            "flattened layers: OPT's fc1, fc2 and final_layer_norm), or use a model whose layers "
            "keep [B, T, H]."
        )
    return (
        f"{head} Either the input is broadcast over the batch, or the batch and token dims are "
        "flattened together, or the model runs sequence-first (transpose to [B, T, ...], e.g. "
        "batch_first=True); or freeze the module."
    )


class GradSampleControllerTP:
    """Attach per-sample gradient hooks to ``module`` (a TP model, or a plain one in ``"hooks"``
    mode) and keep ``param.grad_sample`` up to date.

    Args:
        module: the model; it stays the object the user holds (no wrapper).
        device_mesh: the ``("dp", "tp")`` mesh, or the 1-D TP mesh; inferred from the model's
            DTensor parameters when None and there is no data parallelism.
        loss_reduction: ``"mean"`` if the loss is the mean over samples of per-sample losses
            (per-sample grads are rescaled by the local batch size), ``"sum"`` if it is their sum.
        grad_sample_mode: ``"tp"`` for DTensor / transformers-TP models, ``"hooks"`` for models
            without tensor parallelism (a DTensor model in ``"hooks"`` mode is refused): both
            materialise per-sample gradients; ``"ghost"`` for either kind of model: ghost norms
            and book-keeping clipped sums (:mod:`hf_dp_tp.ghost`). The mode is split into a
            layout and a clipping method by :func:`hf_dp_tp.layout.model_layout` (kept as
            :attr:`layout`).
        mesh_info: the resolved groups, if the caller already has them.
        check_sample_independence: on the first train-mode forward with gradients, re-run the
            forward (under ``no_grad``, hooks idle) on the caller's inputs cut or tiled to 4 rows,
            once with row 0 replaced, and refuse if any other output row changed
            (:func:`hf_dp_tp.separability.check_forward`, docs/usage.md "Samples must not
            mix"): two extra forward passes, once. ``DPTrainer`` runs its own, stronger check
            (losses and gradients) and turns this one off.

    Raises :class:`~hf_dp_tp.grad_samplers.UnsupportedLayoutError` at construction for a
    trainable layer or placement it cannot handle exactly.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        device_mesh: DeviceMesh | None = None,
        loss_reduction: str = "mean",
        grad_sample_mode: str = "tp",
        mesh_info: MeshInfo | None = None,
        check_sample_independence: bool = True,
    ) -> None:
        check_grad_sample_mode(grad_sample_mode)
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(
                f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}"
            )
        self.layout = model_layout(module, grad_sample_mode, device_mesh)
        self.module = module
        self.ghost = self.layout.method == GHOST
        self.grad_sample_mode = grad_sample_mode
        self.loss_reduction = loss_reduction
        self.mesh = mesh_info or resolve_mesh(module, device_mesh, tp=self.layout.tp)
        self.hooks_enabled = True
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._hooked: list[_HookedModule] = []
        self._layouts: dict[int, ParamLayout] = {}
        self._chunks: dict[int, list[tuple[int, torch.Tensor]]] = {}
        self._generation = 0
        self._batch_size: int | None = None
        self._seen_batch_sizes: set[int] = set()
        self._sampled_since_grad: dict[int, bool] = {}
        self._self_check_handles: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self._self_checked: set[int] = set()
        self._partial_over_tp: set[int] = set()
        self._detached: dict[int, list[nn.Parameter]] = {}  # module id -> params switched off
        self._skipped_this_pass: set[int] = set()  # params whose weight gradient is skipped
        self._unsharded: dict[int, torch.Tensor] = {}  # FSDP: sharded param id -> unsharded
        self._fsdp_grad_hooks: set[int] = set()  # unsharded stand-ins whose grad is dropped
        self._independence_pending = check_sample_independence
        try:
            self._attach()
        except BaseException:
            self.cleanup()
            raise

    # ------------------------------------------------------------------ attach / cleanup
    def _attach(self) -> None:
        for name, module in self.module.named_modules():
            if mixes_samples_in_train_mode(module):
                if module.training:
                    raise _mixing_error(name, module)
                self._handles.append(
                    module.register_forward_pre_hook(partial(self._refuse_train_mode, name))
                )
            params = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            if not params:
                continue
            where = f"module '{name or '<root>'}' ({type(module).__name__})"
            try:
                sampler = find_grad_sampler(module)
            except UnsupportedLayoutError as err:
                raise UnsupportedLayoutError(f"{where}: {err}") from None
            if sampler is None:
                raise UnsupportedLayoutError(
                    f"{where} has trainable parameters {sorted(params)} but no per-sample gradient "
                    "rule: freeze them (requires_grad=False) or register one with "
                    "hf_dp_tp.register_grad_sampler."
                )
            layouts = {n: param_layout(p, f"{name}.{n}") for n, p in params.items()}
            style = _hf_tp_style(self.module, name, module)
            if style is not None and style not in _HF_STYLES_EXACT | _HF_STYLES_PARTIAL:
                raise UnsupportedLayoutError(
                    f"{where} uses the transformers TP style {style!r}, which has no exact "
                    "per-sample gradient rule here; supported styles: "
                    f"{sorted(_HF_STYLES_EXACT | _HF_STYLES_PARTIAL)}."
                )
            partial_over_tp = style in _HF_STYLES_PARTIAL
            try:
                sampler.check(module, layouts)
                if partial_over_tp and any(lay.sharded for lay in layouts.values()):
                    raise UnsupportedLayoutError(f"style {style!r} with a sharded parameter")
            except UnsupportedLayoutError as err:
                placements = {n: lay.describe() for n, lay in layouts.items()}
                raise UnsupportedLayoutError(f"{where}, placements {placements}: {err}") from None
            for n, p in params.items():
                self._layouts[id(p)] = layouts[n]
            info = _HookedModule(name, module, sampler, params, layouts, partial_over_tp)
            self._hooked.append(info)
            self._handles.append(
                module.register_forward_pre_hook(partial(self._skip_weight_gradients, info))
            )
            self._handles.append(
                module.register_forward_hook(
                    partial(self._forward_hook, info),
                    with_kwargs=True,
                    prepend=True,
                    always_call=True,
                )
            )
        self._handles.append(
            self.module.register_forward_pre_hook(self._new_generation, with_kwargs=True)
        )
        self._handles.append(self.module.register_forward_hook(self._end_of_forward))
        for info in self._hooked:
            for n, p in info.params.items():
                if id(p) not in self._self_check_handles:
                    self._self_check_handles[id(p)] = p.register_hook(
                        partial(self._self_check, f"{info.name}.{n}", p)
                    )
        for p in self.trainable_parameters():
            self._handles.append(p.register_post_accumulate_grad_hook(self._check_sampled))

    def cleanup(self) -> None:
        """Remove every hook and every ``grad_sample`` attribute this controller added."""
        for handle in [*self._handles, *self._self_check_handles.values()]:
            handle.remove()
        self._handles.clear()
        self._self_check_handles.clear()
        self._fsdp_grad_hooks.clear()
        for p in self.trainable_parameters():
            if hasattr(p, "grad_sample"):
                del p.grad_sample
        self._hooked.clear()
        self._chunks.clear()

    # ------------------------------------------------------------------ public helpers
    def trainable_parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for info in self._hooked:
            for p in info.params.values():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def layout_of(self, param: torch.Tensor) -> ParamLayout:
        return self._layouts[id(param)]

    def get_per_sample_norms(self) -> torch.Tensor | None:
        """Norms of the whole model's per-sample gradients currently stored (contract rule 3,
        docs/usage.md)."""
        squared = [
            (squared_norms_of(p.grad_sample), self.layout_of(p).sharded)
            for p in self.trainable_parameters()
            if getattr(p, "grad_sample", None) is not None
        ]
        return reduce_squared_norms(squared, self.mesh)

    def zero_grad_sample(self) -> None:
        for p in self.trainable_parameters():
            p.grad_sample = None

    @contextmanager
    def hooks_disabled(self) -> Iterator[None]:
        """Run forward/backward without computing per-sample gradients (e.g. evaluation)."""
        previous, self.hooks_enabled = self.hooks_enabled, False
        try:
            yield
        finally:
            self.hooks_enabled = previous

    def check_batch_size(self, num_samples: int) -> None:
        """Check that the per-sample loss vector of the last forward pass has the batch size that
        every hooked module saw as its dim 0. A model whose batch is not dim 0 (sequence-first
        ``[T, B, F]`` inputs) would otherwise be clipped per time step: one record would then
        contribute up to ``T`` clipped gradients."""
        wrong = sorted(size for size in self._seen_batch_sizes if size != num_samples)
        if wrong:
            raise UnsupportedLayoutError(
                f"the loss has {num_samples} per-sample values but hooked modules saw dim 0 of "
                f"size {wrong}: per-sample gradients are taken along dim 0, so the batch must be "
                "dim 0 of every input (batch-first). Transpose sequence-first inputs to [B, T, ...]"
                " (e.g. batch_first=True)."
            )

    # ------------------------------------------------------------------ hooks
    def _refuse_train_mode(self, name: str, module: nn.Module, args: tuple) -> None:
        if self.hooks_enabled and module.training and torch.is_grad_enabled():
            raise _mixing_error(name, module)

    def _self_check(
        self,
        name: str,
        param: torch.Tensor,
        grad: torch.Tensor,
        reached: torch.Tensor | None = None,
    ) -> None:
        """First backward of each parameter: autograd's gradient must equal the reduction of its
        per-sample gradients (sum, or mean for ``loss_reduction="mean"``). A parameter also used
        outside its module (e.g. an embedding weight reused through ``F.linear``), an unhooked
        path or a wrong rule would otherwise train with a wrong norm. Checked once per parameter,
        on a backward over one forward pass."""
        if not self.hooks_enabled or id(param) in self._self_checked:
            return
        grad_sample = getattr(param, "grad_sample", None)
        if isinstance(grad_sample, FactoredGradSample):
            passes = len(grad_sample.generations)
        else:
            chunks = self._chunks.get(id(param))
            passes = len(chunks) if chunks else 0
            grad_sample = chunks[0][1] if chunks else None
        if grad_sample is None or passes != 1:
            return  # not sampled (refused by _check_sampled) or several forwards: check later
        batch = batch_size_of(grad_sample)
        if batch == 0:
            return
        if isinstance(grad, DTensor):  # may arrive in other placements than the parameter's
            like = param if reached is None else reached  # FSDP: the unsharded TP-local weight
            grad = grad.redistribute(like.device_mesh, like.placements).to_local()
        elif id(param) in self._partial_over_tp:
            # a plain replicated parameter fed rank-local tokens/heads: autograd's gradient is
            # this rank's part (transformers sums it after accumulation), as the per-sample
            # gradients were before their TP all-reduce
            grad = self.mesh.all_reduce_tp(grad.detach().clone())
        original_dtype = grad.dtype
        reduced = sum_of(grad_sample)
        acc = reduced.dtype
        if self.loss_reduction == "mean":
            reduced = reduced / batch
        grad = grad.to(acc).reshape(reduced.shape)
        # A gradient that vanishes in exact arithmetic (a key bias: softmax ignores a shift shared
        # by all keys) is rounding dust on both sides: compare against at least sqrt(eps).
        floor = torch.finfo(acc).eps ** 0.5
        largest = torch.maximum(grad.norm(), reduced.norm()).item()
        if largest == 0 or not math.isfinite(largest):
            # nothing to compare (a discarded stand-in pass), or a record with a non-finite
            # gradient (left out of the clipped sum, never flagged per step): check a later pass
            return
        error = ((grad - reduced).norm() / max(largest, floor)).item()
        # the coarsest precision involved sets the tolerance: bf16 parameters get bf16 autograd
        # gradients even when their per-sample gradients are kept in fp32
        tolerance = max(
            SELF_CHECK_TOLERANCE.get(dtype, SELF_CHECK_HALF_TOLERANCE)
            for dtype in (grad_sample.dtype, original_dtype, param.dtype)
        )
        if error > tolerance:
            raise RuntimeError(
                f"parameter {name}: autograd's gradient differs from the sum of its per-sample "
                f"gradients (relative error {error:.3g}): the parameter is used outside its "
                "module's forward (e.g. a weight reused through torch.nn.functional), on a path "
                "the hooks do not see, or its module's rule does not match its forward. Refusing "
                "to train with a wrong per-sample norm."
            )
        self._self_checked.add(id(param))  # its hook is removed at the next forward pass

    def _check_independence(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The first train-mode forward with gradients: :func:`~hf_dp_tp.separability.
        check_forward` on the caller's inputs (every TP peer — and under FSDP every rank, which
        runs every micro-batch — takes part: the verdict is agreed over them). It stays pending
        until it has run and passed."""
        first = next(
            (t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.ndim > 0),
            None,
        )
        if first is None:
            self._independence_pending = False
            return
        fsdp = any(self.layout_of(p).fsdp for p in self.trainable_parameters())
        group = True if fsdp else self.mesh.tp_group
        with self.hooks_disabled():
            checked = check_forward(
                module, module.forward, args, kwargs, first.shape[0], group=group
            )
        self._independence_pending = not checked

    def _new_generation(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._independence_pending and self.hooks_enabled and module.training:
            if torch.is_grad_enabled():
                self._check_independence(module, args, kwargs)
        self._generation += 1
        self._seen_batch_sizes = set()
        self._skipped_this_pass = set()
        for key in self._self_checked:
            unsharded = self._unsharded.get(key)
            for handle_key in (key, None if unsharded is None else id(unsharded)):
                handle = self._self_check_handles.pop(handle_key, None)
                if handle is not None:
                    handle.remove()
        first = next(
            (t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.ndim > 0),
            None,
        )
        self._batch_size = None if first is None else first.shape[0]

    def _end_of_forward(self, module: nn.Module, args: tuple, output) -> None:
        self._batch_size = None  # a later direct call of a submodule is not a broadcast

    def _check_sampled(self, param: torch.Tensor) -> None:
        """Every gradient autograd accumulates must come with its per-sample gradient: a module
        left in eval() mode, or an output the hooks could not follow, would otherwise enter the
        step with a zero clipped sum and no place in the norm."""
        if not self.hooks_enabled:
            return
        if id(param) in self._skipped_this_pass:
            # its module's own use records no weight gradient (_skip_weight_gradients): this one
            # comes from a use outside that module, which its per-sample gradient misses
            raise RuntimeError(
                f"parameter {self._name_of(param)} received a gradient from a use outside its "
                "module's forward (e.g. a weight reused through torch.nn.functional): its "
                "per-sample gradient would miss that use. Refusing to train with a wrong "
                "per-sample norm."
            )
        if not self._sampled_since_grad.get(id(param), False):
            raise RuntimeError(
                f"parameter {self._name_of(param)} received a gradient without a per-sample "
                "gradient: its module did not run in train() mode with the hooks active, or its "
                "output is not a single tensor. Put the whole model in train() mode (or freeze the "
                "module), and run evaluation under torch.no_grad() or controller.hooks_disabled()."
            )
        self._sampled_since_grad[id(param)] = False

    def _name_of(self, param: torch.Tensor) -> str:
        names = [
            f"{info.name}.{n}"
            for info in self._hooked
            for n, p in info.params.items()
            if p is param
        ]
        return names[0] if names else "?"

    def _drop_unsharded_grad(self, param: nn.Parameter, unsharded: torch.Tensor) -> None:
        """After autograd accumulates the non-private gradient into FSDP's unsharded stand-in of
        ``param``: check it came with a per-sample gradient (:meth:`_check_sampled`), then drop
        it, so that FSDP's post-backward finds nothing to reduce-scatter. The DP-SGD gradient is
        the optimizer's (clipped, noised, reduced), never FSDP's sum of raw gradients; with the
        hooks disabled FSDP keeps its ordinary behaviour."""
        if not self.hooks_enabled:
            return
        self._check_sampled(param)
        unsharded.grad = None

    def _skip_weight_gradients(self, info: _HookedModule, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook: while this module runs, its self-checked parameters do not require
        grad, so autograd records no weight gradient for this use of them — the gradient DP-SGD
        uses is computed from the module's activations and output gradients (per-sample, or
        ghost factors), and autograd's would be thrown away: skipping it saves a GEMM per layer
        (the weight gradient) in the backward pass. Parameters are restored at the end of the
        module's forward (:meth:`_forward_hook`, also on an exception). Not for the first
        backward of a parameter (the self-check compares against autograd's gradient), nor for
        parameters FSDP swaps for unsharded stand-ins, nor with the hooks disabled."""
        if not (self.hooks_enabled and module.training and torch.is_grad_enabled()):
            return
        off = [
            p
            for n, p in info.params.items()
            if id(p) in self._self_checked and p.requires_grad and module._parameters.get(n) is p
        ]
        for p in off:
            p.requires_grad_(False)
            self._skipped_this_pass.add(id(p))
        if off:
            self._detached[id(module)] = off

    def _forward_hook(
        self, info: _HookedModule, module: nn.Module, args: tuple, kwargs: dict, output
    ) -> None:
        detached = self._detached.pop(id(module), None)
        if detached:
            for p in detached:
                p.requires_grad_(True)
            if isinstance(output, torch.Tensor) and not output.requires_grad:
                # no input required grad (e.g. token ids into an embedding): the output is a
                # leaf; the backward must still reach it for the per-sample gradients
                output.requires_grad_(True)
        if not (self.hooks_enabled and module.training and torch.is_grad_enabled()):
            return None
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            if detached:
                raise RuntimeError(
                    f"module '{info.name}': its output is not a tensor that autograd can reach, "
                    "so its parameters get no per-sample gradient. Hooked modules must return a "
                    "single tensor."
                )
            return None
        for name, param in info.params.items():
            current = module._parameters.get(name)
            if current is not param and not self._fsdp_unsharded(info, name, param, current):
                raise RuntimeError(
                    f"module '{info.name}': parameter '{name}' was replaced after the controller "
                    "was attached (e.g. the model was parallelized or re-tied later). Parallelize "
                    "first, then attach the controller and build the optimizer."
                )
        activation = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(activation, torch.Tensor):
            raise UnsupportedLayoutError(f"module '{info.name}': its first input is not a tensor.")
        activation = activation.detach()
        if self._batch_size is not None and activation.shape[0] != self._batch_size:
            raise UnsupportedLayoutError(
                _not_batch_first_message(info.name, tuple(activation.shape), self._batch_size)
            )
        self._seen_batch_sizes.add(activation.shape[0])
        generation = self._generation
        output.register_hook(lambda grad: self._on_output_grad(info, activation, grad, generation))
        return None

    def _fsdp_unsharded(
        self, info: _HookedModule, name: str, param: nn.Parameter, current: torch.Tensor | None
    ) -> bool:
        """Whether ``current`` is FSDP's unsharded stand-in for ``param`` during forward: FSDP
        swaps a sharded parameter for one unsharded object (the TP-local weight), the same one at
        every step. The first one seen is recorded and gets the first-step self-check (autograd
        reaches it, not the sharded parameter)."""
        if not info.layouts[name].fsdp:
            return False
        if current is None or tuple(current.shape) != tuple(param.shape):
            return False
        known = self._unsharded.setdefault(id(param), current)
        if known is not current:
            return False
        if id(current) not in self._fsdp_grad_hooks:
            self._fsdp_grad_hooks.add(id(current))
            self._handles.append(
                current.register_post_accumulate_grad_hook(
                    partial(self._drop_unsharded_grad, param)
                )
            )
        if id(param) not in self._self_checked and id(current) not in self._self_check_handles:
            self._self_check_handles[id(current)] = current.register_hook(
                lambda grad, n=f"{info.name}.{name}": self._self_check(n, param, grad, current)
            )
        return True

    def _on_output_grad(
        self, info: _HookedModule, activation: torch.Tensor, grad: torch.Tensor, generation: int
    ) -> None:
        try:
            activation, grad, token_partial = localize(activation, grad)
        except UnsupportedLayoutError as err:
            raise UnsupportedLayoutError(f"module '{info.name}': {err}") from None
        batch = activation.shape[0]
        if self.loss_reduction == "mean":
            grad = grad * batch
        compute = info.sampler.compute_factored if self.ghost else info.sampler.compute
        try:
            grads = compute(info.module, activation, grad, info.layouts)
        except UnsupportedLayoutError as err:
            raise UnsupportedLayoutError(f"module '{info.name}': {err}") from None
        for name, grad_sample in grads.items():
            layout = info.layouts[name]
            expected = (batch, *layout.local_shape)
            if isinstance(grad_sample, OuterProducts):
                shape = (grad_sample.batch_size, *grad_sample.shape)
            else:
                shape = tuple(grad_sample.shape)
            if shape != expected:
                raise RuntimeError(
                    f"module '{info.name}': per-sample grad of '{name}' has shape "
                    f"{shape}, expected {expected} (local shard of {layout.describe()})."
                )
            if token_partial or info.partial_over_tp:
                if layout.sharded:
                    raise UnsupportedLayoutError(
                        f"module '{info.name}': '{name}' is {layout.describe()} but its "
                        "activations are split across TP ranks too; cannot compute exactly."
                    )
                # each TP rank holds a partial sum over its tokens: materialise and sum them
                if isinstance(grad_sample, OuterProducts):
                    grad_sample = grad_sample.materialise()
                grad_sample = self.mesh.all_reduce_tp(grad_sample.contiguous())
                self._partial_over_tp.add(id(info.params[name]))
            elif isinstance(grad_sample, OuterProducts) and not keeps_factors(grad_sample):
                grad_sample = grad_sample.materialise()  # smaller than its factors
            self._store(info.params[name], grad_sample, generation)

    def _store(
        self, param: nn.Parameter, grad_sample: torch.Tensor | OuterProducts, generation: int
    ) -> None:
        """Sum contributions of one forward pass (a parameter used twice, e.g. tied embeddings);
        concatenate those of further forward passes not yet consumed by the optimizer. In ghost
        mode the contributions are kept as terms of a :class:`FactoredGradSample` (their sum, and
        the cross terms of its norm, are taken when the optimizer reads it)."""
        key = id(param)
        self._sampled_since_grad[key] = True
        if self.ghost:
            if not isinstance(getattr(param, "grad_sample", None), FactoredGradSample):
                param.grad_sample = FactoredGradSample(self._layouts[key].local_shape)
            param.grad_sample.add(grad_sample, generation)
            return
        if getattr(param, "grad_sample", None) is None:
            self._chunks[key] = []
        chunks = self._chunks[key]
        if chunks and chunks[-1][0] == generation:
            chunks[-1] = (generation, chunks[-1][1] + grad_sample)
        else:
            chunks.append((generation, grad_sample))
        parts = [chunk for _, chunk in chunks]
        param.grad_sample = parts[0] if len(parts) == 1 else torch.cat(parts)
