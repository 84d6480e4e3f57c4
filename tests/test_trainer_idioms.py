"""Trainer idioms a DP run keeps (one process, no TP).

1. ``resume_from_checkpoint=True`` — or the string ``"true"``, as a command-line flag arrives —
   resumes the latest ``checkpoint-N`` of ``output_dir``; a path that does not exist is refused
   before anything is loaded or sharded, and the refusal lists the checkpoints found.
2. ``save_model`` (full model and LoRA adapter) and ``push_to_hub`` write a model card whose
   privacy section states (ε, δ), the accountant, σ, q, steps, C, the privacy unit and what is
   not covered — and no seed.
"""

from __future__ import annotations

import os
import re
import warnings

import pytest

from tests import models
from tests.test_privacy_integrity import USER_SEED
from tests.test_trainer import _args, _dataset
from tests.test_user_seed_redaction import _FakeHub


def _trainer(out: str, model=None, **overrides):
    from hf_dp_tp import DPTrainer

    args = _args(
        out,
        tp_size=1,
        grad_sample_mode="hooks",
        noise_multiplier=1.0,
        dp_seed=USER_SEED,
        **overrides,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPTrainer(
            model=model if model is not None else models.tiny_causal_lm(),
            args=args,
            train_dataset=_dataset(),
        )


def _train(trainer, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(**kwargs)
    return trainer


def test_resume_true_takes_the_latest_checkpoint_and_a_missing_one_is_listed(tmp_path):
    out = str(tmp_path / "run")
    first = _train(_trainer(out, max_steps=2, save_strategy="steps", save_steps=1))
    assert sorted(os.listdir(out)) >= ["checkpoint-1", "checkpoint-2"]
    epsilon_after_two = first.get_epsilon()
    for flag in (True, "true"):
        resumed = _train(_trainer(out, max_steps=3), resume_from_checkpoint=flag)
        assert resumed.state.global_step == 3
        assert resumed.privacy_plan.steps_accounted == 3  # 2 from the ledger + 1
        assert resumed.get_epsilon() > epsilon_after_two
    missing = os.path.join(out, "checkpoint-7")
    expected = re.escape(f"{missing!r} does not exist") + ".*checkpoint-1, checkpoint-2"
    with pytest.raises(ValueError, match=expected):  # at construction: before any sharding
        _trainer(out, max_steps=3, resume_from_checkpoint=missing)
    with pytest.raises(ValueError, match=expected):
        _trainer(out, max_steps=3).train(resume_from_checkpoint=missing)
    with pytest.raises(ValueError, match="has none"):
        _trainer(str(tmp_path / "empty"), max_steps=1).train(resume_from_checkpoint="true")


def _card(directory) -> str:
    with open(os.path.join(directory, "README.md"), encoding="utf-8") as f:
        return f.read()


def _check_card(card: str, trainer) -> None:
    report = trainer.privacy_report()
    assert card.count("## Differential privacy") == 1
    assert f"({report['epsilon']:.4g}, {report['delta']:.4g})-differential privacy" in card
    for row in (
        f"| accountant | {report['accountant']} (upper bound) |",
        f"| noise multiplier σ | {report['noise_multiplier']:.4g} |",
        f"| sampling | Poisson, rate q = {report['sample_rate']:.4g} |",
        f"| optimizer steps | {report['steps']} |",
        f"| per-sample clip norm C | {report['per_sample_max_grad_norm']:.4g} |",
    ):
        assert row in card, row
    assert "**Privacy unit:** one record" in card
    assert "**Not covered by the guarantee:**" in card and "training loss" in card
    assert str(USER_SEED) not in card


def test_save_model_and_push_to_hub_write_a_privacy_card(tmp_path, monkeypatch):
    import transformers.trainer

    hub = _FakeHub(tmp_path / "hub")
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    out = str(tmp_path / "out")
    trainer = _train(_trainer(out, max_steps=2, push_to_hub=True, hub_model_id="dp-card"))
    trainer.save_model()
    _check_card(_card(out), trainer)
    trainer.save_model()  # saving again replaces the section, never duplicates it
    _check_card(_card(out), trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.push_to_hub()
    _, pushed = hub.uploads[-1]
    _check_card(_card(pushed), trainer)


def test_a_lora_adapter_gets_the_privacy_card(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        models.tiny_causal_lm(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    out = str(tmp_path / "adapter")
    trainer = _train(_trainer(out, model=model, max_steps=1))
    trainer.save_model()
    assert os.path.exists(os.path.join(out, "adapter_config.json"))
    _check_card(_card(out), trainer)
