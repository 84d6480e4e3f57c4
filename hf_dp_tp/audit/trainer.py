"""``AuditTrainer``: a :class:`~hf_dp_tp.DPTrainer` that trains with canaries and scores them.

Everything DP-SGD does is the DPTrainer's own code path: the Poisson loader (over ``N + m``
indices), per-sample gradients on local shards, norms over the TP group, clipping, the clipped
sum, noise, the DP all-reduce, scaling and the accountant. The audit adds three things, each at
a seam of the package:

- the data: a :class:`~hf_dp_tp.audit.canaries.CanaryDataset` and its collator
  (``_dataset_and_collator``), so canaries are drawn by the same sampler as the records;
- the optimizer: :class:`CanaryDPOptimizer` (``DPTrainer.dp_optimizer_class``) appends the
  per-sample gradients of the gradient canaries of a micro-batch to the per-sample gradients of
  its records, before :meth:`~hf_dp_tp.DPOptimizerTP.clip_and_accumulate` norms, clips and sums
  them;
- a step hook that adds each step's privatised gradient (what DP-SGD releases) to a running sum,
  which the gradient canaries are scored against.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..ghost import FactoredGradSample, batch_size_of
from ..optimizer import DPOptimizerTP
from ..randomness import share_seed
from ..trainer import DPTrainer
from .canaries import (
    CANARY_KEY,
    CANARY_KINDS,
    DEFAULT_SUPPORT,
    CanaryCollator,
    CanaryDataset,
    GradientCanaries,
    draw_inclusion,
)


class CanaryDPOptimizer(DPOptimizerTP):
    """``DPOptimizerTP`` whose next :meth:`clip_and_accumulate` also clips and sums the gradient
    canaries set in :attr:`pending_canaries`, as extra samples of the micro-batch."""

    canaries: GradientCanaries | None = None
    #: per-sample gradient norm G of a canary before clipping (set by the trainer)
    canary_gradient_norm: float = 1.0
    pending_canaries: torch.Tensor | None = None

    def clip_and_accumulate(self, *, scatter: bool = False) -> None:
        ids, self.pending_canaries = self.pending_canaries, None
        if ids is not None and ids.numel() > 0 and self.canaries is not None:
            params = self.params()
            existing = [getattr(p, "grad_sample", None) for p in params]
            num_records = next((batch_size_of(g) for g in existing if g is not None), 0)
            dtypes = [
                g.dtype if g is not None else (p.to_local() if isinstance(p, DTensor) else p).dtype
                for p, g in zip(params, existing, strict=True)
            ]
            rows = self.canaries.per_sample_rows(ids, self.canary_gradient_norm, dtypes)
            for p, g, row in zip(params, existing, rows, strict=True):
                if isinstance(g, FactoredGradSample):
                    g.append_samples(row.to(g.generations[0][0].dtype))
                    continue
                if g is None:
                    g = row.new_zeros((num_records, *row.shape[1:]))
                p.grad_sample = torch.cat([g, row.to(g.device)])
        super().clip_and_accumulate(scatter=scatter)


class AuditTrainer(DPTrainer):
    """A ``DPTrainer`` run with ``num_canaries`` canaries of ``canary_kind``.

    Args:
        model, args, **kwargs: as :class:`~hf_dp_tp.DPTrainer` (``train_dataset`` holds the
            ordinary records).
        num_canaries: m.
        canary_kind: ``"gradient"`` or ``"input"``.
        canary_records: input canaries only: ``m`` records in the format of the training
            records (e.g. :func:`~hf_dp_tp.audit.canaries.random_token_canaries`).
        canary_gradient_norm: gradient canaries only: their per-sample gradient norm before
            clipping, as a multiple of C (≥ 1: clipping must bring it down to C).
        canary_support: gradient canaries only: parameter elements each direction is spread
            over (at most; all of them on small models).
        audit_seed: seed of the canary inclusion, directions and input canaries. None (the
            default) draws a fresh one from ``os.urandom``, agreed by all ranks; fix it for tests.
    """

    dp_optimizer_class = CanaryDPOptimizer

    def __init__(
        self,
        model: nn.Module | None = None,
        args: Any = None,
        *,
        num_canaries: int,
        canary_kind: str = "gradient",
        canary_records: list[dict[str, Any]] | None = None,
        canary_gradient_norm: float = 10.0,
        canary_support: int = DEFAULT_SUPPORT,
        audit_seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        if canary_kind not in CANARY_KINDS:
            raise ValueError(f"canary_kind must be one of {CANARY_KINDS}, got {canary_kind!r}")
        if canary_kind == "input" and (
            canary_records is None or len(canary_records) != num_canaries
        ):
            raise ValueError("input canaries need canary_records: one record per canary")
        if not (math.isfinite(canary_gradient_norm) and canary_gradient_norm >= 1.0):
            raise ValueError(
                f"canary_gradient_norm must be >= 1 (a multiple of C), got {canary_gradient_norm}"
            )
        records = kwargs.pop("train_dataset", None)
        if records is None:
            raise ValueError("AuditTrainer needs train_dataset (the ordinary records)")
        self.canary_kind = canary_kind
        self.num_canaries = int(num_canaries)
        self.canary_records = canary_records
        self.canary_gradient_norm = float(canary_gradient_norm)
        self.canary_support = int(canary_support)
        super().__init__(model, args, train_dataset=CanaryDataset(records, num_canaries), **kwargs)
        self.audit_seed = int(share_seed(audit_seed))  # identical on every rank
        self.included = draw_inclusion(self.num_canaries, self.audit_seed)
        self.gradient_canaries: GradientCanaries | None = None
        self._update_sum: torch.Tensor | None = None
        self._losses_before: torch.Tensor | None = None

    # ------------------------------------------------------------------ data
    def _dataset_and_collator(self, dataset, description: str):
        if not isinstance(dataset, CanaryDataset):
            return super()._dataset_and_collator(dataset, description)
        records, collator = super()._dataset_and_collator(dataset.records, description)
        if collator is None:
            from torch.utils.data import default_collate

            collator = default_collate
        canary_records = self.canary_records if self.canary_kind == "input" else None
        wrapped = CanaryCollator(collator, self.included, canary_records, records[0])
        return dataset.with_records(records), wrapped

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if self.canary_kind == "gradient" and optimizer.canaries is None:
            params = optimizer.params()
            self.gradient_canaries = GradientCanaries(
                params,
                [optimizer.layout_of(p) for p in params],
                self.mesh_info,
                self.num_canaries,
                self.audit_seed,
                support=self.canary_support,
            )
            optimizer.canaries = self.gradient_canaries
            optimizer.canary_gradient_norm = (
                self.canary_gradient_norm * self.args.per_sample_max_grad_norm
            )
            optimizer.attach_step_hook(self._add_released_gradient)
        return optimizer

    def _add_released_gradient(self, optimizer: DPOptimizerTP) -> None:
        """Step hook (after noise, DP reduction and scaling): add the privatised gradient."""
        parts = []
        for p in optimizer.params():
            grad = p.grad
            if isinstance(grad, DTensor):
                grad = grad.to_local()
            parts.append(grad.detach().reshape(-1).to(torch.float64))
        flat = torch.cat(parts)
        if self._update_sum is None:
            self._update_sum = flat
        else:
            self._update_sum.add_(flat)

    # ------------------------------------------------------------------ step
    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args, **kwargs):
        ids = inputs.pop(CANARY_KEY)
        if self.canary_kind == "input":
            return super().training_step(model, inputs, *args, **kwargs)
        optimizer = self._dp_optimizer
        optimizer.pending_canaries = ids if ids.numel() > 0 else None
        loss = super().training_step(model, inputs, *args, **kwargs)
        if optimizer.pending_canaries is not None:
            # no ordinary record in this micro-batch (no backward ran): the canaries alone
            optimizer.clip_and_accumulate()
        return loss

    # ------------------------------------------------------------------ scores
    @torch.no_grad()
    def canary_losses(self, batch_size: int = 64) -> torch.Tensor:
        """``[m]`` per-canary losses of the current model on the input canaries (every rank takes
        part; TP peers process the same batches)."""
        collate = self.data_collator
        model = self.model
        was_training = model.training
        model.eval()
        losses = []
        try:
            for start in range(0, self.num_canaries, batch_size):
                batch = collate(self.canary_records[start : start + batch_size])
                batch = self._prepare_inputs(dict(batch))
                with self.grad_sample_controller.hooks_disabled():
                    values, _ = self.per_sample_loss(model, batch)
                losses.append(values.detach().double().cpu())
        finally:
            model.train(was_training)
        return torch.cat(losses)

    def train(self, *args, **kwargs):
        if self.canary_kind == "input" and self._losses_before is None:
            self._losses_before = self.canary_losses()
        return super().train(*args, **kwargs)

    def canary_scores(self) -> np.ndarray:
        """``[m]`` scores, higher meaning "more likely included": for gradient canaries the sum of
        the released gradients against each direction, in units of one clipped canary
        (``⟨Σ_t B̄·g̃_t, û_j⟩ / C``); for input canaries the drop of each canary's loss."""
        if self.canary_kind == "input":
            if self._losses_before is None:
                raise RuntimeError("train() first")
            return (self._losses_before - self.canary_losses()).numpy()
        if self._update_sum is None or self.gradient_canaries is None:
            raise RuntimeError("train() first: no released gradient was recorded")
        optimizer = self._dp_optimizer
        scale = optimizer.max_grad_norm
        if optimizer.loss_reduction == "mean":
            scale = scale / optimizer.expected_batch_size
        scores = self.gradient_canaries.scores(self._update_sum) / scale
        return scores.numpy()

    def audit_record(self) -> dict[str, Any]:
        """What the report needs from this run, identical on every rank."""
        scores = self.canary_scores()
        if dist.is_initialized() and dist.get_world_size() > 1:
            # DP replicas hold the same released gradients; take global rank 0's scores anyway
            tensor = torch.from_numpy(scores).to(self.args.device)
            dist.broadcast(tensor, src=0)
            scores = tensor.cpu().numpy()
        return {
            "scores": scores,
            "included": self.included.numpy().copy(),
            "claimed_epsilon": self.get_epsilon(),
            "delta": self.target_delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.privacy_plan.steps_accounted,
            "expected_batch_size": self.expected_batch_size,
            "dataset_size": self.train_size,
            "records": self.train_size - self.num_canaries,
            "dp_size": self.mesh_info.dp_size,
            "tp_size": self.mesh_info.tp_size,
            "per_sample_max_grad_norm": self.args.per_sample_max_grad_norm,
            "canary_kind": self.canary_kind,
            "canary_gradient_norm": self.canary_gradient_norm,
            "canary_support": self.gradient_canaries.support if self.gradient_canaries else None,
            "grad_sample_mode": self.args.grad_sample_mode,
            "accountant": self.args.accountant,
        }
