"""LoRA (peft) adapters on a tensor-parallel Llama equal single-process DP-SGD (hf_dp_tp.lora).

Adapters on all seven projections (colwise q/k/v/gate/up: ``lora_B`` sharded; rowwise o/down:
``lora_A`` sharded), σ = 0, a clip norm below every per-sample norm, SGD(lr=1), float64, one step:
the applied adapter update and the per-sample norms must equal the single-process reference (the
same LoRA model in one process, from the same base weights and initial adapter values, per-sample
grads one sample at a time w.r.t. the adapter parameters only). Base weights must not move, adapter
values must be identical across ranks before and after the step, and the adapter written by
``save_lora_adapter`` must load with peft in one process and give the same weights and logits.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

from hf_dp_tp import DPOptimizerTP, GradSampleControllerTP, init_dp_tp_mesh
from hf_dp_tp.lora import (
    LoraTPError,
    gather_lora_state_dict,
    peft_tp_plan,
    prepare_lora_for_tp,
    save_lora_adapter,
)
from hf_dp_tp.parallel import apply_tp_plan
from tests import models
from tests.distributed_harness import run_distributed

BATCH = 8
TOLERANCE = 1e-9  # relative to the largest reference value (float64)


def _lora_config(**overrides):
    from peft import LoraConfig

    kwargs = dict(target_modules=models.LLAMA_PROJECTIONS, r=4, lora_alpha=8, lora_dropout=0.0)
    # random A *and* B (init_lora_weights=False): with B = 0 every lora_A gradient is 0
    kwargs.update(init_lora_weights=False)
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def _build(case: str, path: str, mesh):
    """The TP LoRA model of one case, prepared (collective)."""
    from peft import get_peft_model

    if case == "tp_then_peft":  # recommended order
        model = models.load_tiny_llama(path).double()
        apply_tp_plan(model, mesh["tp"], "auto")
        peft_model = get_peft_model(model, _lora_config())
    elif case == "peft_then_tp":  # adapters built on the full model, plan re-targeted
        peft_model = get_peft_model(models.load_tiny_llama(path).double(), _lora_config())
        apply_tp_plan(peft_model, mesh["tp"], peft_tp_plan(peft_model))
    elif case == "hf_tp_loading":  # transformers' own TP loading; peft's own TP hooks
        from transformers import LlamaForCausalLM
        from transformers.distributed import DistributedConfig

        model = LlamaForCausalLM.from_pretrained(
            path, distributed_config=DistributedConfig(tp_size=2), dtype=torch.float64
        )
        model.config.use_cache = False
        peft_model = get_peft_model(model.train(), _lora_config())
    else:
        raise ValueError(case)
    tp_mesh = None if case == "hf_tp_loading" else mesh["tp"]  # None: the base weights' mesh
    prepare_lora_for_tp(peft_model, tp_mesh)
    params = dict(peft_model.named_parameters())
    prepare_lora_for_tp(peft_model, tp_mesh)  # idempotent: the same parameter objects
    assert all(p is params[n] for n, p in peft_model.named_parameters())
    return peft_model


def _run_case(
    case: str, path: str, mesh, save_dir: str | None, grad_sample_mode: str = "tp"
) -> dict:
    from peft import get_peft_model, set_peft_model_state_dict

    dp_rank, dp_size = mesh["dp"].get_local_rank(), mesh["dp"].size()
    batch = models.lm_batch(BATCH, vocab=64, seq=8)
    model = _build(case, path, mesh)
    initial = gather_lora_state_dict(model)

    # single-process reference: same base weights, same initial adapter values
    reference = get_peft_model(models.load_tiny_llama(path).double(), _lora_config())
    loaded = set_peft_model_state_dict(reference, initial)
    assert not loaded.unexpected_keys, loaded.unexpected_keys
    grads, norms = models.reference_per_sample_grads(reference, models.llama_losses, batch)
    clip = 0.5 * norms.min().item()
    expected = models.reference_dp_update(grads, norms, clip, BATCH)

    before = models.full_params(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(expected), trainable ^ set(expected)
    assert all("lora_" in n for n in trainable)

    controller = GradSampleControllerTP(
        model,
        device_mesh=mesh if case != "hf_tp_loading" else None,
        grad_sample_mode=grad_sample_mode,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = DPOptimizerTP(
            torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0),
            noise_multiplier=0.0,
            max_grad_norm=clip,
            expected_batch_size=BATCH,
            mesh=controller.mesh,
        )
    rows = slice(dp_rank, None, dp_size)
    share = {k: v[rows] for k, v in batch.items()}
    models.llama_losses(model, share).mean().backward()
    tp_norms = controller.get_per_sample_norms()
    optimizer.step()
    controller.cleanup()
    after = models.full_params(model)

    ref_norms = norms[rows]
    norm_err = ((tp_norms.double() - ref_norms).abs().max() / ref_norms.max()).item()
    update_err = 0.0
    for key, ref_update in expected.items():
        applied = before[key] - after[key]
        err = (applied - ref_update).abs().max() / ref_update.abs().max().clamp_min(1e-12)
        update_err = max(update_err, err.item())
    base_unchanged = all(torch.equal(before[n], after[n]) for n in before if n not in trainable)

    result = {
        "norm_err": norm_err,
        "update_err": update_err,
        "base_unchanged": base_unchanged,
        "all_clipped": bool((optimizer.last_clip_factors < 1).all()),
        "initial": initial,
        "final": gather_lora_state_dict(model),
    }
    if save_dir is not None:
        save_lora_adapter(model, save_dir)
        ids = batch["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=torch.arange(ids.shape[1]).expand_as(ids))
        result["logits"] = logits.logits
    return result


def _refusals(path: str, mesh) -> dict[str, str]:
    """Messages of prepare_lora_for_tp for configurations it must refuse."""
    from peft import get_peft_model

    out = {}
    for label, overrides in [
        ("dora", dict(use_dora=True)),  # peft's DoRA init already fails on DTensor weights
        ("embedding", dict(target_modules=[*models.LLAMA_PROJECTIONS, "embed_tokens"])),
        ("dropout", dict(lora_dropout=0.1)),
    ]:
        peft_model = get_peft_model(models.load_tiny_llama(path), _lora_config(**overrides))
        apply_tp_plan(peft_model, mesh["tp"], peft_tp_plan(peft_model))
        try:
            prepare_lora_for_tp(peft_model, mesh["tp"])
            out[label] = "not refused"
        except LoraTPError as err:
            out[label] = str(err)
    return out


def _worker(rank: int, world: int, path: str, tp_size: int, save_dir: str | None) -> dict:
    warnings.simplefilter("ignore")
    torch.manual_seed(1234 + rank)  # peft draws adapters from the global RNG: ranks disagree
    mesh = init_dp_tp_mesh(tp_size)
    cases = ["tp_then_peft", "peft_then_tp"] + (["hf_tp_loading"] if world == tp_size else [])
    results = {
        case: _run_case(case, path, mesh, save_dir if case == "tp_then_peft" else None)
        for case in cases
    }
    for case in ("tp_then_peft", "peft_then_tp"):  # ghost clipping of the adapters
        results[f"{case} [ghost]"] = _run_case(case, path, mesh, None, "ghost")
    if world == tp_size:  # once is enough
        results["refusals"] = _refusals(path, mesh)
    dist.barrier()
    return results


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return models.save_tiny_llama(str(tmp_path_factory.mktemp("lora") / "llama"))


def _check(results: list[dict], world: int) -> None:
    for case in results[0]:
        if case == "refusals":
            continue
        for rank, per_case in enumerate(results):
            r = per_case[case]
            print(
                f"world={world} rank={rank} {case}: norm_err={r['norm_err']:.2e} "
                f"update_err={r['update_err']:.2e}"
            )
            assert r["all_clipped"], case
            assert r["base_unchanged"], case
            assert r["norm_err"] < TOLERANCE, (case, r["norm_err"])
            assert r["update_err"] < TOLERANCE, (case, r["update_err"])
            for when in ("initial", "final"):  # identical on every rank (TP peers, DP replicas)
                mine, first = r[when], results[0][case][when]
                assert set(mine) == set(first)
                assert all(torch.equal(mine[k], first[k]) for k in first), (case, when, rank)
        initial = results[0][case]["initial"]
        assert len(initial) == 4 * len(models.LLAMA_PROJECTIONS)  # 2 layers x (A, B) x 7
        # adapters peft sized to a local width are re-drawn at full width: kaiming bound
        # 1/sqrt(in_features) of the *full* layer (not of the shard, sqrt(2) larger)
        for key, value in initial.items():
            if key.endswith("lora_A.weight"):
                assert value.abs().max() <= 1.001 * value.shape[1] ** -0.5, key
    if "refusals" not in results[0]:
        return
    refusals = results[0]["refusals"]
    assert "DoRA" in refusals["dora"], refusals["dora"]
    assert "embedding layer" in refusals["embedding"], refusals["embedding"]
    assert "lora_dropout=0.1" in refusals["dropout"], refusals["dropout"]


def _check_saved_adapter(save_dir: str, path: str, result: dict) -> None:
    """The adapter loads with peft in this (single, non-distributed) process onto the full base
    model and reproduces the gathered TP adapter and the TP model's logits."""
    from peft import PeftModel, get_peft_model_state_dict

    base = models.load_tiny_llama(path).double()
    loaded = PeftModel.from_pretrained(base, save_dir)
    state = get_peft_model_state_dict(loaded)
    assert set(state) == set(result["final"])
    for key, value in result["final"].items():
        assert torch.equal(state[key], value), key
    ids = models.lm_batch(BATCH, vocab=64, seq=8)["input_ids"]
    with torch.no_grad():
        logits = loaded(input_ids=ids, position_ids=torch.arange(ids.shape[1]).expand_as(ids))
    err = (logits.logits - result["logits"]).abs().max() / result["logits"].abs().max()
    print(f"saved adapter: logits rel err {err.item():.2e}")
    assert err < TOLERANCE


