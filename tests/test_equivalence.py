"""DP-TP equals single-process DP-SGD (contract rules 2-5 and 7-9, docs/usage.md).

With σ = 0 and a clip norm below every per-sample norm (so every sample is clipped), the
per-sample norms and the applied SGD(lr=1) update of every parameter of a TP (t=2) and a DP×TP
(d=2, t=2) run must equal the single-process reference computed one sample at a time on the full
model. Any norm reduced over the wrong group, a replicated parameter counted twice, a
global-shaped grad summed into a shard, a wrong divisor or a grad written where the optimizer
does not read it breaks these equalities. Ghost clipping (``grad_sample_mode="ghost"``: norms
from factors, clipped sums by contraction, tied weights with their cross term) must meet the same
equalities, in each of its norm forms.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from hf_dp_tp import GradSampleControllerTP, init_dp_tp_mesh
from hf_dp_tp.ghost import norm_form
from hf_dp_tp.parallel import apply_tp_plan, llama_sequence_parallel_plan
from tests import models
from tests.distributed_harness import run_distributed

BATCH = 8
TOLERANCE = 1e-9  # relative to the largest reference value (float64)


def _case(name: str, tmp: str):
    """(reference model, model to parallelize, plan, batch, per-sample loss fn)."""
    if name == "toy_mlp":
        torch.manual_seed(0)
        model = models.ToyMLP()
        return model, models.toy_mlp_plan(), models.toy_mlp_batch(BATCH), models.toy_mlp_losses
    if name == "embed_norm":
        torch.manual_seed(0)
        model = models.EmbedNormNet()
        batch = models.lm_batch(BATCH, vocab=24, seq=6)
        return model, models.embed_norm_plan(), batch, models.embed_norm_losses
    if name in ("qwen2_hf_plan", "qwen3_hf_plan"):
        model = models.load_tiny_llama(f"{tmp}/{name.split('_')[0]}")
        return model, "auto", models.lm_batch(BATCH, vocab=64, seq=8), models.llama_losses
    if name in ("llama_hf_plan", "llama_tied_hf_plan", "llama_sequence_parallel"):
        path = f"{tmp}/{'tied' if 'tied' in name else 'untied'}"
        model = models.load_tiny_llama(path)
        plan = "auto" if "hf_plan" in name else llama_sequence_parallel_plan()
        return model, plan, models.lm_batch(BATCH, vocab=64, seq=8), models.llama_losses
    if name == "llama_from_pretrained_tp_plan":
        # transformers' own loading path: every rank loads only its shards (world = tp)
        from transformers import LlamaForCausalLM
        from transformers.distributed import DistributedConfig

        model = LlamaForCausalLM.from_pretrained(
            f"{tmp}/untied", distributed_config=DistributedConfig(tp_size=2), dtype=torch.float64
        ).train()
        full = models.load_tiny_llama(f"{tmp}/untied")
        return model, None, models.lm_batch(BATCH, vocab=64, seq=8), models.llama_losses, full
    raise ValueError(name)


def _run_case(
    name: str, tmp: str, tp_size: int, empty_share: bool = False, mode: str = "tp"
) -> dict[str, float]:
    """``mode``: ``"tp"`` (per-sample hooks), or ``"ghost"`` / ``"ghost:<form>"`` (ghost clipping,
    norms of factored layers in that form: ``auto``, ``ghost`` token Grams or ``materialise``)."""
    grad_sample_mode, _, form = mode.partition(":")
    with norm_form(form or "auto"):
        return _run_case_in_form(name, tmp, tp_size, empty_share, grad_sample_mode)


def _run_case_in_form(
    name: str, tmp: str, tp_size: int, empty_share: bool, grad_sample_mode: str
) -> dict[str, float]:
    mesh = init_dp_tp_mesh(tp_size)
    dp_rank, dp_size = mesh["dp"].get_local_rank(), mesh["dp"].size()
    model, plan, batch, loss_fn, *preloaded = _case(name, tmp)
    model.double()  # float64 end to end, so an applied update of 1e-4 is measurable exactly
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    reference = preloaded[0].double() if preloaded else copy.deepcopy(model)

    grads, norms = models.reference_per_sample_grads(reference, loss_fn, batch)
    clip = 0.5 * norms.min().item()
    expected = models.reference_dp_update(grads, norms, clip, BATCH)
    before = models.full_params(reference)

    if plan is not None:
        apply_tp_plan(model, mesh["tp"], plan)
    controller = GradSampleControllerTP(
        model, device_mesh=mesh if plan is not None else None, grad_sample_mode=grad_sample_mode
    )
    optimizer = models.unit_sgd_dp_optimizer(
        model, controller.mesh, clip=clip, expected_batch=BATCH
    )
    rows = slice(dp_rank, None, dp_size)
    if empty_share:  # DP rank 0 draws the whole logical batch, DP rank 1 an empty one
        rows = slice(0, None) if dp_rank == 0 else slice(0, 0)
    share = {k: v[rows] for k, v in batch.items()}
    if len(next(iter(share.values()))) == 0:
        # DTensor views and transformers' attention cannot run a batch of 0: TP peers share the
        # (empty) batch, so they all skip forward/backward together and go straight to the step
        tp_norms = None
    else:
        loss_fn(model, share).mean().backward()
        tp_norms = controller.get_per_sample_norms()
    optimizer.step()
    after = models.full_params(model)

    ref_norms = norms[rows]
    if tp_norms is None:
        tp_norms = ref_norms
    scale = ref_norms.max() if len(ref_norms) else 1.0
    norm_err = (
        ((tp_norms.double() - ref_norms).abs().max() / scale).item() if len(ref_norms) else 0.0
    )
    update_err = 0.0
    for key, ref_update in expected.items():
        applied = (before[key] - after[key]).double()
        err = (applied - ref_update).abs().max() / ref_update.abs().max().clamp_min(1e-12)
        update_err = max(update_err, err.item())
    assert set(expected) == set(after), set(expected) ^ set(after)

    # rule 4: clip factors bit-identical on every TP rank of a DP group
    factors = [None] * dist.get_world_size()
    last = optimizer.last_clip_factors
    dist.all_gather_object(factors, [] if last is None else last.tolist())
    tp_peers = factors[dist.get_rank() - mesh["tp"].get_local_rank() :][:tp_size]
    identical = all(f == tp_peers[0] for f in tp_peers)
    all_clipped = bool((optimizer.last_clip_factors < 1).all()) if len(ref_norms) else True
    controller.cleanup()
    return {
        "norm_err": norm_err,
        "update_err": update_err,
        "factors_identical": identical,
        "all_clipped": all_clipped,
    }


def _worker(
    rank: int,
    world: int,
    cases: list[str],
    tmp: str,
    tp_size: int,
    empty_share: bool = False,
    modes: tuple[str, ...] = ("tp",),
) -> dict:
    torch.manual_seed(1234 + rank)  # the global RNG must play no role
    return {
        f"{case} [{mode}]": _run_case(case, tmp, tp_size, empty_share, mode)
        for mode in modes
        for case in cases
    }


def _mutant_worker(rank: int, world: int, tmp: str) -> dict[str, float]:
    """Ghost clipping with rule 3 broken: a replicated parameter's squared norm counted on every
    TP rank (the all-reduce sums it ``tp_size`` times). The comparison must catch it."""
    from unittest import mock

    from hf_dp_tp import controller as controller_module
    from hf_dp_tp import norms as norms_module
    from hf_dp_tp import optimizer as optimizer_module

    original = norms_module.reduce_squared_norms

    def replicated_counted_per_rank(squared_norms, mesh):
        return original([(s, True) for s, _ in squared_norms], mesh)

    with (
        mock.patch.object(optimizer_module, "reduce_squared_norms", replicated_counted_per_rank),
        mock.patch.object(controller_module, "reduce_squared_norms", replicated_counted_per_rank),
    ):
        return _run_case("llama_tied_hf_plan", tmp, 2, False, "ghost")


def test_a_replicated_norm_counted_on_every_tp_rank_is_caught(llama_dir):
    for r in run_distributed(_mutant_worker, 2, llama_dir):
        print("mutant (replicated counted per TP rank):", r)
        # the replicated parameters of the tiny Llama are its norms (small gradients): the error
        # is ~1e-4, five orders of magnitude above the equivalence tolerance
        assert r["norm_err"] > 1e3 * TOLERANCE and r["update_err"] > 1e3 * TOLERANCE, r


#: per-sample hooks, and ghost clipping with each norm form of its factored layers
MODES = ("tp", "ghost", "ghost:ghost", "ghost:materialise")


CASES = [
    "toy_mlp",
    "embed_norm",
    "llama_hf_plan",
    "llama_tied_hf_plan",
    "llama_sequence_parallel",
    "qwen2_hf_plan",
    "qwen3_hf_plan",
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    models.save_tiny_llama(str(root / "untied"), tie=False)
    models.save_tiny_llama(str(root / "tied"), tie=True)
    models.save_tiny_llama(str(root / "qwen2"), arch="qwen2")
    models.save_tiny_llama(str(root / "qwen3"), arch="qwen3")
    return str(root)


def _check(results: list[dict], world: int) -> None:
    for rank, per_case in enumerate(results):
        for case, r in per_case.items():
            print(f"world={world} rank={rank} {case}: {r}")
            assert r["all_clipped"], case
            assert r["factors_identical"], case
            assert r["norm_err"] < TOLERANCE, (case, r)
            assert r["update_err"] < TOLERANCE, (case, r)


def test_tp2_matches_single_process_dp_sgd(llama_dir):
    """Per-sample and ghost clipping, each against the single-process reference."""
    cases = [*CASES, "llama_from_pretrained_tp_plan"]
    _check(run_distributed(_worker, 2, cases, llama_dir, 2, False, MODES), 2)


@pytest.mark.slow
def test_dp2_tp2_matches_single_process_dp_sgd(llama_dir):
    _check(run_distributed(_worker, 4, CASES, llama_dir, 2, False, ("tp", "ghost")), 4)


@pytest.mark.slow
def test_dp2_tp2_with_an_empty_dp_share(llama_dir):
    """Poisson sampling gives DP ranks uneven, possibly empty shares: the rank with nothing still
    steps (its zero sum joins the DP all-reduce) and the result is unchanged."""
    cases = ["toy_mlp", "embed_norm", "llama_hf_plan"]
    _check(run_distributed(_worker, 4, cases, llama_dir, 2, True, ("tp", "ghost")), 4)
