"""DP-SGD on a tensor-parallel model: clip per sample, sum, add noise, reduce, scale (contract
rules 4-9, docs/usage.md), then let any torch optimizer apply the result.

The step is a sequence of named stages of :class:`DPOptimizerTP`, so a clipping method or a
parallelism replaces one stage, not the whole step: :meth:`~DPOptimizerTP.clip_and_accumulate`
(per micro-batch) then, once per logical batch, :meth:`~DPOptimizerTP.take_clipped_sums`,
:meth:`~DPOptimizerTP.add_noise`, :meth:`~DPOptimizerTP.reduce`, :meth:`~DPOptimizerTP.scale`
and :meth:`~DPOptimizerTP.write_grads`, run in that order by
:meth:`~DPOptimizerTP.add_noise_and_reduce`."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.optim import Optimizer

from .ghost import GradSample, clipped_sum_of, squared_norms_of
from .losses import LOSS_REDUCTIONS
from .noise import NoiseSource
from .norms import accumulation_dtype, reduce_squared_norms
from .parallel import (
    DP_DIMS,
    DP_REPLICATE_DIM,
    MeshInfo,
    ParamLayout,
    param_layout,
)
from .randomness import agree_on_seed

CLIP_EPSILON = 1e-6
_BUCKET_NUMEL = 1 << 26  # elements per flattened all-reduce/broadcast bucket
_REDUCE_SCATTER_MIN_NUMEL = 1 << 20  # FSDP sums at least this large are reduce-scattered


def _buckets(tensors: list[torch.Tensor]) -> Iterator[list[int]]:
    """Index groups of same-device tensors with at most ``_BUCKET_NUMEL`` elements each."""
    group: list[int] = []
    size = 0
    for i, t in enumerate(tensors):
        if group and (size + t.numel() > _BUCKET_NUMEL or tensors[group[0]].device != t.device):
            yield group
            group, size = [], 0
        group.append(i)
        size += t.numel()
    if group:
        yield group


def _flat_collective(
    tensors: list[torch.Tensor], collective: Callable[[torch.Tensor], Any]
) -> None:
    """Run ``collective`` on flattened buckets of ``tensors`` and copy the result back in place."""
    for group in _buckets(tensors):
        flat = torch.cat([tensors[i].reshape(-1) for i in group])
        collective(flat)
        offset = 0
        for i in group:
            n = tensors[i].numel()
            tensors[i].copy_(flat[offset : offset + n].view_as(tensors[i]))
            offset += n


def _shard_over_dp(local_sum: torch.Tensor, param: DTensor, *, reduce: bool) -> torch.Tensor:
    """This rank's FSDP shard of a TP-local sum (the unsharded weight's shape). ``reduce``: the
    sum is this rank's partial sum over the FSDP dim (``"dp"`` or ``"dp_shard"``), and DTensor
    turns it into the parameter's own placement there (a reduce-scatter); otherwise it is already
    summed over that dim and only this rank's shard is cut out (no communication). An HSDP
    parameter's ``"dp_replicate"`` dim stays a partial sum: :meth:`DPOptimizerTP.reduce` sums it
    over the replicas after the shard owner's noise."""
    mesh = param.device_mesh
    source, target = [], []
    for dim, placement in zip(mesh.mesh_dim_names, param.placements, strict=True):
        if dim == DP_REPLICATE_DIM:
            source.append(Partial())
            target.append(Partial())
        elif dim in DP_DIMS:
            source.append(Partial() if reduce else Replicate())
            target.append(placement)
        else:
            source.append(placement)
            target.append(placement)
    partial = DTensor.from_local(
        local_sum, mesh, source, run_check=False, shape=param.shape, stride=param.stride()
    )
    return partial.redistribute(mesh, target).to_local()


def split_mixed_param_groups(optimizer: Optimizer) -> None:
    """Split every param group mixing DTensor and plain parameters into two groups with the same
    options: foreach/fused kernels cannot take both kinds in one call."""
    groups = []
    for group in optimizer.param_groups:
        kinds = [
            [p for p in group["params"] if isinstance(p, DTensor) == is_dt]
            for is_dt in (True, False)
        ]
        if all(kinds):
            if optimizer.state:
                raise ValueError(
                    "the optimizer mixes DTensor and plain parameters in one group and already has "
                    "state; wrap it before its first step (or give the two kinds separate groups)."
                )
            options = {k: v for k, v in group.items() if k != "params"}
            groups.extend({**options, "params": params} for params in kinds)
        else:
            groups.append(group)
    optimizer.param_groups = groups


