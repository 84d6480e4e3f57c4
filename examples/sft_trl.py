"""Supervised fine-tuning with trl, made differentially private by a two-line swap.

An ordinary trl SFT script on prompt-completion data. The only DP lines are the import and the
two names it swaps (``SFTConfig`` -> ``DPSFTConfig``, ``SFTTrainer`` -> ``DPSFTTrainer``) plus
the privacy settings in the config::

    from trl import SFTConfig, SFTTrainer             # before
    from hf_dp_tp import DPSFTConfig, DPSFTTrainer    # after

It runs on the shipped demo assets (nothing to download): the synthetic clinic notes of
``examples/data/clinic_notes`` split into a prompt (the note's first sentence: who came in and
why) and a completion (the rest of the note), the shipped byte-level BPE tokenizer, and a tiny
Llama built from ``examples/data/tiny_llama/config.json`` with random weights. Tensor
parallelism over 2 processes, ε = 8 at δ = 1e-5 per clinic note::

    torchrun --nproc-per-node 2 examples/sft_trl.py
    torchrun --nproc-per-node 2 examples/sft_trl.py --max_steps 5 --output_dir /tmp/sft-demo

Every ``DPSFTConfig`` field is a flag (``--help``). The loss is trl's completion-only loss made
per record: each note's mean token loss over its own completion tokens. The privacy unit is one
note: trl never packs records here (``packing=True`` is refused), so each row of a batch is one
note and per-sample clipping bounds each note's influence. The training loss printed by Trainer
is computed on private data and is outside the guarantee; the evaluation loss is on the held-out
validation notes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from datasets import load_dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from hf_dp_tp import DPSFTConfig, DPSFTTrainer  # instead of: from trl import SFTConfig, SFTTrainer

DATA_DIR = Path(__file__).resolve().parent / "data"

# The demo's settings; any flag overrides them.
DEFAULTS = {
    "output_dir": "outputs/clinic-notes-sft-dp",
    "tp_size": 2,
    "target_epsilon": 8.0,
    "target_delta": 1e-5,
    "per_sample_max_grad_norm": 1.0,
    "per_device_train_batch_size": 64,  # expected batch B̄ = 64 notes: q = 64 / 1600
    "per_device_eval_batch_size": 100,
    "num_train_epochs": 2.0,
    "learning_rate": 2e-2,  # a tiny model trained from scratch; pretrained models want less
    "max_length": 128,  # notes are 71-103 tokens: never truncated
    "bf16": False,  # the demo runs on CPUs; pass --bf16 true on GPUs
    "gradient_checkpointing": False,  # a tiny model: nothing to save
    "logging_steps": 5,
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
}

# "<who>, <age>, <came in> <when> <reporting> <symptom> for <duration>." and the rest of the note
FIRST_SENTENCE = re.compile(r"^(.*? for \d+ \w+\.)( .*)$", re.DOTALL)


def to_prompt_completion(note: dict) -> dict:
    """A note as a prompt (its first sentence) and a completion (the rest)."""
    prompt, completion = FIRST_SENTENCE.match(note["text"]).groups()
    return {"prompt": prompt, "completion": completion}


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(DPSFTConfig)  # trl scripts parse SFTConfig the same way
    parser.set_defaults(**DEFAULTS)
    (args,) = parser.parse_args_into_dataclasses(args=argv)

    notes = load_dataset(str(DATA_DIR / "clinic_notes"))
    notes = notes.map(to_prompt_completion, remove_columns=["text"])
    tokenizer = AutoTokenizer.from_pretrained(str(DATA_DIR / "tokenizer"))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(DATA_DIR / "tiny_llama"))

    trainer = DPSFTTrainer(  # instead of: SFTTrainer(
        model=model,
        args=args,
        train_dataset=notes["train"],
        eval_dataset=notes["validation"],
        processing_class=tokenizer,
    )
    trainer.train()
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        print(
            f"held-out completion loss {metrics['eval_loss']:.3f} after "
            f"{trainer.state.global_step} steps, ε = {trainer.get_epsilon():.3f} at δ = "
            f"{trainer.target_delta:g}"
        )
    trainer.save_model()
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
