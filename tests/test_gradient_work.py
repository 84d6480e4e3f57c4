"""No duplicate gradient work: parameters whose gradient DP-SGD computes itself (per-sample, or
ghost factors) get no weight gradient from autograd after their first backward (single process).

1. Matrix-multiply FLOPs of a DP step over a non-private step, counted exactly with
   ``FlopCounterMode`` (bench/flops.py): per-sample ≤ 1.05×, ghost ≤ 1.30× (they were 1.33× and
   1.50× while autograd also computed every weight gradient).
2. After the first backward (which the self-check compares with autograd's gradient) no hooked
   parameter receives an autograd gradient, and every parameter requires grad again after the
   forward pass — also after a forward that raised.
3. The skipped gradient cannot hide a use of the weight outside its module: such a use, even one
   that only starts after the self-check, makes autograd produce a gradient, which is refused.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hf_dp_tp import DPOptimizerTP, GradSampleControllerTP
from tests import models

B, T = 4, 64


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=T,
    )
    return LlamaForCausalLM(config).train()


def _optimizer(model, controller):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPOptimizerTP(
            torch.optim.SGD(model.parameters(), lr=0.0),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=B,
            mesh=controller.mesh,
            noise_seed=0,
        )


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("mode, bound", [("hooks", 1.05), ("ghost", 1.30)])
def test_dp_step_flops_stay_close_to_a_non_private_step(mode, bound):
    model = _llama()
    batch = {"input_ids": torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(1))}

    def plain():
        models.llama_losses(model, batch).mean().backward()
        model.zero_grad(set_to_none=True)

    base = _flops(plain)
    controller = GradSampleControllerTP(model, grad_sample_mode=mode)
    optimizer = _optimizer(model, controller)

    def dp_step():
        models.llama_losses(model, batch).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    first = _flops(dp_step)  # autograd's weight gradients too: the self-check needs them
    later = _flops(dp_step)
    assert later / base <= bound, (mode, later / base, first / base)
    assert first > later


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_no_autograd_weight_gradient_after_the_self_check(mode):
    model = _llama()
    controller = GradSampleControllerTP(model, grad_sample_mode=mode)
    batch = {"input_ids": torch.randint(0, 512, (B, 16))}
    params = controller.trainable_parameters()
    models.llama_losses(model, batch).mean().backward()
    assert all(p.grad is not None for p in params)  # the first backward: checked against these
    model.zero_grad(set_to_none=True)
    controller.zero_grad_sample()
    models.llama_losses(model, batch).mean().backward()
    assert all(p.requires_grad for p in params)
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []
    assert all(p.grad_sample is not None for p in params)

    def broken(module, args):
        raise ValueError("boom")

    handle = model.model.layers[0].mlp.register_forward_pre_hook(broken)
    with pytest.raises(ValueError, match="boom"):
        models.llama_losses(model, batch)
    handle.remove()
    assert all(p.requires_grad for p in model.parameters())


class _LateReuse(nn.Module):
    """A weight used by its own module, and after the first step also through ``F.linear``
    outside it (a data- or step-dependent path the first-step self-check cannot see)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 1)
        self.reuse = False

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        if self.reuse:
            h = h + nn.functional.linear(h, self.fc.weight)
        return self.head(h).squeeze(-1)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_use_outside_the_module_after_the_self_check_is_refused(mode):
    torch.manual_seed(0)
    model = _LateReuse()
    controller = GradSampleControllerTP(model, grad_sample_mode=mode)
    x = torch.randn(B, 6)
    model(x).pow(2).mean().backward()  # self-check passes: no reuse yet
    model.zero_grad(set_to_none=True)
    controller.zero_grad_sample()
    model.reuse = True
    with pytest.raises(RuntimeError, match="outside its module"):
        model(x).pow(2).mean().backward()
