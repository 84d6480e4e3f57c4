"""Validate the preflight memory estimate (hf_dp_tp.memory) against measured peaks, on CPU.

Run from the repository root with plain Python::

    python bench/memory.py                 # the default grid, one fresh process per row
    python bench/memory.py --out results.json

Every configuration runs in its own fresh process (``ru_maxrss`` is a lifetime high-water mark):
a randomly initialised Llama (hidden 256, 4 layers, 4 heads, MLP 1024, vocab 4096, untied, fp32),
T = 64 tokens, AdamW, 3 optimizer steps (the first step with autograd's weight gradients, two
without), single process (``tp_size=1``), trained with ``DPTrainer`` (per-sample ``"hooks"`` or
``"ghost"``) or with plain ``transformers.Trainer`` (non-private). The measured increase is
``ru_maxrss`` after training minus the resident set right before ``train()`` (model, trainer and
runtime already loaded); it is compared with the estimate minus its ``parameters`` term (resident
already), computed with :func:`hf_dp_tp.memory.estimate_memory` at the largest micro-batch the
run realised (Poisson sampling: the realised sizes vary around ``--batch``; a bench on synthetic
data may read them). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import warnings

HIDDEN, LAYERS, HEADS, INNER, VOCAB, SEQ, N = 256, 4, 4, 1024, 4096, 64, 512
GRID = [(mode, b) for mode in ("hooks", "ghost", None) for b in (4, 8)]


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _worker(mode: str | None, batch: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from hf_dp_tp import DPTrainer, DPTrainingArguments
    from hf_dp_tp.memory import estimate_memory

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        intermediate_size=INNER,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
        use_cache=False,
    )
    model = LlamaForCausalLM(config).train()
    ids = torch.randint(0, VOCAB, (N, SEQ))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    common = dict(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=batch,
        max_steps=3,
        optim="adamw_torch",
        learning_rate=1e-4,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    sizes: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode is None:
            trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data)
        else:
            args = DPTrainingArguments(
                **common,
                tp_size=1,
                grad_sample_mode=mode,
                noise_multiplier=1.0,
                memory_check="off",
            )
            trainer = DPTrainer(model=model, args=args, train_dataset=data)
            step = trainer.training_step

            def recording_step(model, inputs, *a, **k):
                sizes.append(int(inputs["input_ids"].shape[0]))
                return step(model, inputs, *a, **k)

            trainer.training_step = recording_step
    before = _rss()
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    realised = max(sizes) if sizes else batch
    estimate = estimate_memory(
        trainer.model, grad_sample_mode=mode, micro_batch=realised, seq_len=SEQ
    )
    return {
        "mode": mode or "non-private",
        "batch": batch,
        "largest_micro_batch": realised,
        "rss_before_train_mb": before / 2**20,
        "peak_mb": peak / 2**20,
        "measured_increase_mb": (peak - before) / 2**20,
        "estimated_increase_mb": (estimate.total - estimate.parameters) / 2**20,
        "estimate_terms_mb": {k: v / 2**20 for k, v in estimate.terms.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "BATCH"))
    parser.add_argument("--out")
    opts = parser.parse_args()
    if opts.worker:
        mode = None if opts.worker[0] == "none" else opts.worker[0]
        print(json.dumps(_worker(mode, int(opts.worker[1]))))
        return
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")
    rows = []
    for mode, batch in GRID:
        cmd = [sys.executable, __file__, "--worker", mode or "none", str(batch)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["estimate_over_measured"] = row["estimated_increase_mb"] / row["measured_increase_mb"]
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    result = {
        "config": dict(hidden=HIDDEN, layers=LAYERS, heads=HEADS, inner=INNER, vocab=VOCAB),
        "seq": SEQ,
        "rows": rows,
    }
    text = json.dumps(result, indent=1)
    if opts.out:
        with open(opts.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
