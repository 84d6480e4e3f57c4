"""FSDP2 over the DP dim × TP (engine level): one DP-SGD step equals single-process DP-SGD.

The model is parallelized over ``mesh["tp"]``, then ``fully_shard`` over ``mesh["dp"]`` (per
layer and the root, as torchtitan does). Per-sample gradients / ghost factors are taken on FSDP's
unsharded TP-local weights, clip factors are reduced over TP only, the clipped sums are summed
over DP and each rank keeps its FSDP shard of the gradient.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.distributed.fsdp import fully_shard

from hf_dp_tp import GradSampleControllerTP, init_dp_tp_mesh
from hf_dp_tp.parallel import apply_tp_plan, dim_mesh, fsdp_mesh_of
from tests import models
from tests.distributed_harness import run_distributed

BATCH = 8
TOLERANCE = 1e-9


def _case(name: str, tmp: str):
    torch.manual_seed(0)
    if name == "toy_mlp":
        model = models.ToyMLP()
        return model, models.toy_mlp_plan(), models.toy_mlp_batch(BATCH), models.toy_mlp_losses
    if name in ("llama_hf_plan", "llama_tied_hf_plan"):
        model = models.load_tiny_llama(f"{tmp}/{'tied' if 'tied' in name else 'untied'}")
        return model, "auto", models.lm_batch(BATCH, vocab=64, seq=8), models.llama_losses
    raise ValueError(name)


def _shard(model, dp_mesh) -> None:
    """``fully_shard`` per block (decoder layers, or the toy model's layers), then the root."""
    inner = getattr(getattr(model, "model", None), "layers", None)
    for block in inner if inner is not None else model.children():
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)


def _run(name: str, tmp: str, tp_size: int, mode: str, dp_replicate: int = 1) -> dict[str, float]:
    """``mode``: a ``grad_sample_mode``; ``"<mode>+accumulation"`` runs the DP share as two
    micro-batches (``clip_and_accumulate`` after the first); ``"<mode>+scatter"`` reduce-scatters
    every FSDP sum (by default only large ones are; small ones are all-reduced and cut).
    ``dp_replicate`` > 1: HSDP (FSDP over ``dp_shard``, replicas over ``dp_replicate``)."""
    from unittest import mock

    from hf_dp_tp import optimizer as optimizer_module

    mode, _, variant = mode.partition("+")
    small = variant in ("scatter", "stream", "stream_late")  # every FSDP sum counts as large
    threshold = 0 if small else optimizer_module._REDUCE_SCATTER_MIN_NUMEL
    with mock.patch.object(optimizer_module, "_REDUCE_SCATTER_MIN_NUMEL", threshold):
        return _run_variant(name, tmp, tp_size, mode, variant, replicas=dp_replicate)


def _micro_batches(share: dict, dp_rank: int) -> list[dict]:
    """This rank's share as three micro-batches, one of them empty (at a rank-dependent place):
    the ranks' lockstep calls of ``clip_and_accumulate(scatter=True)`` must hold anyway."""
    rows = len(next(iter(share.values())))
    cut = rows // 2
    parts = [{k: v[:cut] for k, v in share.items()}, {k: v[cut:] for k, v in share.items()}]
    parts.insert(dp_rank % 3, {k: v[:0] for k, v in share.items()})
    return parts


