"""Coverage matrix: every causal-LM architecture of the installed transformers that ships an HF
``tp_plan`` (plus GPT-2 with ``hf_dp_tp.gpt2_tp_plan()`` and BERT/RoBERTa sequence classifiers
with an explicit plan), built from a tiny config, takes one ``DPTrainer`` step at tp=2 with σ = 0
and every sample clipped; the checkpoint it saves, loaded in one process, is compared with
single-process DP-SGD on the same batch (per-sample gradients by autograd, one sample at a time).
An architecture that cannot be built tiny, or that DPTrainer refuses, is listed with the reason.

    python scripts/coverage_matrix.py                 # all: docs/coverage.json, .md, README
    python scripts/coverage_matrix.py llama gemma2    # a few, printed only

It runs on CPU with 2 gloo processes (one spawned process group for all architectures) and takes
several minutes on 2 cores. The table in docs/coverage.md and the one-line summary in README.md,
each between ``coverage`` markers, are generated from ``docs/coverage.json`` (``render_table``,
``render_summary``); tests/test_coverage_matrix.py checks they agree and re-runs a few rows.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

JSON_PATH = ROOT / "docs" / "coverage.json"
COVERAGE_PAGE = ROOT / "docs" / "coverage.md"  # the table
README = ROOT / "README.md"  # the summary line
START, END = "<!-- coverage:start -->", "<!-- coverage:end -->"

N, SEQ, VOCAB = 8, 8, 64
MAX_PARAMETERS = 2_000_000
# relative error of the update: float64 (layers that compute in fp32 inside, as Gemma-style norms
# do, leave up to ~1e-6), float32
TOLERANCE = {"float64": 1e-5, "float32": 1e-4}

TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    moe_intermediate_size=32,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    shared_expert_intermediate_size=32,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    sliding_window=4,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    use_cache=False,
)


# --------------------------------------------------------------------------- the cases
def causal_lm_types() -> list[str]:
    """Model types with a causal-LM head whose config ships a base-model HF tp_plan."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        try:
            config_cls = CONFIG_MAPPING[model_type]
        except (KeyError, ImportError, AttributeError):
            continue
        if getattr(config_cls, "base_model_tp_plan", None):
            types.append(model_type)
    return sorted(types)


def all_cases() -> list[str]:
    return [*causal_lm_types(), "gpt2 (gpt2_tp_plan)", "bert (classifier)", "roberta (classifier)"]


def tiny_config(model_type: str):
    """The architecture's default config, shrunk: every size field it has set small, per-layer
    lists cut to the tiny depth (keeping their first and last kinds), dropout 0."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type)
    text = defaults.get_text_config() if hasattr(defaults, "get_text_config") else defaults
    values = text.to_dict()
    known = set(values) | set(getattr(text, "attribute_map", {}))
    overrides = {k: v for k, v in TINY.items() if k in known}
    if "qk_rope_head_dim" in known:  # multi-head latent attention: head_dim is derived
        overrides.pop("head_dim", None)
    for key in ("rotary_dim", "partial_rotary_dim"):
        if isinstance(values.get(key), int):
            overrides[key] = 4
    depth, tiny_depth = values.get("num_hidden_layers"), TINY["num_hidden_layers"]
    for key, value in values.items():
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key) and value:
            overrides[key] = 0.0
        if isinstance(value, list) and depth and len(value) == depth and key not in overrides:
            overrides[key] = [value[0], value[-1]][:tiny_depth]
        if isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
            overrides[key] = {k: v for k, v in value.items() if int(k) < tiny_depth}
    try:
        return type(text)(**{**values, **overrides})
    except Exception:  # noqa: BLE001 - some configs rebuild their per-layer lists themselves
        lists = {k: None for k, v in values.items() if isinstance(v, list) and len(v) == depth}
        return type(text)(**{**values, **overrides, **lists})


def build(case: str):
    """``(model, plan_name, task)`` for one case, randomly initialised (seed 0)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    if case.startswith("gpt2"):
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)
        config.resid_pdrop = config.attn_pdrop = config.embd_pdrop = 0.0
        return GPT2LMHeadModel(config), "gpt2", "lm"
    if case.endswith("(classifier)"):
        from transformers import AutoConfig

        model_type = case.split()[0]
        config = AutoConfig.for_model(
            model_type,
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            classifier_dropout=0.0,
            num_labels=3,
            pad_token_id=0,
        )
        return AutoModelForSequenceClassification.from_config(config), "encoder", "classify"
    return AutoModelForCausalLM.from_config(tiny_config(case)), "auto", "lm"


