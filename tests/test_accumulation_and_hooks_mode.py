"""Gradient accumulation (contract rule 5, docs/usage.md) and the non-TP ``"hooks"`` mode.

- Micro-batches clipped and summed one by one, then one noisy step, give exactly the gradient of
  one big batch — with noise too, since a step's noise depends only on (seed, TP rank, step).
- ``"hooks"`` mode on GPT-2 (``Conv1D``, tied embeddings, LayerNorm, position embeddings) equals
  the single-process per-sample reference, in one process and as dp=2 replicas.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.tensor import DTensor

from hf_dp_tp import GradSampleControllerTP, init_dp_tp_mesh
from hf_dp_tp.parallel import apply_tp_plan, resolve_mesh
from tests import models
from tests.distributed_harness import run_distributed


def _full_grads(model) -> dict[str, torch.Tensor]:
    return {
        n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
        for n, p in model.named_parameters()
    }


def _accumulation_run(
    base, mesh, batch, mode: str, sigma: float, method: str = "tp"
) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(base)
    apply_tp_plan(model, mesh["tp"], models.toy_mlp_plan())
    controller = GradSampleControllerTP(model, device_mesh=mesh, grad_sample_mode=method)
    optimizer = models.dp_optimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        controller.mesh,
        clip=0.05,
        expected_batch=8,
        sigma=sigma,
        noise_seed=11,
    )
    halves = [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}]
    if mode == "one_batch":
        models.toy_mlp_losses(model, batch).mean().backward()
    else:
        for i, half in enumerate(halves):
            # "mean" over each micro-batch: per-sample grads are rescaled by its own size
            models.toy_mlp_losses(model, half).mean().backward()
            if i == 0 and mode == "clip_and_accumulate":
                optimizer.clip_and_accumulate()
            if i == 0 and mode == "skip_step":
                optimizer.signal_skip_step(True)
                optimizer.step()
    optimizer.step()
    grads = _full_grads(model)
    controller.cleanup()
    return grads


def _accumulation_worker(rank: int, world: int) -> dict[str, float]:
    mesh = init_dp_tp_mesh(2)
    torch.manual_seed(0)
    base = models.ToyMLP().double()
    batch = {k: v.double() for k, v in models.toy_mlp_batch(8).items()}
    errors = {}
    for sigma in (0.0, 0.7):
        reference = _accumulation_run(base, mesh, batch, "one_batch", sigma)
        for method in ("tp", "ghost"):  # ghost against the per-sample one-batch reference
            modes = ("one_batch",) if method == "ghost" else ()
            for mode in (*modes, "clip_and_accumulate", "skip_step", "two_backwards"):
                grads = _accumulation_run(base, mesh, batch, mode, sigma, method)
                errors[f"{method}_{mode}_sigma{sigma}"] = max(
                    (grads[k] - reference[k]).abs().max().item() for k in reference
                )
    return errors


def test_gradient_accumulation_equals_one_big_batch():
    results = run_distributed(_accumulation_worker, 2)
    for errors in results:
        print("accumulation max abs error:", errors)
        assert all(err < 1e-12 for err in errors.values()), errors


# --------------------------------------------------------------------------- hooks mode, GPT-2
def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=4,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    config.attn_pdrop = config.embd_pdrop = config.resid_pdrop = 0.0
    return GPT2LMHeadModel(config).double().train()


def _gpt2_losses(model, batch):
    ids = batch["input_ids"]
    positions = torch.arange(ids.shape[1]).expand_as(ids)  # per-sample position ids
    return models.token_mean_losses(model(input_ids=ids, position_ids=positions).logits, ids)


def _hooks_mode_errors(dp_rank: int, dp_size: int, mode: str = "hooks") -> dict[str, float]:
    model = _gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    reference = copy.deepcopy(model)
    batch = models.lm_batch(6, vocab=64, seq=8)
    grads, norms = models.reference_per_sample_grads(reference, _gpt2_losses, batch)
    clip = 0.5 * norms.min().item()
    expected = models.reference_dp_update(grads, norms, clip, 6)

    mesh = resolve_mesh(model, None, tp=False)
    controller = GradSampleControllerTP(model, grad_sample_mode=mode, mesh_info=mesh)
    optimizer = models.dp_optimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), mesh, clip=clip, expected_batch=6
    )
    share = {k: v[dp_rank::dp_size] for k, v in batch.items()}
    _gpt2_losses(model, share).mean().backward()
    got_norms = controller.get_per_sample_norms()
    optimizer.step()
    grads_now = dict(model.named_parameters())
    update_err = max(
        ((grads_now[k].grad - v).abs().max() / v.abs().max()).item() for k, v in expected.items()
    )
    ref_norms = norms[dp_rank::dp_size]
    return {
        "norm_err": ((got_norms - ref_norms).abs().max() / ref_norms.max()).item(),
        "update_err": update_err,
    }


def _hooks_worker(rank: int, world: int) -> dict[str, float]:
    return _hooks_mode_errors(rank, world)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_hooks_mode_gpt2_single_process(mode):
    """GPT-2: Conv1D layers and a tied wte / lm_head, per-sample and ghost."""
    errors = _hooks_mode_errors(0, 1, mode)
    print(f"{mode} mode GPT-2, one process:", errors)
    assert errors["norm_err"] < 1e-9 and errors["update_err"] < 1e-9, errors


def test_hooks_mode_gpt2_data_parallel_replicas():
    for errors in run_distributed(_hooks_worker, 2):
        print("hooks mode GPT-2, dp=2:", errors)
        assert errors["norm_err"] < 1e-9 and errors["update_err"] < 1e-9, errors