def _run_variant(name: str, tmp: str, tp_size: int, mode: str, variant: str, replicas: int) -> dict:
    """``variant`` "stream": three micro-batches with ``clip_and_accumulate(scatter=True)``;
    "stream_late": the last one left to ``step()`` (accumulated unscattered, added late)."""
    mesh = init_dp_tp_mesh(tp_size, dp_replicate_size=replicas)
    dp_mesh = dim_mesh(mesh, "dp")
    dp_rank, dp_size = dp_mesh.get_local_rank(), dp_mesh.size()
    model, plan, batch, loss_fn = _case(name, tmp)
    model.double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    reference = copy.deepcopy(model)
    grads, norms = models.reference_per_sample_grads(reference, loss_fn, batch)
    clip = 0.5 * norms.min().item()
    expected = models.reference_dp_update(grads, norms, clip, BATCH)
    before = models.full_params(reference)

    if tp_size > 1:
        apply_tp_plan(model, mesh["tp"], plan)
    _shard(model, fsdp_mesh_of(mesh))
    controller = GradSampleControllerTP(model, device_mesh=mesh, grad_sample_mode=mode)
    optimizer = models.unit_sgd_dp_optimizer(
        model, controller.mesh, clip=clip, expected_batch=BATCH
    )
    rows = slice(dp_rank, None, dp_size)
    clean = torch.ones(BATCH, dtype=torch.bool)
    if variant == "nonfinite":
        # the last two records get a NaN and an inf loss: each must add exactly nothing
        # (contract: a non-finite per-sample gradient contributes zero), B̄ unchanged
        poison = torch.ones(BATCH, dtype=torch.float64)
        poison[-2:] = torch.tensor([math.nan, math.inf])
        clean = poison == 1
        expected = models.reference_dp_update(
            {k: g[clean] for k, g in grads.items()}, norms[clean], clip, BATCH
        )
        plain_loss_fn = loss_fn

        def loss_fn(model, part, poison=poison[rows]):  # noqa: F811 - the poisoned loss
            return plain_loss_fn(model, part) * poison

    share = {k: v[rows] for k, v in batch.items()}
    held_fraction = None
    if variant in ("stream", "stream_late"):
        got = []
        parts = _micro_batches(share, dp_rank)
        for i, part in enumerate(parts):
            empty = len(next(iter(part.values()))) == 0
            if not empty:
                loss_fn(model, part).mean().backward()
                got.append(controller.get_per_sample_norms())
            else:  # FSDP's all-gathers need every rank: a discarded stand-in pass
                (loss_fn(model, {k: v[:1] for k, v in batch.items()}) * 0.0).sum().backward()
                controller.zero_grad_sample()
            if variant == "stream_late" and i == len(parts) - 1:
                break  # step() clips it without scatter
            optimizer.clip_and_accumulate(scatter=True)
            held = sum(t.numel() for t in optimizer._clipped_sums.values())  # noqa: SLF001
            held += sum(t.numel() for t in optimizer._scattered_sums.values())  # noqa: SLF001
            local = sum(
                math.prod(controller.layout_of(p).local_shape)
                for p in controller.trainable_parameters()
            )
            shards = sum(p.to_local().numel() for p in controller.trainable_parameters())
            held_fraction = (held / local, shards / local)  # held, and FSDP's own shards
        got_norms = torch.cat(got)
    elif variant == "accumulation":
        half = len(next(iter(share.values()))) // 2
        loss_fn(model, {k: v[:half] for k, v in share.items()}).mean().backward()
        first = controller.get_per_sample_norms()
        optimizer.clip_and_accumulate()
        loss_fn(model, {k: v[half:] for k, v in share.items()}).mean().backward()
        got_norms = torch.cat([first, controller.get_per_sample_norms()])
    else:
        loss_fn(model, share).mean().backward()
        got_norms = controller.get_per_sample_norms()
    # the first-step self-check ran on FSDP's unsharded weights (autograd reaches those)
    checked = controller._self_checked  # noqa: SLF001 (test of the mechanism)
    all_checked = all(id(p) in checked for p in controller.trainable_parameters())
    # FSDP never reduce-scatters the raw (non-private) gradients: nothing reached the shards
    reduced_by_fsdp = [n for n, p in model.named_parameters() if p.grad is not None]
    optimizer.step()
    after = models.full_params(model)
    positions, kept = torch.arange(len(clean))[rows], clean[rows]
    if variant == "nonfinite":
        all_checked = True  # its only backward holds NaN: the self-check waits for a later one
        zeroed = (~kept).sum().item()
        assert optimizer.nonfinite_samples_zeroed == zeroed, optimizer.nonfinite_samples_zeroed
        got_norms = got_norms[kept]
    ref_norms = norms[positions[kept]]
    norm_err = ((got_norms.double() - ref_norms).abs().max() / ref_norms.max()).item()
    update_err = 0.0
    for key, ref_update in expected.items():
        applied = (before[key] - after[key]).double()
        err = (applied - ref_update).abs().max() / ref_update.abs().max().clamp_min(1e-12)
        update_err = max(update_err, err.item()) if torch.isfinite(err) else math.inf
    controller.cleanup()
    return {
        "norm_err": norm_err,
        "update_err": update_err,
        "self_checked": all_checked,
        "reduced_by_fsdp": reduced_by_fsdp,
        "held_fraction": held_fraction,
        "dp_shard": mesh["dp_shard" if replicas > 1 else "dp"].size(),
    }