def encoder_plan(prefix: str) -> dict[str, str]:
    """BERT/RoBERTa: attention and MLP column/row-wise (heads split over the TP ranks)."""
    layer = f"{prefix}.encoder.layer.*"
    return {
        f"{layer}.attention.self.query": "colwise",
        f"{layer}.attention.self.key": "colwise",
        f"{layer}.attention.self.value": "colwise",
        f"{layer}.attention.output.dense": "rowwise",
        f"{layer}.intermediate.dense": "colwise",
        f"{layer}.output.dense": "rowwise",
    }


def plan_for(model, plan_name: str):
    if plan_name == "gpt2":
        from hf_dp_tp import gpt2_tp_plan

        return gpt2_tp_plan()
    if plan_name == "encoder":
        return encoder_plan(model.base_model_prefix)
    return "auto"


def records(task: str) -> dict[str, list]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (N, SEQ), generator=g)
    if task == "classify":
        return {
            "input_ids": ids.tolist(),
            "labels": torch.randint(0, 3, (N,), generator=g).tolist(),
        }
    labels = ids.clone()
    labels[::3, :3] = -100
    return {"input_ids": ids.tolist(), "labels": labels.tolist()}


def losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from hf_dp_tp.losses import default_per_sample_loss

    return default_per_sample_loss(model, batch)[0]


def one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= 300 else text[:297] + "..."


# --------------------------------------------------------------------------- parent: reference
def prepare(case: str, root: str) -> dict[str, Any]:
    """Build and save the tiny model; the single-process DP-SGD step it should take (in float64,
    or in float32 for architectures whose kernels have no float64 path, e.g. grouped MoE
    matmuls)."""
    first = _prepare(case, root, torch.float64)
    if first.get("status") == "unsupported" and first["reason"].startswith("tiny build"):
        second = _prepare(case, root, torch.float32)
        if second.get("status") != "unsupported" or not second["reason"].startswith("tiny"):
            return second
    return first


def _prepare(case: str, root: str, dtype: torch.dtype) -> dict[str, Any]:
    from tests import models

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.device("meta"):  # counted before anything is allocated
                size = sum(p.numel() for p in build(case)[0].parameters())
            if size > MAX_PARAMETERS:
                return {
                    "case": case,
                    "status": "unsupported",
                    "reason": f"tiny build: the generic tiny config leaves {size / 1e6:.1f} M "
                    "parameters (a size field it does not know)",
                }
            model, plan_name, task = build(case)
            model = model.to(dtype).train()
            config = model.config
            from hf_dp_tp.parallel import check_tp_divisibility

            check_tp_divisibility(config, 2)
            model_dir = os.path.join(root, case.split()[0] + "-" + plan_name)
            model.save_pretrained(model_dir)
            batch = {k: torch.tensor(v) for k, v in records(task).items()}
            grads, norms = models.reference_per_sample_grads(model, losses, batch)
    except Exception as err:  # noqa: BLE001 - the reason goes into the matrix
        return {"case": case, "status": "unsupported", "reason": f"tiny build: {one_line(err)}"}
    if not bool(torch.isfinite(norms).all()) or float(norms.min()) == 0.0:
        return {"case": case, "status": "unsupported", "reason": "reference: zero/non-finite norm"}
    clip = 0.5 * norms.min().item()
    update = models.reference_dp_update(grads, norms, clip, N)
    before = models.full_params(model)
    expected = {k: before[k] - update[k] for k in update}
    return {
        "case": case,
        "model_class": type(model).__name__,
        "model_dir": model_dir,
        "out": model_dir + "-out",
        "plan": plan_name,
        "task": task,
        "clip": clip,
        "dtype": str(dtype).removeprefix("torch."),
        "expected": expected,
        "before": before,
    }


def compare(run: dict[str, Any]) -> float:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if run["task"] == "classify" else AutoModelForCausalLM
    dtype = getattr(torch, run["dtype"])
    saved = dict(auto.from_pretrained(run["out"], dtype=dtype).named_parameters())
    worst = 0.0
    for name, want in run["expected"].items():
        if name not in saved:
            return math.inf
        scale = (want - run["before"][name]).abs().max().clamp_min(1e-12)
        worst = max(worst, ((saved[name].detach() - want).abs().max() / scale).item())
    return worst


