"""The preflight memory estimate (hf_dp_tp.memory) and DPTrainer's memory check.

The estimate's agreement with measured peaks is validated in bench/memory.py (fresh processes,
``ru_maxrss``; docs/performance.md, "Memory"), not here: a shared machine makes RSS noisy.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from hf_dp_tp import memory
from hf_dp_tp.memory import (
    available_memory,
    check_memory,
    estimate_memory,
    optimizer_states,
    peak_micro_batch,
)
from tests import models

SEQ = 8


def _model():
    return models.tiny_causal_lm("llama")


def _numels(model) -> list[int]:
    return [p.numel() for p in model.parameters() if p.requires_grad]


def test_per_sample_term_is_micro_batch_times_trainable_parameters():
    model = _model()
    e4 = estimate_memory(model, grad_sample_mode="tp", micro_batch=4, seq_len=SEQ)
    e8 = estimate_memory(model, grad_sample_mode="tp", micro_batch=8, seq_len=SEQ)
    sizes = _numels(model)
    assert e4.per_sample_state == 4 * 4 * (sum(sizes) + max(sizes))
    assert e8.per_sample_state == 2 * e4.per_sample_state
    assert e8.activations == 2 * e4.activations
    # batch-independent terms: parameters, fp32 clipped sums + first-step autograd grads, AdamW
    assert (e8.parameters, e8.gradients, e8.optimizer_state) == (
        e4.parameters,
        e4.gradients,
        e4.optimizer_state,
    )
    assert e4.gradients == 2 * 4 * sum(sizes) and e4.optimizer_state == 2 * 4 * sum(sizes)
    later = estimate_memory(
        model, grad_sample_mode="tp", micro_batch=4, seq_len=SEQ, first_step=False
    )
    assert later.gradients == 4 * sum(sizes)
    assert e4.total == sum(e4.terms.values())
    assert "per sample state" in e4.describe() and "'tp'" in e4.describe()


def test_frozen_parameters_and_lora_shrink_the_trainable_terms():
    model = _model()
    full = estimate_memory(model, grad_sample_mode="tp", micro_batch=4, seq_len=SEQ)
    model.get_input_embeddings().weight.requires_grad_(False)
    frozen = estimate_memory(model, grad_sample_mode="tp", micro_batch=4, seq_len=SEQ)
    sizes = _numels(model)
    assert frozen.per_sample_state == 4 * 4 * (sum(sizes) + max(sizes))
    assert frozen.parameters == full.parameters  # frozen weights are still held

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(_model(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    adapted = estimate_memory(lora, grad_sample_mode="tp", micro_batch=4, seq_len=SEQ)
    for term in ("per_sample_state", "gradients", "optimizer_state"):
        assert getattr(adapted, term) < getattr(full, term) / 10, term


def test_ghost_keeps_the_smaller_of_factors_and_materialised_gradients():
    model = _model()
    per_sample = estimate_memory(model, grad_sample_mode="tp", micro_batch=4, seq_len=SEQ)
    ghost = estimate_memory(model, grad_sample_mode="ghost", micro_batch=4, seq_len=SEQ)
    # T = 8 tokens is small next to the widths (32, 64): factors are smaller
    assert ghost.per_sample_state < per_sample.per_sample_state / 2
    # the same matrices, with T long enough that T (m + n) > m n: every layer materialised, as
    # per-sample mode does (less the one-parameter transient that only per-sample mode counts)
    long = estimate_memory(model, grad_sample_mode="ghost", micro_batch=4, seq_len=1000)
    long_tp = estimate_memory(model, grad_sample_mode="tp", micro_batch=4, seq_len=1000)
    sizes = _numels(model)
    assert long.per_sample_state == long_tp.per_sample_state - 4 * 4 * max(sizes)
    # the other terms do not depend on the mode
    assert (ghost.gradients, ghost.optimizer_state, ghost.activations) == (
        per_sample.gradients,
        per_sample.optimizer_state,
        per_sample.activations,
    )


def test_non_private_has_no_per_sample_state_and_one_gradient():
    model = _model()
    plain = estimate_memory(model, grad_sample_mode=None, micro_batch=4, seq_len=SEQ)
    assert plain.per_sample_state == 0 and plain.gradients == 4 * sum(_numels(model))


def test_optimizer_states_follow_the_optim_setting():
    assert optimizer_states("adamw_torch") == 2
    assert optimizer_states("adamw_torch_fused") == 2
    assert optimizer_states("sgd") == 0
    assert optimizer_states("sgd", "momentum=0.9") == 1
    assert optimizer_states("adamw_bnb_8bit") == 0.5
    model = _model()
    sgd = estimate_memory(
        model,
        grad_sample_mode="tp",
        micro_batch=4,
        seq_len=SEQ,
        optimizer_states_per_param=optimizer_states("sgd"),
    )
    assert sgd.optimizer_state == 0


def test_peak_micro_batch_is_the_poisson_tail_over_the_run():
    def tail(mean: float, k: int) -> float:  # P(X > k), X ~ Poisson(mean)
        return 1 - sum(math.exp(-mean) * mean**i / math.factorial(i) for i in range(k + 1))

    for mean, n in ((4, 1), (4, 1000), (16, 100_000)):
        k = peak_micro_batch(mean, n)
        assert tail(mean, k) <= memory.PEAK_BATCH_TAIL / n < tail(mean, k - 1)
    assert peak_micro_batch(4, 1000) > peak_micro_batch(4, 10) > 4


def test_cpu_availability_is_shared_by_the_local_processes(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    one = available_memory("cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    four = available_memory("cpu")
    assert one > 0 and abs(four - one / 4) < one / 20  # MemAvailable moves a little meanwhile


# --------------------------------------------------------------------------- DPTrainer
def _trainer(tmp_path, **overrides):
    from datasets import Dataset

    from hf_dp_tp import DPTrainer, DPTrainingArguments

    ids = torch.randint(0, 64, (16, SEQ), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    settings = dict(
        output_dir=str(tmp_path),
        tp_size=1,
        grad_sample_mode="hooks",
        noise_multiplier=1.0,
        per_device_train_batch_size=4,
        max_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    settings.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DPTrainingArguments(**settings)
        return DPTrainer(model=_model(), args=args, train_dataset=data)


def test_train_refuses_a_run_clearly_over_the_available_memory(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 1000)
    with pytest.raises(MemoryError) as err:
        trainer.train()
    message = str(err.value)
    assert 'grad_sample_mode="ghost"' in message
    assert "gradient_accumulation_steps" in message and "LoRA" in message
    assert 'memory_check="warn" or "off"' in message
    # per-sample state dominates this estimate: ghost is named first
    assert message.index('grad_sample_mode="ghost"') < message.index("gradient_accumulation")
    assert trainer.state.global_step == 0


def test_memory_check_warn_and_off_and_the_margin(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)
    estimate = check_memory(trainer)  # ample memory on this machine: no warning, an estimate
    needed = estimate.total - estimate.parameters
    monkeypatch.setattr(memory, "available_memory", lambda device=None: int(needed / 1.05))
    with pytest.warns(UserWarning, match='grad_sample_mode="ghost"'):
        check_memory(trainer)  # within the margin (≤ 1.1×): warned, not refused
    monkeypatch.setattr(memory, "available_memory", lambda device=None: 1000)
    trainer.args.memory_check = "warn"
    with pytest.warns(UserWarning, match="run out of memory"):
        assert check_memory(trainer) is not None
    trainer.args.memory_check = "off"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert check_memory(trainer) is None
        trainer.train()  # the preflight does not stand in the way
    assert trainer.state.global_step == 1


def test_memory_check_setting_is_validated(tmp_path):
    from hf_dp_tp import DPTrainingArguments

    with pytest.raises(ValueError, match="memory_check"):
        DPTrainingArguments(output_dir=str(tmp_path), noise_multiplier=1.0, memory_check="maybe")