class DPOptimizerTP(Optimizer):
    """Wraps a torch optimizer and replaces the gradient it sees by the DP-SGD gradient.

    Per step (contract, docs/usage.md): clip each sample's gradient with a factor identical on every
    TP rank (rule 4), sum the clipped gradients over every micro-batch of the logical batch (rule
    5), add ``N(0, (σC)²)`` once to the sum — independent per TP rank for sharded parameters, TP
    rank 0's draw for replicated ones, on DP rank 0 only (rule 6) — all-reduce the sum over the DP
    group (rule 7), divide by the expected global logical batch for ``loss_reduction="mean"`` (rule
    8) and write it as ``param.grad`` with the parameter's own DTensor placements (rule 9).

    Args:
        optimizer: the wrapped optimizer (SGD, AdamW — foreach or fused —, ...).
        noise_multiplier: σ; 0 disables noise (ε is then infinite).
        max_grad_norm: C, the per-sample clip norm.
        expected_batch_size: B̄ = q·N, the expected *global* logical batch size.
        mesh: this rank's TP/DP groups.
        loss_reduction: ``"mean"`` or ``"sum"``, as used for the loss.
        noise_seed: base seed of the noise streams (agreed across ranks when None). Refused in
            secure mode, whose noise is keyed by fresh secret keys.
        secure_mode: draw noise from an AES-256-CTR keystream under a fresh ``os.urandom`` key per
            step and rank (hf_dp_tp.noise) instead of a seeded generator.

    Gradient accumulation: call :meth:`clip_and_accumulate` after each micro-batch's backward
    (it consumes ``param.grad_sample``) and :meth:`step` once per logical batch; or use
    :meth:`signal_skip_step` before ``step()`` as in Opacus.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        mesh: MeshInfo,
        loss_reduction: str = "mean",
        noise_seed: int | None = None,
        secure_mode: bool = False,
    ) -> None:
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(
                f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}"
            )
        if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm}")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(
                f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}"
            )
        if loss_reduction == "mean" and not expected_batch_size > 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        if secure_mode and noise_seed is not None:
            raise ValueError(
                "noise_seed cannot be set in secure_mode (its noise is keyed by fresh os.urandom keys)"
            )
        if noise_multiplier == 0:
            warnings.warn(
                "noise_multiplier=0: no noise is added, the training is NOT differentially private "
                "(epsilon is infinite). Use this only for debugging and equivalence checks.",
                stacklevel=2,
            )
        split_mixed_param_groups(optimizer)
        self.original_optimizer = optimizer
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = float(expected_batch_size)
        self.loss_reduction = loss_reduction
        self.mesh = mesh
        self.secure_mode = secure_mode
        self.noise_seed = None if secure_mode else agree_on_seed(noise_seed)
        self.steps_taken = 0
        self.accumulated_micro_batches = 0
        self.last_per_sample_norms: torch.Tensor | None = None
        self.last_clip_factors: torch.Tensor | None = None
        #: samples of this rank whose non-finite gradient was left out (TP peers count the same
        #: samples); data-dependent, so reported once at the end of training, never per step
        self.nonfinite_samples_zeroed = 0
        self.step_hooks: list[Callable[[DPOptimizerTP], None]] = []
        self._clipped_sums: dict[int, torch.Tensor] = {}
        self._scattered_sums: dict[int, torch.Tensor] = {}  # FSDP shards, streamed
        self._late_sums: dict[int, torch.Tensor | None] = {}  # of the step being taken
        self._step_params: list[torch.nn.Parameter] = []
        self._layouts: dict[int, ParamLayout] = {}
        self._skip_next_step = False
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()

    # ------------------------------------------------------------------ Optimizer protocol
    @property
    def param_groups(self) -> list[dict]:
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        self.original_optimizer.param_groups = value

    @property
    def state(self) -> dict:
        return self.original_optimizer.state

    @property
    def defaults(self) -> dict:
        return self.original_optimizer.defaults

    def add_param_group(self, param_group: dict) -> None:
        self.original_optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return (
            f"DPOptimizerTP(noise_multiplier={self.noise_multiplier}, max_grad_norm="
            f"{self.max_grad_norm}, expected_batch_size={self.expected_batch_size}, "
            f"optimizer={self.original_optimizer!r})"
        )

    def params(self) -> list[torch.nn.Parameter]:
        """Trainable parameters, in the wrapped optimizer's order (identical on every rank)."""
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def layout_of(self, param: torch.Tensor) -> ParamLayout:
        key = id(param)
        if key not in self._layouts:
            self._layouts[key] = param_layout(param)
        return self._layouts[key]

    def attach_step_hook(self, fn: Callable[[DPOptimizerTP], None]) -> None:
        """``fn(optimizer)`` runs after each noisy step (the privacy accountant's step)."""
        self.step_hooks.append(fn)

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Make the next ``step()`` only clip and accumulate (a micro-batch, not a real step)."""
        self._skip_next_step = do_skip

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``.grad``, per-sample grads and clipped sums (never between micro-batches)."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.params():
            if hasattr(p, "grad_sample"):
                p.grad_sample = None
        self._clipped_sums.clear()
        self._scattered_sums.clear()
        self.accumulated_micro_batches = 0

    # ------------------------------------------------------------------ DP-SGD stages
    def clip_and_accumulate(self, *, scatter: bool = False) -> None:
        """Stage 1, after each micro-batch's backward (contract rules 3-5, docs/usage.md): the
        per-sample norms of the last micro-batch(es) (rule 3), their clip factors (rule 4), and
        the clipped per-sample gradients added to the running sums (rule 5).

        ``scatter=True`` (FSDP): the clipped sums of large FSDP parameters (at least
        ``_REDUCE_SCATTER_MIN_NUMEL`` elements) are reduce-scattered over ``dp_shard`` at once,
        one parameter at a time, and only this rank's shard is kept: the gradient memory held
        between micro-batches falls to ≈ 1/dp_shard. It is a collective: every rank of the DP
        group must call it after each of its micro-batches, the same number of times, an empty
        micro-batch included (it then contributes zeros). Noise is still added once per step,
        by each shard's owner (:meth:`reduce`)."""
        samples = [
            (p, p.grad_sample) for p in self.params() if getattr(p, "grad_sample", None) is not None
        ]
        if not samples:
            already_clipped = self.accumulated_micro_batches > 0
            if not already_clipped and any(p.grad is not None for p in self.params()):
                raise RuntimeError(
                    "parameters have gradients but no per-sample gradients: the backward ran "
                    "without the grad-sample hooks (is the model in train() mode, and was the "
                    "controller attached before the forward pass?). Refusing to step."
                )
            if scatter:
                self.accumulate_clipped([], torch.ones(0), scatter=True)  # zeros, in lockstep
            return
        norms = reduce_squared_norms(
            [(squared_norms_of(g), self.layout_of(p).sharded) for p, g in samples], self.mesh
        )
        factors = self.clip_factors(norms)
        self.last_per_sample_norms, self.last_clip_factors = norms, factors
        self.accumulate_clipped(samples, factors, scatter=scatter, excluded=self._nonfinite(norms))
        self.accumulated_micro_batches += 1

    def clip_factors(self, norms: torch.Tensor) -> torch.Tensor:
        """Contract rule 4 (docs/usage.md): ``c_i = min(1, C / (n_i + 1e-6))``, bit-identical on
        every TP rank because ``norms`` are; 0 for a sample whose norm is NaN or inf (its
        gradient is left out of the clipped sum, :meth:`accumulate_clipped`)."""
        factors = (self.max_grad_norm / (norms + CLIP_EPSILON)).clamp(max=1.0)
        return torch.where(torch.isfinite(norms), factors, torch.zeros_like(factors))

    def _nonfinite(self, norms: torch.Tensor) -> torch.Tensor | None:
        """Samples whose per-sample gradient holds NaN or inf (their norm, all-reduced over TP,
        is then non-finite on every TP rank alike), or None when there is none. They add exactly
        zero to the clipped sum and training goes on: a record cannot date itself by destroying
        the model (contract, docs/usage.md). Counted for the end-of-run report only
        (:attr:`nonfinite_samples_zeroed`), never logged or raised per step."""
        bad = ~torch.isfinite(norms)
        if not bool(bad.any()):
            return None
        self.nonfinite_samples_zeroed += int(bad.sum())
        return bad

    def accumulate_clipped(
        self,
        samples: list[tuple[torch.nn.Parameter, GradSample]],
        factors: torch.Tensor,
        *,
        scatter: bool = False,
        excluded: torch.Tensor | None = None,
    ) -> None:
        """Contract rule 5 (docs/usage.md): add ``Σ_i c_i g_{p,i}`` (in at least fp32) to each
        parameter's running clipped sum and consume its ``grad_sample`` (materialised, or
        factored: then the sum is one contraction of its factors, :mod:`hf_dp_tp.ghost`).
        Samples flagged in ``excluded`` (bool ``[B]``: non-finite gradients) add exactly zero.
        ``scatter``: large FSDP parameters' sums (zeros for those this rank's samples did not
        reach) are reduce-scattered over ``dp_shard`` one by one, in parameter order, and added
        to this rank's shard (:meth:`clip_and_accumulate`)."""
        by_param = {id(p): g for p, g in samples}
        for p in self.params():
            grad_sample = by_param.pop(id(p), None)
            streamed = scatter and self._streamed(p)
            if grad_sample is None and not streamed:
                continue
            shape = self.layout_of(p).local_shape
            if grad_sample is None:
                clipped = self._zero_sum(p)
            else:
                clipped = clipped_sum_of(grad_sample, factors, excluded).reshape(shape)
                p.grad_sample = None
            if streamed:
                self._add_to(self._scattered_sums, p, _shard_over_dp(clipped, p, reduce=True))
            else:
                self._add_to(self._clipped_sums, p, clipped)
            del clipped

    @staticmethod
    def _add_to(sums: dict[int, torch.Tensor], param: torch.Tensor, value: torch.Tensor) -> None:
        key = id(param)
        if key in sums:
            sums[key].add_(value)
        else:
            sums[key] = value

    def _streamed(self, param: torch.Tensor) -> bool:
        """Whether ``clip_and_accumulate(scatter=True)`` reduce-scatters this parameter's sum
        per micro-batch: FSDP-sharded and at least ``_REDUCE_SCATTER_MIN_NUMEL`` elements."""
        if not self.layout_of(param).fsdp:
            return False
        return math.prod(self.layout_of(param).local_shape) >= _REDUCE_SCATTER_MIN_NUMEL

    def _zero_sum(self, param: torch.Tensor) -> torch.Tensor:
        """A zero clipped sum (TP-local, unsharded shape, at least fp32)."""
        local = param.to_local() if isinstance(param, DTensor) else param
        shape = self.layout_of(param).local_shape
        return torch.zeros(shape, dtype=accumulation_dtype(local), device=local.device)

    def take_clipped_sums(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        """This rank's clipped sum of each parameter (local shard), emptied from the running sums;
        zeros (in at least fp32) for a parameter that no sample reached, so that every rank takes
        part in every collective with the same tensors. A parameter whose sums were streamed
        (``clip_and_accumulate(scatter=True)``) gives its FSDP shard, already summed over
        ``dp_shard``; a sum accumulated after that without ``scatter`` is kept apart and added by
        :meth:`reduce`."""
        sums: list[torch.Tensor] = []
        self._late_sums = {}
        for p in params:
            total = self._clipped_sums.pop(id(p), None)
            shard = self._scattered_sums.pop(id(p), None)
            if shard is not None:
                self._late_sums[id(p)] = total
                sums.append(shard)
                continue
            sums.append(total if total is not None else self._zero_sum(p))
        return sums

    def add_noise(self, sums: list[torch.Tensor], layouts: list[ParamLayout]) -> None:
        """Contract rule 6 (docs/usage.md), in place on this rank's clipped sums: ``N(0, (σC)²)``
        drawn in each sum's own dtype, only on DP rank 0 (added once before the DP all-reduce);
        a sharded parameter's slice on every TP rank from that rank's own source (a seeded stream
        per TP rank, or a fresh secret key per rank and step in secure mode: independent across
        shards and steps); a replicated parameter's only on TP rank 0 (the others receive it with
        the TP broadcast that follows the all-reduce, so every TP peer holds the same noise).
        Parameters FSDP shards over DP are skipped here: their noise is added by each shard's
        owner after the reduction (:meth:`add_shard_noise`)."""
        if self.mesh.dp_rank != 0 or self.noise_multiplier == 0:
            return
        fsdp = self._fsdp_indices(len(sums))
        self._add_noise_to(
            [t for i, t in enumerate(sums) if i not in fsdp],
            [lay for i, lay in enumerate(layouts) if i not in fsdp],
            dp_rank=None,
        )

    def add_shard_noise(self, shards: list[torch.Tensor], layouts: list[ParamLayout]) -> None:
        """Contract rule 6 for parameters FSDP shards over DP, in place on this rank's shards of
        the clipped sums summed over ``dp_shard``: every ``dp_shard`` rank of the first replica
        (``dp_replicate`` rank 0; the only one without HSDP) adds ``N(0, (σC)²)`` to the shard it
        owns, from its own source (a seeded stream per shard and TP rank, or fresh secret keys),
        before the sum over replicas: each element of the gradient is noised exactly once,
        independently across owners and TP shards; a TP-replicated parameter's shard only on TP
        rank 0 (the TP broadcast that follows gives its peers the same noise)."""
        if self.noise_multiplier == 0 or not shards or self.mesh.dp_replicate_rank != 0:
            return
        self._add_noise_to(shards, layouts, dp_rank=self.mesh.dp_shard_rank)

    def _add_noise_to(
        self, tensors: list[torch.Tensor], layouts: list[ParamLayout], dp_rank: int | None
    ) -> None:
        """``N(0, (σC)²)`` in each tensor's dtype, from this rank's source for this step (one
        per TP rank, or per DP and TP rank for FSDP shard owners): on every TP rank for TP-sharded
        parameters, on TP rank 0 only for TP-replicated ones."""
        source = NoiseSource(
            seed=self.noise_seed,
            tp_rank=self.mesh.tp_rank,
            step=self.steps_taken,
            secure=self.secure_mode,
            dp_rank=dp_rank,
        )
        std = self.noise_multiplier * self.max_grad_norm
        for total, layout in zip(tensors, layouts, strict=True):
            if layout.sharded or self.mesh.tp_rank == 0:
                total.add_(source.normal(tuple(total.shape), std, total.device, dtype=total.dtype))

    def _fsdp_indices(self, count: int) -> set[int]:
        """Indices, among the parameters of the step being taken, of those FSDP shards over DP."""
        params = self._step_params if len(self._step_params) == count else []
        return {i for i, p in enumerate(params) if self.layout_of(p).fsdp}

    def reduce(self, sums: list[torch.Tensor], layouts: list[ParamLayout]) -> None:
        """Contract rule 7 (docs/usage.md), in place: sum the noised sums over the DP group, then
        give every TP rank TP rank 0's replicated sums (which alone carry the replicated noise of
        rule 6). Bucketed all-reduce for parameters replicated over DP.

        A parameter FSDP shards over DP (among the parameters of the step being taken,
        :meth:`add_noise_and_reduce`) ends with only its FSDP shard of the sum (``sums[i]`` is
        replaced by it): summed over ``dp_shard`` — a reduce-scatter for large ones, and for small
        ones (fewer than ``_REDUCE_SCATTER_MIN_NUMEL`` elements: one collective each would cost
        more than it saves) the bucketed all-reduce followed by a local cut —, then noised by its
        owner (:meth:`add_shard_noise`), then (HSDP) all-reduced over ``dp_replicate``; all before
        the TP broadcast."""
        fsdp = self._fsdp_indices(len(sums))
        params = self._step_params
        streamed = {i for i in fsdp if id(params[i]) in self._late_sums}
        scattered = {i for i in fsdp - streamed if sums[i].numel() >= _REDUCE_SCATTER_MIN_NUMEL}
        replicated_over_dp = [t for i, t in enumerate(sums) if i not in fsdp]
        small_fsdp = [t for i, t in enumerate(sums) if i in fsdp - streamed - scattered]
        if self.mesh.dp_replicate_size == 1:  # dp_shard is the whole DP group: one collective
            _flat_collective(replicated_over_dp + small_fsdp, self.mesh.all_reduce_dp)
        else:
            _flat_collective(replicated_over_dp, self.mesh.all_reduce_dp)
            _flat_collective(small_fsdp, self.mesh.all_reduce_dp_shard)
        order = sorted(fsdp)
        for i in order:
            if i not in streamed:
                sums[i] = _shard_over_dp(sums[i], params[i], reduce=i in scattered)
        self._add_late_sums(sums, [(i, params[i]) for i in sorted(streamed)])
        self.add_shard_noise([sums[i] for i in order], [layouts[i] for i in order])
        _flat_collective([sums[i] for i in order], self.mesh.all_reduce_dp_replicate)
        replicated = [t for t, lay in zip(sums, layouts, strict=True) if not lay.sharded]
        _flat_collective(replicated, self.mesh.broadcast_tp)

    def _add_late_sums(
        self, sums: list[torch.Tensor], streamed: list[tuple[int, torch.nn.Parameter]]
    ) -> None:
        """Add to the streamed shards ``sums[i]`` the sums accumulated after the last streamed
        micro-batch without ``scatter`` on any rank (one scalar all-reduce decides, so that every
        rank takes part in the same reduce-scatters)."""
        if not streamed:
            return
        late = [self._late_sums.get(id(p)) for _, p in streamed]
        flag = torch.tensor(
            [float(any(t is not None for t in late))], device=sums[streamed[0][0]].device
        )
        self.mesh.all_reduce_dp(flag)
        if flag.item() == 0:
            return
        for (i, p), total in zip(streamed, late, strict=True):
            total = total if total is not None else self._zero_sum(p)
            sums[i].add_(_shard_over_dp(total, p, reduce=True))

    def scale(self, sums: list[torch.Tensor]) -> None:
        """Contract rule 8 (docs/usage.md), in place: divide by B̄, the expected *global* logical
        batch, for ``loss_reduction="mean"``; leave the sum for ``"sum"``."""
        factor = 1.0 / self.expected_batch_size if self.loss_reduction == "mean" else 1.0
        for total in sums:
            total.mul_(factor)

    def write_grads(self, params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> None:
        """Contract rule 9 (docs/usage.md): each local gradient becomes ``param.grad``."""
        for p, grad in zip(params, grads, strict=True):
            self._write_grad(p, grad)

    def add_noise_and_reduce(self) -> None:
        """The once-per-step stages, in order: take the clipped sums, add noise once (rule 6),
        reduce over DP and sync replicated sums over TP (rule 7), scale (rule 8), write the
        gradients (rule 9); then count the noisy step."""
        params = self.params()
        sums = self.take_clipped_sums(params)
        layouts = [self.layout_of(p) for p in params]
        # add_noise() and reduce() treat FSDP-sharded parameters apart (noise by shard owners)
        self._step_params = params
        try:
            self.add_noise(sums, layouts)
            self.reduce(sums, layouts)
        finally:
            self._step_params = []
            self._late_sums = {}
        self.scale(sums)
        self.write_grads(params, sums)
        self.steps_taken += 1

    @staticmethod
    def _write_grad(param: torch.nn.Parameter, local_grad: torch.Tensor) -> None:
        """Contract rule 9 (docs/usage.md): a DTensor grad with the parameter's placements, so the
        wrapped optimizer (foreach or fused) really reads it (for a parameter FSDP shards over DP,
        ``local_grad`` is already this rank's FSDP shard, from :meth:`reduce`)."""
        if isinstance(param, DTensor):
            local_grad = local_grad.to(param.to_local().dtype)
            param.grad = DTensor.from_local(
                local_grad,
                param.device_mesh,
                param.placements,
                run_check=False,
                shape=param.shape,
                stride=param.stride(),
            )
        else:
            param.grad = local_grad.to(param.dtype).view_as(param)

    def pre_step(self) -> bool:
        """Everything DP-SGD does before the wrapped step; False when this step is skipped."""
        self.clip_and_accumulate()
        if self._skip_next_step:
            self._skip_next_step = False
            return False
        self.add_noise_and_reduce()
        for hook in self.step_hooks:
            hook(self)
        self.accumulated_micro_batches = 0
        return True

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.pre_step():
            self.original_optimizer.step()
        return loss

    # ------------------------------------------------------------------ checkpoints
    def dp_state_dict(self) -> dict[str, Any]:
        """The optimizer's part of the privacy ledger. Never the noise seed: with it and two
        checkpoints the noise can be subtracted (docs/usage.md, "Checkpointing the privacy
        ledger"). The step count keeps a resumed run with the same seed on fresh streams."""
        return {
            "steps_taken": self.steps_taken,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "expected_batch_size": self.expected_batch_size,
            "secure_mode": self.secure_mode,
        }

    def load_dp_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("secure_mode", False) != self.secure_mode:
            raise ValueError("the checkpoint's secure_mode differs from this optimizer's")
        self.steps_taken = int(state["steps_taken"])

    def state_dict(self) -> dict[str, Any]:
        state = self.original_optimizer.state_dict()
        state["dp_state"] = self.dp_state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        dp_state = state_dict.pop("dp_state", None)
        self.original_optimizer.load_state_dict(state_dict)
        if dp_state is not None:
            self.load_dp_state_dict(dp_state)