def test_lora_tp2_matches_single_process_and_saves(llama_dir, tmp_path):
    save_dir = str(tmp_path / "adapter")
    results = run_distributed(_worker, 2, llama_dir, 2, save_dir)
    _check(results, 2)
    _check_saved_adapter(save_dir, llama_dir, results[0]["tp_then_peft"])


@pytest.mark.slow
def test_lora_dp2_tp2_matches_single_process(llama_dir, tmp_path):
    save_dir = str(tmp_path / "adapter")
    results = run_distributed(_worker, 4, llama_dir, 2, save_dir)
    _check(results, 4)
    _check_saved_adapter(save_dir, llama_dir, results[0]["tp_then_peft"])


def test_refusals_without_distributed(llama_dir):
    """DoRA and embedding LoRA are refused before any collective, with a clear message."""
    from peft import get_peft_model

    model = get_peft_model(models.load_tiny_llama(llama_dir), _lora_config(use_dora=True))
    with pytest.raises(LoraTPError, match=r"DoRA \(use_dora=True\).*not supported"):
        prepare_lora_for_tp(model)
    config = _lora_config(target_modules=["embed_tokens", "q_proj"])
    model = get_peft_model(models.load_tiny_llama(llama_dir), config)
    with pytest.raises(LoraTPError, match="LoRA on the embedding layer .*embed_tokens"):
        prepare_lora_for_tp(model)
