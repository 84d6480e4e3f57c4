"""What one record can make observable, tried as an attacker (single process, tiny Llama).

1. **A record cannot date itself** (contract, docs/usage.md, "What is at rest" and rule 5): one
   record with a NaN loss and one with an inf loss, 12 noisy steps. The weights stay finite at
   every step and equal, step by step, those of a run where the two records' gradients are
   exactly zero (same Poisson batches, noise and dropout); the logged loss stays finite; the
   privacy report (end of training only) counts the left-out gradients.
2. **No RNG state at rest**: dropout advances the global RNG by the realised batch sizes; no file
   under ``output_dir`` holds any state the RNG was in during training (Trainer's
   ``rng_state.pth`` did: replaying one step per candidate size recovered the sizes), and after
   ``train()`` the global RNG is fresh (two identical runs end in different states).
3. **FSDP's stand-in pass carries no record**: a token-counting buffer sees none of the first
   record's tokens when an empty micro-batch runs its discarded pass.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from hf_dp_tp.losses import default_per_sample_loss
from tests import models
from tests.secret_scan import blobs

N, SEQ, STEPS = 24, 8, 12
NAN_RECORD, INF_RECORD = 3, 7


def _dataset():
    from datasets import Dataset

    records = models.markov_records(N, SEQ, vocab=64, seed=4)
    records["poison"] = [1 if i == NAN_RECORD else 2 if i == INF_RECORD else 0 for i in range(N)]
    return Dataset.from_dict(records)


def _poisoned_loss(poisoned: bool, sampled: list[int]):
    """The default causal-LM per-sample loss; ``poisoned``: the NaN record's loss times NaN and
    the inf record's times inf (corrupt records), else both times 0 (the reference run, where
    their gradients are exactly zero)."""

    def loss(model, inputs):
        inputs = dict(inputs)
        poison = inputs.pop("poison")
        sampled.append(int((poison > 0).sum()))
        losses, outputs = default_per_sample_loss(model, inputs)
        factor = torch.ones(len(poison), dtype=losses.dtype)
        factor[poison == 1] = math.nan if poisoned else 0.0
        factor[poison == 2] = math.inf if poisoned else 0.0
        return losses * factor, outputs

    return loss


def _run(out: str, mode: str, poisoned: bool) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback

    from hf_dp_tp import DPTrainer, DPTrainingArguments

    torch.manual_seed(0)
    config = LlamaConfig(**models.TINY_LM, attention_dropout=0.3)
    model = AutoModelForCausalLM.from_config(config).double()
    steps: list[dict] = []
    rng_states: list[bytes] = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            steps.append({n: p.detach().clone() for n, p in model.named_parameters()})
            rng_states.append(torch.get_rng_state().numpy().tobytes())

    sampled: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DPTrainingArguments(
            output_dir=out,
            tp_size=1,
            grad_sample_mode=mode,
            noise_multiplier=0.5,
            per_sample_max_grad_norm=1.0,
            per_device_train_batch_size=8,
            optim="sgd",
            learning_rate=0.5,
            max_steps=STEPS,
            save_strategy="steps",
            save_steps=4,
            logging_steps=1,
            report_to=[],
            dp_seed=11,
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        trainer = DPTrainer(
            model=model,
            args=args,
            train_dataset=_dataset(),
            per_sample_loss=_poisoned_loss(poisoned, sampled),
            callbacks=[Record()],
        )
        trainer.train()
    return {
        "steps": steps,
        "rng_states": rng_states,
        "rng_after": torch.get_rng_state(),
        "bad_sampled": sum(sampled),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "report": trainer.privacy_report(),
    }


@pytest.fixture(scope="module", params=["hooks", "ghost"])
def poisoned_runs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    runs = {
        name: _run(str(root / name), request.param, poisoned=name == "poisoned")
        for name in ("poisoned", "reference")
    }
    runs["root"] = root
    return runs


def test_nonfinite_records_add_exactly_nothing_and_training_goes_on(poisoned_runs):
    poisoned, reference = poisoned_runs["poisoned"], poisoned_runs["reference"]
    assert poisoned["bad_sampled"] >= 2  # the NaN and the inf record were both sampled
    assert len(poisoned["steps"]) == len(reference["steps"]) == STEPS
    for step, (got, want) in enumerate(zip(poisoned["steps"], reference["steps"], strict=True)):
        for name, value in got.items():
            assert torch.isfinite(value).all(), (step, name)
            scale = want[name].abs().max().clamp_min(1e-12)
            err = ((value - want[name]).abs().max() / scale).item()
            assert err <= 1e-12, (step, name, err)
    assert all(math.isfinite(loss) for loss in poisoned["losses"])


def test_left_out_gradients_are_reported_at_the_end_only(poisoned_runs):
    report = poisoned_runs["poisoned"]["report"]
    assert report["nonfinite_gradients_zeroed"] == poisoned_runs["poisoned"]["bad_sampled"]
    assert poisoned_runs["reference"]["report"]["nonfinite_gradients_zeroed"] == 0
    # nothing per step: the count is in no checkpoint (its change would date the record)
    checkpoints = poisoned_runs["root"] / "poisoned"
    for path, blob in blobs(str(checkpoints)):
        if "checkpoint-" in path:
            assert b"nonfinite" not in blob, path


def test_no_rng_state_is_stored_and_the_rng_is_fresh_after_training(poisoned_runs):
    poisoned, reference = poisoned_runs["poisoned"], poisoned_runs["reference"]
    # the two runs drew identical dropout (same seed, same batches) ...
    assert poisoned["rng_states"] == reference["rng_states"]
    # ... yet no file under output_dir holds any state the global RNG was in during training
    states = poisoned["rng_states"]
    for path, blob in blobs(str(poisoned_runs["root"] / "poisoned")):
        assert "rng_state" not in os.path.basename(path), path
        assert not any(state in blob for state in states), path
    # and training ends on fresh state: no longer a function of the realised batch sizes
    assert not torch.equal(poisoned["rng_after"], reference["rng_after"])


def test_fsdp_stand_in_pass_carries_no_record(tmp_path):
    """The discarded pass for an empty micro-batch under FSDP runs on constant inputs of the
    first record's shapes: a module that counts the tokens it sees learns nothing of it."""
    from hf_dp_tp import DPTrainer, DPTrainingArguments

    model = models.tiny_causal_lm().double().train()
    counts = torch.zeros(64, dtype=torch.long)
    embed = model.get_input_embeddings()

    def count_tokens(module, args):  # a module buffer updated by every forward pass
        counts.add_(torch.bincount(args[0].flatten(), minlength=64))

    embed.register_forward_pre_hook(count_tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DPTrainingArguments(
            output_dir=str(tmp_path),
            tp_size=1,
            grad_sample_mode="hooks",
            noise_multiplier=1.0,
            per_device_train_batch_size=4,
            report_to=[],
            remove_unused_columns=False,
        )
        data = _dataset().remove_columns("poison")
        trainer = DPTrainer(model=model, args=args, train_dataset=data)
    trainer.get_train_dataloader()
    first = torch.tensor(data[0]["input_ids"])
    trainer._run_discarded_stand_in(trainer.model)  # noqa: SLF001 (the pass under test)
    trainer._run_discarded_stand_in(trainer.model)  # noqa: SLF001
    seen = counts.nonzero().flatten().tolist()
    assert seen == [0] and counts[0] == 2 * first.numel(), (seen, first.tolist())
