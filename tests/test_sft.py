"""``DPSFTTrainer`` / ``DPSFTConfig``: trl's SFT data pipeline trained by DPTrainer.

1. One step equals single-process DP-SGD (σ = 0, SGD lr = 1, sampling rate 1, a clip norm below
   every per-sample norm) computed here independently: each record tokenized on its own, labels
   built here from the prompt / assistant segments (not from trl's masks), per-sample gradients
   of each record's mean loss over its completion (or assistant) tokens, one record at a time,
   clipped, summed, / B̄. Prompt-completion data with completion-only loss and conversational
   data (a chat template) with assistant-only loss; single-process and tp = 2. The same result is
   far from the reference that trains on the prompt tokens too, so ignoring the masks fails.
2. Packing, padding-free batches and the other settings that mix records or reduce the loss
   across samples are refused, up front and (for a packed batch) at the loss.
3. Nothing per step is logged that is a statistic of the training batches (trl's num_tokens,
   mean_token_accuracy, entropy).
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl")

from tests import models  # noqa: E402
from tests.distributed_harness import ROOT, run_distributed, script_env  # noqa: E402

TOKENIZER_DIR = ROOT / "examples" / "data" / "tokenizer"
CLIP = 1e-3  # below every per-sample gradient norm (checked against the reference)
MAX_LENGTH = 64

# A chat template whose assistant turns sit inside {% generation %} (what assistant-only loss
# needs): "<s>role: content</s>" per message.
CHAT_TEMPLATE = (
    "{%- for m in messages %}<s>{{ m['role'] }}:"
    "{%- if m['role'] == 'assistant' %}{% generation %} {{ m['content'] }}</s>{% endgeneration %}"
    "{%- else %} {{ m['content'] }}</s>{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<s>assistant:{%- endif %}"
)

PROMPT_COMPLETION = [
    ("Ms. Vera Thistle, 52,", " was seen today with a cough."),
    ("Mr. Odile Bellweather, 78,", " came in describing shortness of breath."),
    ("Mx. Una Carrow, 80, was seen", " this morning. Likely a viral infection."),
    ("Temperature 38.3 C,", " blood pressure 164/62, pulse 65."),
    ("Prescribed amoxicillin", " 500 mg three times a day for 5 days."),
    ("Advised rest and", " plenty of fluids. Follow-up in 3 weeks."),
    ("Allergic to", " penicillin."),
    ("Likely iron deficiency.", " Prescribed ferrous sulfate 200 mg once a day."),
]
CONVERSATIONS = [
    [("user", "Note for Ms. Vera, 52."), ("assistant", "Ms. Vera, 52, was seen today.")],
    [("user", "Pulse?"), ("assistant", "Pulse 65."), ("user", "Plan?"), ("assistant", "Rest.")],
    [("user", "Allergies?"), ("assistant", "Allergic to penicillin.")],
    [("user", "Advice for Mr. Odile?"), ("assistant", "Advised rest and plenty of fluids.")],
]
KINDS = ("prompt_completion", "conversational")


# --------------------------------------------------------------------------- data and model
def _tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _dataset(kind: str):
    from datasets import Dataset

    if kind == "prompt_completion":
        prompts, completions = zip(*PROMPT_COMPLETION, strict=True)
        return Dataset.from_dict({"prompt": list(prompts), "completion": list(completions)})
    messages = [[{"role": r, "content": c} for r, c in talk] for talk in CONVERSATIONS]
    return Dataset.from_dict({"messages": messages})


def _reference_records(kind: str, *, mask_prompts: bool = True) -> list[tuple[list, list]]:
    """``(input_ids, labels)`` per record, built here from its segments: the prompt (or every
    non-assistant segment) is -100 when ``mask_prompts``; the completion gets the EOS trl adds."""
    tokenizer = _tokenizer()

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if kind == "prompt_completion":
        talks = [
            [(False, tokenizer.bos_token + prompt), (True, completion + tokenizer.eos_token)]
            for prompt, completion in PROMPT_COMPLETION
        ]
    else:
        talks = [
            [
                seg
                for role, content in talk
                for seg in (
                    (False, f"<s>{role}:"),
                    (role == "assistant", f" {content}</s>"),
                )
            ]
            for talk in CONVERSATIONS
        ]
    records = []
    for talk in talks:
        input_ids, labels = [], []
        for trained, text in talk:
            pieces = ids(text)
            input_ids += pieces
            labels += pieces if (trained or not mask_prompts) else [-100] * len(pieces)
        records.append((input_ids, labels))
    return records


def _reference_update(model_dir: str, kind: str, *, mask_prompts: bool = True):
    """``(updated full parameters, per-sample norms)`` of single-process DP-SGD, σ = 0, lr 1:
    per-sample gradients one record at a time (unpadded) of its mean loss over its own trained
    tokens, clipped at CLIP, summed, / B̄ (= every record)."""
    model = models.load_tiny_llama(model_dir).double()
    records = _reference_records(kind, mask_prompts=mask_prompts)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    per_sample = {n: [] for n, _ in named}
    for input_ids, labels in records:
        ids = torch.tensor([input_ids])
        positions = torch.arange(ids.shape[1])[None]
        logits = model(input_ids=ids, position_ids=positions).logits[0, :-1]
        loss = F.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=-100)
        grads = torch.autograd.grad(loss, [p for _, p in named])
        for (name, _), grad in zip(named, grads, strict=True):
            per_sample[name].append(grad)
    stacked = {name: torch.stack(grads) for name, grads in per_sample.items()}
    norms = torch.sqrt(sum(g.pow(2).flatten(1).sum(1) for g in stacked.values()))
    update = models.reference_dp_update(stacked, norms, CLIP, len(records))
    before = models.full_params(model)
    return {name: before[name] - update[name] for name in update}, norms


def _config(out: str, **overrides):
    from hf_dp_tp import DPSFTConfig

    settings = dict(
        output_dir=out,
        noise_multiplier=0.0,
        per_sample_max_grad_norm=CLIP,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_steps=1,
        max_length=MAX_LENGTH,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        dp_seed=3,
        bf16=False,
        disable_tqdm=True,
    )
    settings.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPSFTConfig(**settings)


def _trainer(model_dir: str, out: str, kind: str, **overrides):
    from transformers import AutoModelForCausalLM

    from hf_dp_tp import DPSFTTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    loss_flags = (
        {"completion_only_loss": True}
        if kind == "prompt_completion"
        else {"assistant_only_loss": True}
    )
    dataset = _dataset(kind)
    batch = {"per_device_train_batch_size": len(dataset)}  # every record: sampling rate 1
    args = _config(out, **{**batch, **loss_flags, **overrides})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPSFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=_tokenizer()
        )


def _one_step(model_dir: str, out: str, kind: str, **overrides) -> dict:
    """Train one step; the full parameters after it and what trl prepared (records, masks)."""
    trainer = _trainer(model_dir, out, kind, **overrides)
    prepared = [(row["input_ids"], row["labels"]) for row in trainer.train_dataset]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return {
        "params": models.full_params(trainer.model),
        "prepared": prepared,
        "checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
    }


def _tp2_worker(rank: int, world: int, model_dir: str, out: str) -> dict:
    return {kind: _one_step(model_dir, f"{out}/{kind}", kind, tp_size=2) for kind in KINDS}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama with the shipped tokenizer's vocabulary (1,024) and room for 64 tokens."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        **{**models.TINY_LM, "vocab_size": len(_tokenizer()), "max_position_embeddings": 64}
    )
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("sft") / "model")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def references(model_dir):
    return {
        (kind, masked): _reference_update(model_dir, kind, mask_prompts=masked)
        for kind in KINDS
        for masked in (True, False)
    }


def _relative_error(got: dict, want: dict, before: dict) -> float:
    assert set(got) == set(want)
    worst = 0.0
    for name, value in want.items():
        scale = (value - before[name]).abs().max().clamp_min(1e-12)
        worst = max(worst, ((got[name] - value).abs().max() / scale).item())
    return worst


def _check_against_reference(result: dict, kind: str, references: dict, model_dir: str) -> None:
    # trl prepared the same tokens and masks as the independent reference
    assert result["prepared"] == _reference_records(kind)
    before = models.full_params(models.load_tiny_llama(model_dir).double())
    want, norms = references[(kind, True)]
    assert bool((norms > 10 * CLIP).all()), norms  # every per-sample gradient is clipped
    error = _relative_error(result["params"], want, before)
    print(f"{kind}: relative error {error:.3g}")
    assert error <= 1e-9, error
    # a trainer that ignored the completion / assistant mask would be far off
    unmasked, _ = references[(kind, False)]
    assert _relative_error(result["params"], unmasked, before) > 1e-2


# --------------------------------------------------------------------------- 1. equivalence
@pytest.mark.parametrize("kind", KINDS)
def test_one_step_equals_single_process_dp_sgd(kind, model_dir, references, tmp_path):
    result = _one_step(model_dir, str(tmp_path), kind)
    assert result["checkpointing"]  # trl's default gradient_checkpointing=True is kept
    _check_against_reference(result, kind, references, model_dir)


def test_tp2_step_equals_single_process_dp_sgd(model_dir, references, tmp_path):
    results = run_distributed(_tp2_worker, 2, model_dir, str(tmp_path))
    for kind in KINDS:
        _check_against_reference(results[0][kind], kind, references, model_dir)
        for name, value in results[1][kind]["params"].items():  # both ranks hold the same model
            assert torch.equal(value, results[0][kind]["params"][name]), name


# --------------------------------------------------------------------------- 2. refusals
@pytest.mark.parametrize(
    "setting, words",
    [
        ({"packing": True}, "several records"),
        ({"packing": True, "packing_strategy": "wrapped"}, "packing=False"),
        ({"padding_free": True}, "one row"),
        ({"eval_packing": True}, "per record"),
        ({"loss_type": "dft"}, "per-sample"),
        ({"activation_offloading": True}, "gradient_checkpointing"),
        ({"router_aux_loss_coef": 0.01}, "cross-sample"),
        ({"router_aux_loss_coef": None}, "cross-sample"),
        ({"label_smoothing_factor": 0.1}, "label_smoothing_factor=0"),
    ],
)
def test_settings_that_mix_records_are_refused(setting, words, tmp_path):
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"{name}=.*not supported by DPSFTTrainer") as error:
        _config(str(tmp_path), **setting)
    assert words in str(error.value)


def test_trainer_refuses_batch_level_losses_and_foreign_arguments(model_dir, tmp_path):
    from trl import SFTConfig

    from hf_dp_tp import DPSFTTrainer, DPTrainingArguments

    with pytest.raises(ValueError, match="compute_loss_func"):
        DPSFTTrainer(
            model_dir,
            _config(str(tmp_path)),
            train_dataset=_dataset("prompt_completion"),
            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: 0,
        )
    with pytest.raises(ValueError, match="chat_template_path"):
        DPSFTTrainer(model_dir, _config(str(tmp_path), chat_template_path=str(TOKENIZER_DIR)))
    for args in (
        SFTConfig(str(tmp_path), bf16=False),
        DPTrainingArguments(str(tmp_path), noise_multiplier=1),
    ):
        with pytest.raises(TypeError, match="DPSFTConfig"):
            DPSFTTrainer(model_dir, args)


def test_packed_or_padding_free_batch_is_refused_at_the_loss(model_dir, tmp_path):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    trainer = _trainer(model_dir, str(tmp_path), "prompt_completion")
    rows = [trainer.train_dataset[i] for i in range(3)]
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    with pytest.raises(ValueError, match="several records"):
        trainer.sft_per_sample_loss(trainer.model, flat)


def test_mask_columns_left_in_a_batch_become_labels(model_dir, tmp_path):
    """A custom collator that leaves trl's mask columns in the batch: the masked tokens leave the
    per-sample loss, exactly as if trl had put -100 in the labels."""
    trainer = _trainer(model_dir, str(tmp_path), "prompt_completion")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    trained = batch["labels"] != -100
    unmasked = dict(
        batch, labels=torch.where(batch["attention_mask"] == 1, batch["input_ids"], -100)
    )
    with torch.no_grad():
        want, _ = trainer.sft_per_sample_loss(trainer.model, batch)
        for column in ("completion_mask", "assistant_masks"):
            got, _ = trainer.sft_per_sample_loss(trainer.model, {**unmasked, column: trained})
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        full, _ = trainer.sft_per_sample_loss(trainer.model, unmasked)
    assert not torch.allclose(full, want)


def test_config_keeps_trl_defaults_except_the_dp_ones():
    """Every SFTConfig default survives in DPSFTConfig (DPTrainingArguments re-declares every
    TrainingArguments field with TrainingArguments' default), except DP's own."""
    import dataclasses

    from trl import SFTConfig

    from hf_dp_tp import DPSFTConfig

    dp_own = {"max_grad_norm", "average_tokens_across_devices", "router_aux_loss_coef"}
    ours = {f.name: f for f in dataclasses.fields(DPSFTConfig)}
    changed = {
        f.name
        for f in dataclasses.fields(SFTConfig)
        if (f.default, f.default_factory) != (ours[f.name].default, ours[f.name].default_factory)
    }
    assert changed == dp_own


def test_import_without_trl_names_the_extra():
    code = (
        "import sys; sys.modules['trl'] = None\n"
        "import hf_dp_tp\n"
        "hf_dp_tp.DPTrainingArguments\n"
        "try:\n"
        "    hf_dp_tp.DPSFTTrainer\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=script_env(), capture_output=True, text=True, check=True
    ).stdout
    assert 'pip install -e ".[sft]"' in out and "pip install trl" in out


# --------------------------------------------------------------------------- 3. logs
TRL_STEP_METRICS = ("num_tokens", "mean_token_accuracy", "entropy", "aux_loss")


def test_no_training_batch_statistic_is_logged(model_dir, tmp_path):
    """Three noisy steps, a log every step: only the loss (outside the guarantee, as with
    DPTrainer), the learning rate, ε, δ and the epoch. trl's per-step metrics are dropped even if
    something records them (a callback plays trl here)."""
    from transformers import TrainerCallback

    trainer = _trainer(
        model_dir,
        str(tmp_path),
        "prompt_completion",
        noise_multiplier=1.0,
        per_device_train_batch_size=2,
        max_steps=3,
    )

    class RecordLikeTrl(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            for name in TRL_STEP_METRICS:
                trainer._metrics["train"][name].append(float(state.global_step))

    trainer.add_callback(RecordLikeTrl())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 3
    for entry in steps:
        assert set(entry) == {"loss", "learning_rate", "epsilon", "delta", "epoch", "step"}
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert not logged & {*TRL_STEP_METRICS, "num_input_tokens_seen"}


# --------------------------------------------------------------------------- the example
def test_sft_example_runs(tmp_path, capsys, monkeypatch):
    """examples/sft_trl.py, in this process (tp_size 1, one step, 64 / 16 of the notes): its
    flags parse into a DPSFTConfig, the notes split into prompt and completion, and it trains,
    evaluates on the held-out notes and reports ε. (Its 2-process torchrun demo is the same
    script.)"""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sft_trl", ROOT / "examples" / "sft_trl.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    load = example.load_dataset

    def fewer_notes(*args, **kwargs):
        notes = load(*args, **kwargs)
        notes["train"], notes["validation"] = (
            notes["train"].select(range(64)),
            notes["validation"].select(range(16)),
        )
        return notes

    monkeypatch.setattr(example, "load_dataset", fewer_notes)
    monkeypatch.setitem(example.DEFAULTS, "target_epsilon", None)  # no σ calibration: faster
    flags = ["--output_dir", str(tmp_path), "--tp_size", "1", "--max_steps", "1"]
    flags += ["--per_device_train_batch_size", "4", "--noise_multiplier", "1.0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = example.main(flags)
    assert math.isfinite(metrics["eval_loss"])
    assert "held-out completion loss" in capsys.readouterr().out