ALL_MODES = (
    "tp",
    "ghost",
    "ghost+accumulation",
    "ghost+scatter",
    "tp+scatter",
    "ghost+stream",
    "tp+stream_late",
    "tp+nonfinite",
    "ghost+nonfinite",
)


def _worker(
    rank: int,
    world: int,
    cases: list[str],
    tmp: str,
    tp_size: int,
    dp_replicate: int = 1,
    modes: tuple[str, ...] = ALL_MODES,
) -> dict:
    return {f"{c} [{m}]": _run(c, tmp, tp_size, m, dp_replicate) for c in cases for m in modes}


CASES = ["toy_mlp", "llama_hf_plan", "llama_tied_hf_plan"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    models.save_tiny_llama(str(root / "untied"), tie=False)
    models.save_tiny_llama(str(root / "tied"), tie=True)
    return str(root)


def _check(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        for case, r in result.items():
            print(f"rank={rank} {case}: {r}")
            assert r["norm_err"] < TOLERANCE and r["update_err"] < TOLERANCE, (case, r)
            assert r["self_checked"], case
            assert r["reduced_by_fsdp"] == [], (case, r["reduced_by_fsdp"])
            if r["held_fraction"] is not None:  # streamed: only this rank's shards are held
                held, shards = r["held_fraction"]
                assert held == shards and shards <= 1 / r["dp_shard"] + 0.05, (case, r)


def test_fsdp2_only_dp2_matches_single_process_dp_sgd(llama_dir):
    _check(run_distributed(_worker, 2, CASES, llama_dir, 1))


def test_fsdp2_dp2_tp2_matches_single_process_dp_sgd(llama_dir):
    _check(run_distributed(_worker, 4, CASES, llama_dir, 2))


HSDP_MODES = ("tp", "ghost+accumulation", "ghost+scatter", "ghost+stream")


def test_hsdp_replicate2_shard2_matches_single_process_dp_sgd(llama_dir):
    """HSDP: 2 replicas × FSDP over 2 ranks each (``("dp_replicate", "dp_shard", "tp")`` mesh,
    tp 1): sums reduce-scattered over dp_shard, then summed over the replicas."""
    _check(run_distributed(_worker, 4, CASES, llama_dir, 1, 2, HSDP_MODES))


# --------------------------------------------------------------------------- noise under FSDP
SIGMA, CLIP = 1.5, 2.0


MUTATIONS = (None, "noise_before_reduction_too", "owners_share_a_stream")


def _zero_gradient_noisy_step(mesh, patch, *, secure: bool = False) -> dict:
    """One noisy step of the ``WideMLP`` (TP over ``mesh["tp"]`` when it has more than one rank,
    then FSDP) on zero per-sample gradients, so that the gradient is the noise, under the
    context manager ``patch``: each parameter's full gradient, this rank's shard of it, and
    whether it is TP-sharded."""
    from hf_dp_tp import DPOptimizerTP
    from tests.test_noise import PLAN, WideMLP

    torch.manual_seed(0)
    model = WideMLP()
    if mesh["tp"].size() > 1:
        apply_tp_plan(model, mesh["tp"], PLAN)
    _shard(model, fsdp_mesh_of(mesh))
    controller = GradSampleControllerTP(
        model, device_mesh=mesh, loss_reduction="sum", grad_sample_mode="ghost"
    )
    optimizer = DPOptimizerTP(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        expected_batch_size=4,
        mesh=controller.mesh,
        loss_reduction="sum",
        secure_mode=secure,
    )
    x = torch.randn(4, 5, 64, generator=torch.Generator().manual_seed(7))
    (model(x) * 0.0).sum().backward()  # every per-sample gradient is exactly zero
    with patch:
        optimizer.step()
    out = {
        name: {
            "full": p.grad.full_tensor().detach().clone(),
            "local": p.grad.to_local().detach().clone(),
            "tp_sharded": controller.layout_of(p).sharded,
        }
        for name, p in model.named_parameters()
    }
    controller.cleanup()
    return out


def _noise_run(mesh, mutation: str | None) -> dict:
    """:func:`_zero_gradient_noisy_step` with ``mutation`` breaking rule 6 the way the statistics
    must catch: FSDP shards noised by DP rank 0 before the reduction as well as by their owners,
    or every owner drawing from the same stream."""
    from contextlib import nullcontext
    from unittest import mock

    from hf_dp_tp import DPOptimizerTP
    from hf_dp_tp import optimizer as optimizer_module
    from hf_dp_tp.noise import NoiseSource

    add_noise = DPOptimizerTP.add_noise

    def noise_before_reduction_too(self, sums, layouts):
        saved, self._step_params = self._step_params, []  # FSDP parameters not skipped
        try:
            add_noise(self, sums, layouts)
        finally:
            self._step_params = saved

    class SharedOwnerStream(NoiseSource):
        def __init__(self, **kwargs):
            if kwargs.get("dp_rank") is not None:
                kwargs["dp_rank"] = 0
            super().__init__(**kwargs)

    patches = {
        None: nullcontext(),
        "noise_before_reduction_too": mock.patch.object(
            DPOptimizerTP, "add_noise", noise_before_reduction_too
        ),
        "owners_share_a_stream": mock.patch.object(
            optimizer_module, "NoiseSource", SharedOwnerStream
        ),
    }
    return _zero_gradient_noisy_step(mesh, patches[mutation])


def _noise_worker(rank: int, world: int) -> dict:
    mesh = init_dp_tp_mesh(2)
    return {
        "coord": (mesh["dp"].get_local_rank(), mesh["tp"].get_local_rank()),
        **{str(m): _noise_run(mesh, m) for m in MUTATIONS},
    }


def _corr(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    a, b = a.flatten().double(), b.flatten().double()
    m = min(a.numel(), b.numel())
    return torch.corrcoef(torch.stack([a[:m], b[:m]]))[0, 1].item(), m


def test_fsdp2_noise_is_added_once_per_element_by_shard_owners():
    import math

    results = run_distributed(_noise_worker, 4)
    by_coord = {r["coord"]: r for r in results}
    ref = by_coord[(0, 0)]
    for name, entry in ref["None"].items():
        full = entry["full"].double()
        n = full.numel()
        std = full.std().item()
        twice = ref["noise_before_reduction_too"][name]["full"].double().std().item()
        print(f"{name}: std {std:.4f} (target {SIGMA * CLIP}), noised twice {twice:.4f}")
        rel_se = 1 / math.sqrt(2 * n)
        assert abs(std / (SIGMA * CLIP) - 1) < 6 * rel_se, (name, std, n)
        if n >= 1024:  # std × √2 is then far outside 6 standard errors: the mutant fails
            assert abs(twice / (SIGMA * CLIP) - 1) > 6 * rel_se, (name, twice)
        for r in results:  # every rank sees the same full gradient
            assert torch.equal(r["None"][name]["full"], entry["full"]), name
        for dp in (0, 1):  # TP peers holding the same FSDP shard
            a, b = (by_coord[(dp, tp)]["None"][name]["local"] for tp in (0, 1))
            if entry["tp_sharded"]:
                corr, m = _corr(a, b)
                assert abs(corr) < 6 / math.sqrt(m), (name, corr)
            else:
                assert torch.equal(a, b), name  # TP-replicated: identical noise
        for tp in (0, 1):  # the two DP owners' shards: independent; the mutant's are not
            corr, m = _corr(*(by_coord[(dp, tp)]["None"][name]["local"] for dp in (0, 1)))
            assert abs(corr) < 6 / math.sqrt(m), (name, corr)
            shared = by_coord[(0, tp)]["owners_share_a_stream"][name]["local"]
            other = by_coord[(1, tp)]["owners_share_a_stream"][name]["local"]
            if shared.numel() == other.numel() and shared.numel() > 1:
                assert _corr(shared, other)[0] > 0.99, name


def _hsdp_noise_run(mesh, mutation: str | None, secure: bool) -> dict:
    """:func:`_zero_gradient_noisy_step` under HSDP (tp 1). ``"every_replica_noises"`` breaks
    rule 6: the owners of every replica, not only the first, add their noise."""
    from contextlib import nullcontext
    from unittest import mock

    from hf_dp_tp import DPOptimizerTP

    def every_replica_noises(self, shards, layouts):
        self._add_noise_to(shards, layouts, dp_rank=self.mesh.dp_shard_rank)

    patch = (
        mock.patch.object(DPOptimizerTP, "add_shard_noise", every_replica_noises)
        if mutation == "every_replica_noises"
        else nullcontext()
    )
    return _zero_gradient_noisy_step(mesh, patch, secure=secure)


def _hsdp_noise_worker(rank: int, world: int) -> dict:
    mesh = init_dp_tp_mesh(1, dp_replicate_size=2)
    runs = {
        "None": (None, False),
        "secure": (None, True),
        "mutant": ("every_replica_noises", False),
    }
    return {
        "coord": (mesh["dp_replicate"].get_local_rank(), mesh["dp_shard"].get_local_rank()),
        **{key: _hsdp_noise_run(mesh, *how) for key, how in runs.items()},
    }


def test_hsdp_noise_is_added_once_per_element_by_the_first_replica():
    """HSDP (2 replicas × FSDP over 2): std σC per element of the full gradient, the replicas'
    shards identical (also in secure mode, where every rank holds fresh keys), the two owners of
    a replica independent; noise from every replica's owners (same streams, summed) fails."""
    import math

    results = run_distributed(_hsdp_noise_worker, 4)
    by_coord = {r["coord"]: r for r in results}
    ref = by_coord[(0, 0)]
    for key in ("None", "secure"):
        for name, entry in ref[key].items():
            full = entry["full"].double()
            n, std = full.numel(), full.std().item()
            rel_se = 1 / math.sqrt(2 * n)
            print(f"{key} {name}: std {std:.4f} (target {SIGMA * CLIP})")
            assert abs(std / (SIGMA * CLIP) - 1) < 6 * rel_se, (key, name, std, n)
            for shard in (0, 1):  # replicas hold the same shard of the same gradient
                a, b = (by_coord[(r, shard)][key][name]["local"] for r in (0, 1))
                assert torch.equal(a, b), (key, name)
            corr, m = _corr(*(by_coord[(0, s)][key][name]["local"] for s in (0, 1)))
            assert abs(corr) < 6 / math.sqrt(m), (key, name, corr)
    for name, entry in ref["mutant"].items():
        n, std = entry["full"].numel(), entry["full"].double().std().item()
        print(f"mutant {name}: std {std:.4f}")
        if n >= 1024:
            assert abs(std / (SIGMA * CLIP) - 1) > 6 / math.sqrt(2 * n), (name, std)