# --------------------------------------------------------------------------- ranks: one step
def step_worker(rank: int, world: int, runs: list[dict[str, Any]]) -> dict[str, str]:
    """Every rank runs every case (failures are symmetric: both ranks hit the same error)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from hf_dp_tp import DPTrainer, DPTrainingArguments

    status: dict[str, str] = {}
    for run in runs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                auto = (
                    AutoModelForSequenceClassification
                    if run["task"] == "classify"
                    else AutoModelForCausalLM
                )
                model = auto.from_pretrained(run["model_dir"], dtype=getattr(torch, run["dtype"]))
                args = DPTrainingArguments(
                    output_dir=run["out"],
                    tp_size=2,
                    tp_plan=plan_for(model, run["plan"]),
                    noise_multiplier=0.0,
                    per_sample_max_grad_norm=run["clip"],
                    per_device_train_batch_size=N,
                    optim="sgd",
                    learning_rate=1.0,
                    lr_scheduler_type="constant",
                    weight_decay=0.0,
                    max_steps=1,
                    report_to=[],
                    save_strategy="no",
                    dp_seed=3,
                    disable_tqdm=True,
                    ddp_timeout=120,
                    log_level="error",
                )
                data = Dataset.from_dict(records(run["task"]))
                trainer = DPTrainer(model=model, args=args, train_dataset=data)
                trainer.train()
                trainer.save_model()
            status[run["case"]] = "ok"
        except Exception as err:  # noqa: BLE001 - the reason goes into the matrix
            status[run["case"]] = one_line(err)
            if os.environ.get("COVERAGE_DEBUG"):
                traceback.print_exc()
    return status


def run_matrix(cases: list[str], root: str) -> list[dict[str, Any]]:
    from tests.distributed_harness import run_distributed

    prepared = []
    for i, case in enumerate(cases):
        print(f"[{i + 1}/{len(cases)}] {case}", file=sys.stderr, flush=True)
        prepared.append(prepare(case, root))
    runs = [r for r in prepared if r.get("status") != "unsupported"]
    light = [{k: v for k, v in r.items() if k not in ("expected", "before")} for r in runs]
    status = run_distributed(step_worker, 2, light)[0] if light else {}
    rows = []
    for item in prepared:
        case = item["case"]
        if item.get("status") == "unsupported":
            rows.append(item)
            continue
        row = {
            "case": case,
            "model_class": item["model_class"],
            "plan": item["plan"],
            "dtype": item["dtype"],
        }
        if status.get(case) != "ok":
            rows.append({**row, "status": "unsupported", "reason": status.get(case, "no result")})
            continue
        error = compare(item)
        row.update(error=float(f"{error:.3g}"))
        row["status"] = "equal" if error < TOLERANCE[item["dtype"]] else "different"
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- the table
def render_table(rows: list[dict[str, Any]], versions: dict[str, str]) -> str:
    equal = sum(r["status"] == "equal" for r in rows)
    lines = [
        f"{equal} of {len(rows)} architectures take one DP-SGD step at tp=2 equal to "
        f"single-process DP-SGD (σ = 0, every sample clipped; relative error of the update, "
        f"largest over parameters; float64 unless marked fp32). Generated by "
        f"`python scripts/coverage_matrix.py` with transformers {versions['transformers']}, "
        f"torch {versions['torch']}.",
        "",
        "| architecture | model | plan | result |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        fp32 = ", fp32" if r.get("dtype") == "float32" else ""
        if r["status"] == "equal":
            result = f"equal ({r['error']:.1e}{fp32})"
        elif r["status"] == "different":
            result = f"**different** ({r['error']:.1e}{fp32})"
        else:
            result = f"unsupported: {r['reason']}"
        lines.append(
            f"| {r['case']} | {r.get('model_class', '')} | {r.get('plan', '')} | {result} |"
        )
    return "\n".join(lines)


def render_summary(rows: list[dict[str, Any]], versions: dict[str, str]) -> str:
    """The README's one line: how many architectures are exact, refused, or not built."""
    equal = sum(r["status"] == "equal" for r in rows)
    different = sum(r["status"] == "different" for r in rows)
    unbuilt = sum(
        r["status"] == "unsupported" and r["reason"].startswith("tiny build") for r in rows
    )
    refused = len(rows) - equal - different - unbuilt
    wrong = f"; **{different} different**" if different else "; none trains with a different update"
    return (
        f"**{equal} of {len(rows)}** transformers architectures (transformers "
        f"{versions['transformers']}) take one DP-SGD step at tp=2 exactly equal to "
        f"single-process DP-SGD; {refused} are refused before training with the reason "
        f"(mostly MoE experts and routers without a per-sample rule) and {unbuilt} could not be "
        f"built from the generic tiny config{wrong}. Table: [docs/coverage.md](docs/coverage.md)."
    )


def write_between_markers(path: Path, text: str) -> None:
    content = path.read_text()
    start, end = content.index(START) + len(START), content.index(END)
    path.write_text(content[:start] + "\n" + text + "\n" + content[end:])


def main(argv: list[str]) -> None:
    import transformers

    cases = argv or all_cases()
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as root:
        rows = run_matrix(cases, root)
    versions = {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}
    table = render_table(rows, versions)
    print(table)
    print(f"{len(rows)} cases in {time.monotonic() - start:.0f}s")
    if not argv:
        JSON_PATH.write_text(json.dumps({"versions": versions, "rows": rows}, indent=1) + "\n")
        write_between_markers(COVERAGE_PAGE, table)
        write_between_markers(README, render_summary(rows, versions))


if __name__ == "__main__":
    main(sys.argv[1:])
