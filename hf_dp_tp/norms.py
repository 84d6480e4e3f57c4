"""Per-sample gradient norms from per-layer squared norms (contract rule 3, docs/usage.md).

Whatever produces them (per-sample gradients materialised by hooks today; norms computed without
materialising later), every trainable parameter contributes a vector of squared norms ``[B]`` of
its *local* piece, flagged sharded (each TP rank holds a disjoint slice: summed over the TP group)
or replicated (every TP rank holds all of it: counted once). :func:`reduce_squared_norms` turns
those into the per-sample norms ``n_i``, bit-identical on every TP rank.
"""

from __future__ import annotations

import torch

from .parallel import MeshInfo, ParamLayout

#: Largest relative spread tolerated between TP ranks' squared norms of replicated parameters.
REPLICA_MISMATCH_TOLERANCE = 1e-2


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision tensors (norms and sums are never accumulated in bf16/fp16)."""
    return torch.promote_types(t.dtype, torch.float32)


def squared_norm_per_sample(grad_sample: torch.Tensor) -> torch.Tensor:
    """``Σ_j g[i, j]²`` in at least fp32, shape ``[B]``."""
    g = grad_sample.to(accumulation_dtype(grad_sample))
    return g.pow(2).flatten(1).sum(1)  # flatten, not reshape(B, -1): B may be 0


def reduce_squared_norms(
    squared_norms: list[tuple[torch.Tensor, bool]], mesh: MeshInfo
) -> torch.Tensor | None:
    """Contract rule 3 (docs/usage.md) on per-layer squared norms ``(s_p [B], sharded_p)``:
    ``n_i = sqrt(all_reduce_TP(Σ_sharded s_p,i) + Σ_replicated s_p,i)``, accumulated in the dtype
    of the first entry (at least fp32: pass squared norms computed in at least fp32).

    Replicated squares are added on TP rank 0 only, inside the same all-reduce, so they count
    once and the result is bit-identical on every TP rank. The same all-reduce also carries each
    rank's replicated squares and their squares, so every rank can check (identically) that the
    "replicated" per-sample grads really agree across the TP group — a plain module fed a
    rank-local slice would not — and refuse to step otherwise. Returns None for an empty list.
    """
    if not squared_norms:
        return None
    sizes = {s.shape[0] for s, _ in squared_norms}
    if len(sizes) != 1:
        raise RuntimeError(
            f"per-sample grads of different batch sizes {sorted(sizes)}: call "
            "optimizer.clip_and_accumulate() after every backward pass (gradient accumulation), "
            "and make every trainable module take part in every forward pass."
        )
    device = squared_norms[0][0].device
    dtype = accumulation_dtype(squared_norms[0][0])
    batch = sizes.pop()
    sharded = torch.zeros(batch, dtype=dtype, device=device)
    replicated = torch.zeros_like(sharded)
    for s, is_sharded in squared_norms:
        (sharded if is_sharded else replicated).add_(s.to(dtype))
    if mesh.tp_size == 1 or batch == 0:
        return (sharded + replicated).sqrt()
    rep = replicated.double()
    packed = torch.stack(
        [(sharded + replicated if mesh.tp_rank == 0 else sharded).double(), rep, rep * rep]
    )
    mesh.all_reduce_tp(packed)
    total, rep_sum, rep_sq_sum = packed
    mean = rep_sum / mesh.tp_size
    spread = (rep_sq_sum / mesh.tp_size - mean * mean).clamp_min(0).sqrt()
    if bool((spread > REPLICA_MISMATCH_TOLERANCE * mean + 1e-30).any()):
        worst = (spread / mean.clamp_min(1e-30)).max().item()
        raise RuntimeError(
            "per-sample gradients of replicated parameters differ across TP ranks (relative "
            f"spread {worst:.3g}): some plain (non-DTensor) trainable module sees rank-local "
            "activations, e.g. a layer placed after a column-wise layer without gathering its "
            "output. Shard it in the TP plan or gather its input (output_layouts=Replicate())."
        )
    return total.to(dtype).sqrt()


def per_sample_norms(
    grad_samples: list[tuple[torch.Tensor, ParamLayout]], mesh: MeshInfo
) -> torch.Tensor | None:
    """Contract rule 3 (docs/usage.md) on materialised per-sample gradients
    ``(g_p [B, *local_shape], layout_p)``: each one's squared norm per sample (at least fp32),
    reduced by :func:`reduce_squared_norms`. Returns None when nothing was sampled."""
    return reduce_squared_norms(
        [(squared_norm_per_sample(g), layout.sharded) for g, layout in grad_samples], mesh
    )
