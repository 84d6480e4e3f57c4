"""Models and losses that mix samples without BatchNorm, and the replace-one sensitivity of the
clipped sum they reach (the attacks of tests/test_sample_mixing.py).

DP-SGD's guarantee rests on one record changing only its own clipped gradient: replacing it moves
the clipped sum ``Σ_i clip_C(g_i)`` by at most ``2C``. Each construction here lets one record
change the *other* samples' losses or gradients, so the sum moves further.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from hf_dp_tp import GradSampleControllerTP
from hf_dp_tp.parallel import MeshInfo
from tests import models

FEATURES = 4


class BatchCentering(nn.Module):
    """Parameter-free: subtracts the batch mean (a "BatchNorm" no class list knows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


class FunctionalBatchNorm(nn.Module):
    """Batch statistics through ``F.batch_norm`` inside a module of no known class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, training=True)


class MixingLayerNorm(nn.LayerNorm):
    """A LayerNorm that adds the batch mean of its input, only for batches of more than two
    samples: the two-sample probe of an alias sees a per-sample LayerNorm, and the first-step
    self-check passes (the weight's gradient is still ``Σ g ⊙ x̂``), but upstream layers get
    gradients mixed across samples."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if x.shape[0] > 2:
            out = out + x.mean(0, keepdim=True)
        return out


class MixingNet(nn.Module):
    """``Linear → mixer → tanh → Linear`` on ``[B, FEATURES]`` inputs."""

    def __init__(self, mixer: nn.Module, hidden: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(FEATURES, hidden)
        self.mixer = mixer
        self.out = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(torch.tanh(self.mixer(self.inp(x))))


def mixing_model(kind: str) -> nn.Module:
    """``"centering"``, ``"functional_bn"`` or ``"layernorm_subclass"`` (the subclass must be
    aliased to ``nn.LayerNorm``'s rule, as a user would do, before a controller attaches)."""
    torch.manual_seed(0)
    mixer = {
        "centering": BatchCentering,
        "functional_bn": FunctionalBatchNorm,
        "layernorm_subclass": lambda: MixingLayerNorm(8),
    }[kind]()
    return MixingNet(mixer)


def squared_output_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each sample's squared output: depends on that sample only when the model does not mix."""
    return model(batch["x"]).pow(2).sum(1)


class Encoder(nn.Module):
    """Embeds ``x`` and ``y`` of a pair with one linear map."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(FEATURES, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, **kwargs):
        return {"zx": self.proj(x), "zy": self.proj(y) if y is not None else None}


def contrastive_per_sample_loss(model: nn.Module, inputs) -> tuple[torch.Tensor, dict]:
    """In-batch contrastive loss: ``ℓ_i = -log softmax_j(⟨zx_i, zy_j⟩)_i`` — each "per-sample"
    loss has every other sample of the batch in its denominator."""
    out = model(inputs["x"], inputs["y"])
    logits = out["zx"] @ out["zy"].T
    targets = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, targets, reduction="none"), out


def contrastive_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return contrastive_per_sample_loss(model, batch)[0]


class SequenceFirstNet(nn.Module):
    """Sequence-first ``[T, B, F]``: a cumulative sum over dim 0 (time) mixes what the hooks,
    taking dim 0 as the batch, treat as samples. With ``T == B`` every size check passes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(FEATURES, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.inp(x).cumsum(0))


def sequence_first_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sample ``b`` is column ``b`` of ``x [T, B, F]``: its loss sums its own time steps."""
    return model(batch["x"]).pow(2).sum((0, 2))


def batch(n: int, seed: int = 1, *, sequence_first: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if sequence_first:
        return {"x": torch.randn(n, n, FEATURES, generator=g)}  # [T, B, F] with T = B
    return {"x": torch.randn(n, FEATURES, generator=g), "y": torch.randn(n, FEATURES, generator=g)}


#: Replacements of record 0 an attacker may choose: a rescaled copy, a large constant record.
REPLACEMENTS = (lambda r: -30 * r + 10, lambda r: torch.full_like(r, 10.0))


def replace_first(data: dict[str, torch.Tensor], how, *, sequence_first: bool = False):
    """The neighbouring batch: record 0 replaced by ``how(record 0)``."""
    out = {k: v.clone() for k, v in data.items()}
    for value in out.values():
        if sequence_first:
            value[:, 0] = how(value[:, 0])
        else:
            value[0] = how(value[0])
    return out


def clipped_sum(
    model_fn, losses_fn, data: dict[str, torch.Tensor], *, clip: float = 1.0, **controller_kwargs
) -> torch.Tensor:
    """``Σ_i clip_C(g_i)`` (σ = 0) as one step of SGD(lr=1) with ``B̄ = 1``, flattened."""
    torch.manual_seed(0)
    model = model_fn()
    controller = GradSampleControllerTP(model, grad_sample_mode="hooks", **controller_kwargs)
    optimizer = models.unit_sgd_dp_optimizer(model, MeshInfo(), clip=clip, expected_batch=1)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    losses = losses_fn(model, data)
    controller.check_batch_size(losses.shape[0])
    losses.mean().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer.step()
    controller.cleanup()
    return before - torch.cat([p.detach().flatten() for p in model.parameters()])


def sensitivity(
    model_fn, losses_fn, *, n: int = 8, clip: float = 1.0, sequence_first: bool = False, **kw
) -> float:
    """``max ‖Σ clip(g_i)(D) − Σ clip(g_i)(D')‖`` over the neighbours D' of D (record 0 replaced
    as in :data:`REPLACEMENTS`), with σ = 0; DP-SGD needs it ≤ 2C."""
    data = batch(n, sequence_first=sequence_first)
    a = clipped_sum(model_fn, losses_fn, data, clip=clip, **kw)
    worst = 0.0
    for how in REPLACEMENTS:
        neighbour = replace_first(data, how, sequence_first=sequence_first)
        b = clipped_sum(model_fn, losses_fn, neighbour, clip=clip, **kw)
        worst = max(worst, float((a - b).norm()))
    return worst
