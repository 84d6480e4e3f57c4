"""The controller leaves the model as it was; any torch optimizer really applies the DP gradient
(contract rule 9 in docs/usage.md: DTensor grads with the parameter's placements); bf16 norms stay
in fp32."""

from __future__ import annotations

import copy

import torch
from torch.distributed.tensor import DTensor

from hf_dp_tp import GradSampleControllerTP, init_dp_tp_mesh, per_sample_norms
from hf_dp_tp.parallel import ParamLayout, apply_tp_plan
from tests import models
from tests.distributed_harness import run_distributed


def test_cleanup_restores_the_model():
    torch.manual_seed(0)
    model = models.EmbedNormNet()
    keys_before = list(model.state_dict())
    hooks_before = {
        n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()
    }
    controller = GradSampleControllerTP(model, grad_sample_mode="hooks")
    assert type(model) is models.EmbedNormNet  # no wrapper: the user's object is the model
    batch = models.lm_batch(4, vocab=24, seq=6)
    models.embed_norm_losses(model, batch).mean().backward()
    assert all(p.grad_sample.shape[0] == 4 for p in model.parameters())
    assert list(model.state_dict()) == keys_before
    controller.cleanup()
    hooks_after = {
        n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()
    }
    assert hooks_after == hooks_before
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_bf16_norms_accumulate_in_fp32():
    g = torch.full((3, 4096), 0.01, dtype=torch.bfloat16)
    norms = per_sample_norms([(g, ParamLayout((4096,), (4096,)))], mesh=_single_mesh())
    assert norms.dtype == torch.float32
    # in bf16, 4096 additions of 1e-4 stall long before 0.4096; fp32 gets it right
    assert torch.allclose(norms, torch.full((3,), 0.4096**0.5), rtol=1e-3)


def _single_mesh():
    from hf_dp_tp import MeshInfo

    return MeshInfo()


def _reference_step(base, batch, clip, optimizer_factory):
    reference = copy.deepcopy(base)
    grads, norms = models.reference_per_sample_grads(reference, models.toy_mlp_losses, batch)
    update = models.reference_dp_update(grads, norms, clip, len(batch["x"]))
    optimizer = optimizer_factory(reference.parameters())
    for name, p in reference.named_parameters():
        p.grad = update[name].to(p.dtype)
    optimizer.step()
    return models.full_params(reference)


def _optimizer_worker(rank: int, world: int) -> dict[str, float]:
    mesh = init_dp_tp_mesh(2)
    torch.manual_seed(0)
    base = models.ToyMLP().double()
    batch = {k: v.double() for k, v in models.toy_mlp_batch(8).items()}
    factories = {
        "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
        "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
        "adamw_for_loop": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
        "sgd_momentum_foreach": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, foreach=True),
    }
    errors: dict[str, float] = {}
    for name, factory in factories.items():
        expected = _reference_step(base, batch, 0.05, factory)
        model = copy.deepcopy(base)
        apply_tp_plan(model, mesh["tp"], models.toy_mlp_plan())
        controller = GradSampleControllerTP(model, device_mesh=mesh)
        optimizer = models.dp_optimizer(
            factory(model.parameters()), controller.mesh, clip=0.05, expected_batch=8
        )
        models.toy_mlp_losses(model, batch).mean().backward()
        optimizer.step()
        assert all(
            isinstance(p.grad, DTensor) and p.grad.placements == p.placements
            for p in model.parameters()
            if isinstance(p, DTensor)
        )
        got = models.full_params(model)
        errors[name] = max((got[k] - expected[k]).abs().max().item() for k in expected)
        controller.cleanup()

    # bf16 model: the DP gradient matches the fp32 reference up to bf16 rounding, with
    # per-sample hooks and with ghost clipping (norms and sums of bf16 factors in fp32)
    reference = copy.deepcopy(base).float()
    batch32 = {k: v.float() for k, v in batch.items()}
    grads, ref_norms = models.reference_per_sample_grads(reference, models.toy_mlp_losses, batch32)
    expected = models.reference_dp_update(grads, ref_norms, 0.05, 8)
    for mode in ("tp", "ghost"):
        bf16 = copy.deepcopy(base).to(torch.bfloat16)
        apply_tp_plan(bf16, mesh["tp"], models.toy_mlp_plan())
        controller = GradSampleControllerTP(bf16, device_mesh=mesh, grad_sample_mode=mode)
        optimizer = models.dp_optimizer(
            torch.optim.SGD(bf16.parameters(), lr=0.0), controller.mesh, clip=0.05, expected_batch=8
        )
        models.toy_mlp_losses(bf16, {k: v.bfloat16() for k, v in batch.items()}).mean().backward()
        norms = controller.get_per_sample_norms()
        optimizer.step()
        rel = 0.0
        for name, p in bf16.named_parameters():
            got = (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).double()
            want = expected[name]
            rel = max(rel, ((got - want).abs().max() / want.abs().max()).item())
        controller.cleanup()
        norm_rel = ((norms.double() - ref_norms).abs().max() / ref_norms.max()).item()
        errors[f"bf16_norm_rel_{mode}"] = norm_rel
        errors[f"bf16_rel_{mode}"] = rel
        errors[f"bf16_norm_dtype_is_fp32_{mode}"] = float(norms.dtype == torch.float32)
    return errors


def test_foreach_fused_optimizers_apply_the_dp_gradient_and_bf16():
    for errors in run_distributed(_optimizer_worker, 2):
        print("optimizer max abs error:", errors)
        for name in ("adamw_foreach", "adamw_fused", "adamw_for_loop", "sgd_momentum_foreach"):
            assert errors[name] < 1e-12, (name, errors[name])
        for mode in ("tp", "ghost"):
            assert errors[f"bf16_norm_dtype_is_fp32_{mode}"] == 1.0
            # bf16 forward/backward: ~3 significant digits
            assert errors[f"bf16_rel_{mode}"] < 5e-2, errors
            assert errors[f"bf16_norm_rel_{mode}"] < 5e-2, errors


def test_empty_batch_through_hooks_samplers_and_step():
    """An empty Poisson batch yields [0, ...] per-sample grads for every layer type and a step that
    adds only noise (here σ = 0: the gradient is exactly zero)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    model = models.EmbedNormNet()
    model.norm3 = LlamaRMSNorm(16)
    forward = model.forward
    model.forward = lambda ids: forward(ids) + model.norm3(torch.zeros(ids.shape[0], 16)).sum()
    controller = GradSampleControllerTP(model, grad_sample_mode="hooks")
    optimizer = models.dp_optimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), _single_mesh(), clip=1.0, expected_batch=4
    )
    empty = {"input_ids": torch.zeros(0, 6, dtype=torch.long)}
    models.embed_norm_losses(model, empty).sum().backward()
    assert all(p.grad_sample.shape[0] == 0 for p in model.parameters())
    optimizer.step()
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    assert optimizer.steps_taken == 1
    controller.cleanup()
