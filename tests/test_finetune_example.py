"""The canonical script ``examples/finetune_causal_lm.py``, its shipped assets, the accelerate
config and the notebook: each run end to end on 2 CPU processes (gloo), checked on what it
produced — the privacy report, the saved model loaded in one process, the eval loss."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed_harness import ROOT, run_script, torchrun_command

EXAMPLES = ROOT / "examples"
DATA = EXAMPLES / "data"


def _load_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _load_module(name: str, path: Path):
    """A script as a module, registered in ``sys.modules`` first (dataclasses with postponed
    annotations look their module up there)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _script():
    return _load_module("finetune_causal_lm", EXAMPLES / "finetune_causal_lm.py")


def script_prompt() -> str:
    return _script().DEMO_PROMPT


def test_shipped_notes_are_what_the_generator_writes(tmp_path, monkeypatch):
    gen = _load_module("generate_clinic_notes", DATA / "generate_clinic_notes.py")
    monkeypatch.setattr(gen, "NOTES_DIR", tmp_path)
    gen.write_notes()
    for split in ("train", "validation"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (
            DATA / "clinic_notes" / f"{split}.jsonl"
        ).read_bytes()
    card = (DATA / "clinic_notes" / "README.md").read_text()
    assert "license: cc0-1.0" in card and "synthetic" in card


def test_shipped_tokenizer_and_config_fit_the_notes():
    from datasets import load_dataset
    from transformers import AutoConfig, AutoTokenizer

    notes = load_dataset(str(DATA / "clinic_notes"))
    assert (len(notes["train"]), len(notes["validation"])) == (1600, 200)
    tokenizer = AutoTokenizer.from_pretrained(str(DATA / "tokenizer"))
    config = AutoConfig.from_pretrained(str(DATA / "tiny_llama"))
    assert len(tokenizer) == config.vocab_size == 1024
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert config.num_attention_heads % 2 == 0 and config.num_key_value_heads % 2 == 0
    encoded = tokenizer(list(notes["train"]["text"]) + list(notes["validation"]["text"]))[
        "input_ids"
    ]
    assert max(len(ids) for ids in encoded) < 128  # the demo never truncates a note
    # <s> first; no </s>: a prompt encoded for generation must not end the text
    assert all(ids[0] == 1 and 2 not in ids for ids in encoded)
    text = notes["train"][0]["text"]
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_training_records_end_with_eos_unless_truncated():
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    script = _script()
    tokenizer = AutoTokenizer.from_pretrained(str(DATA / "tokenizer"))
    texts = ["Follow-up in 2 weeks.", "Non-smoker. " * 40]
    raw = DatasetDict(train=Dataset.from_dict({"text": texts}))
    args = script.parse_args(["--output_dir", "x"])[2]
    data_args = script.DataArguments(max_seq_length=32)
    short, long = script.tokenize(raw, tokenizer, data_args, args)["train"]
    plain = tokenizer(texts[0])["input_ids"]
    assert short["input_ids"] == plain + [tokenizer.eos_token_id]
    assert short["attention_mask"] == [1] * (len(plain) + 1)
    assert len(long["input_ids"]) == 32 and tokenizer.eos_token_id not in long["input_ids"]


@pytest.mark.parametrize("extension", ["txt", "csv", "jsonl"])
def test_train_file_without_validation_split_holds_out_a_percentage(tmp_path, extension):
    script = _script()
    lines = [f"Note number {i}." for i in range(40)]
    path = tmp_path / f"notes.{extension}"
    if extension == "txt":
        path.write_text("\n".join(lines) + "\n")
    elif extension == "csv":
        path.write_text("text\n" + "\n".join(lines) + "\n")
    else:
        path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    data_args = script.DataArguments(train_file=str(path), validation_split_percentage=10)
    raw = script.load_raw_datasets(data_args, seed=0)
    assert (len(raw["train"]), len(raw["validation"])) == (36, 4)
    assert sorted([*raw["train"]["text"], *raw["validation"]["text"]]) == sorted(lines)


def test_demo_defaults_parse_and_real_flags_override_them():
    script = _script()
    model_args, data_args, args, run_args = script.parse_args(
        ["--output_dir", "x", "--disable_tqdm", "true"]
    )
    assert model_args.model_name_or_path is None and data_args.dataset_name is None
    assert (args.tp_size, args.target_epsilon, args.target_delta) == (2, 8.0, 1e-5)
    assert run_args.logical_batch_size == 64 and args.max_grad_norm == 0.0
    assert not run_args.overwrite_output_dir and run_args.prompt
    _, _, args, _ = script.parse_args(
        ["--output_dir", "x", "--tp_size", "1", "--learning_rate", "1e-4", "--accountant", "rdp"]
    )
    assert (args.tp_size, args.learning_rate, args.accountant) == (1, 1e-4, "rdp")


@pytest.mark.parametrize(
    "world, flags, per_device, logical",
    [
        (2, [], 64, 64),  # the demo: tp=2, dp=1
        (4, [], 32, 64),  # the FSDP line on 4 processes: dp=2, the same B̄ and q
        (4, ["--gradient_accumulation_steps", "4"], 8, 64),
        (8, ["--logical_batch_size", "256"], 64, 256),
        (4, ["--per_device_train_batch_size", "16"], 16, 32),  # an explicit per-device batch
    ],
)
def test_the_logical_batch_is_fixed_across_launches(monkeypatch, world, flags, per_device, logical):
    """B̄ (hence q) does not change with the number of processes: the per-device batch is
    derived from --logical_batch_size (demo: 64) and dp_size = world size / tp_size."""
    script = _script()
    _, _, args, run_args = script.parse_args(["--output_dir", "x", *flags])
    monkeypatch.setattr(type(args), "world_size", property(lambda self: world))
    script.apply_logical_batch(args, run_args)
    dp = world // args.tp_size
    assert args.per_device_train_batch_size == per_device
    assert per_device * args.gradient_accumulation_steps * dp == logical


def test_a_logical_batch_that_does_not_split_or_clashes_is_refused(monkeypatch):
    script = _script()
    _, _, args, run_args = script.parse_args(["--output_dir", "x", "--logical_batch_size", "63"])
    monkeypatch.setattr(type(args), "world_size", property(lambda self: 4))
    with pytest.raises(ValueError, match=r"positive multiple of dp_size x .* = 2 x 1.*e\.g\. 64"):
        script.apply_logical_batch(args, run_args)
    with pytest.raises(ValueError, match="not both"):
        script.parse_args(
            [
                "--output_dir",
                "x",
                "--logical_batch_size",
                "64",
                "--per_device_train_batch_size",
                "8",
            ]
        )


@pytest.mark.parametrize(
    "flags, sigma, epsilon",
    [
        (["--noise_multiplier", "1.0"], 1.0, None),  # an explicit σ replaces the demo's ε
        (["--noise_multiplier", "0.5", "--target_epsilon", "none"], 0.5, None),
        (["--target_epsilon", "3"], None, 3.0),
        (["--target_epsilon", "None", "--noise_multiplier", "0.7"], 0.7, None),
    ],
)
def test_explicit_noise_multiplier_wins_over_the_demo_epsilon(flags, sigma, epsilon):
    args = _script().parse_args(["--output_dir", "x", *flags])[2]
    assert (args.noise_multiplier, args.target_epsilon) == (sigma, epsilon)


def test_both_or_neither_privacy_flag_explicitly_is_refused():
    script = _script()
    with pytest.raises(ValueError, match="exactly one of target_epsilon"):
        script.parse_args(["--output_dir", "x", "--noise_multiplier", "1", "--target_epsilon", "2"])
    with pytest.raises(ValueError, match="exactly one of target_epsilon"):
        script.parse_args(["--output_dir", "x", "--target_epsilon", "none"])


def test_output_dir_of_an_earlier_run_is_refused_unless_overwrite(tmp_path):
    script = _script()
    out = tmp_path / "out"

    def check(*flags):
        _, _, args, run_args = script.parse_args(["--output_dir", str(out), *flags])
        script.check_output_dir(args, run_args)

    check()  # missing
    out.mkdir()
    check()  # empty
    (out / "model.safetensors").write_bytes(b"")
    with pytest.raises(
        ValueError, match=r"not empty \(model\.safetensors\).*--overwrite_output_dir"
    ):
        check()
    check("--overwrite_output_dir", "true")
    check("--resume_from_checkpoint", str(out / "checkpoint-3"))


def test_collator_masks_padding_out_of_the_labels():
    CausalLMPaddingCollator = _script().CausalLMPaddingCollator
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(DATA / "tokenizer"))
    features = [dict(tokenizer(t)) for t in ("Follow-up in 2 weeks.", "Non-smoker.")]
    batch = CausalLMPaddingCollator(tokenizer)(features)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        assert batch["labels"][row, :n].tolist() == feature["input_ids"]  # eos kept as a label
        assert (batch["labels"][row, n:] == -100).all()


@pytest.mark.slow
def test_demo_defaults_under_accelerate_launch(tmp_path):
    """The README's demo through ``accelerate launch`` with the CPU/gloo config, shortened to 4
    steps: σ calibrated for those steps, ε within the target, an ordinary saved checkpoint."""
    out = tmp_path / "demo"
    stdout = run_script(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(EXAMPLES / "accelerate_configs" / "cpu_gloo.yaml"),
            str(EXAMPLES / "finetune_causal_lm.py"),
            "--output_dir",
            str(out),
            "--max_steps",
            "4",
            "--max_eval_samples",
            "50",
            "--logging_steps",
            "1",
            "--disable_tqdm",
            "true",
        ],
        quiet=True,  # a normal run prints no third-party warnings (docs/guide.md, the demo)
    )
    report = _load_json(out / "privacy_report.json")
    summary = _load_json(out / "demo_summary.json")
    assert report["steps"] == 4 and report["tp_size"] == 2 and report["dp_size"] == 1
    assert report["dataset_size"] == 1600 and report["sample_rate"] == pytest.approx(0.04)
    assert 7.0 < report["epsilon"] <= 8.0 and report["delta"] == 1e-5
    assert summary["privacy"]["epsilon"] == report["epsilon"]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert f"saved to {out}" in stdout and "before training: eval loss" in stdout
    # the training loss Trainer prints is labelled as outside the guarantee
    assert "'loss'" in stdout and "it is not covered by the DP guarantee" in stdout
    # one note generated by the trained (still sharded) model, from the prompt, printed once
    note = summary["generated_note"]
    assert note.startswith(script_prompt()) and len(note) > len(script_prompt())
    assert stdout.count("a note written by the trained model") == 1 and note in stdout
    logged = [r for r in _load_json(out / "trainer_state.json")["log_history"] if "loss" in r]
    epsilons = [r["epsilon"] for r in logged]
    assert len(epsilons) == 4 and epsilons == sorted(epsilons)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)  # one process, no distributed config
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert getattr(model.config, "distributed_config", None) is None
    ids = tokenizer("Mr. Ada Carrow, 40, came in today", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.slow
def test_pretrained_model_hub_style_dataset_and_lora_under_torchrun(tmp_path):
    """The user path: ``--model_name_or_path`` (a local checkpoint, loaded shard by shard with
    transformers' DistributedConfig since dp = 1), ``--dataset_name`` (a local dataset
    directory), LoRA; the saved adapter loads with peft in one process and differs from init."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "base"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(DATA / "tiny_llama")
    ).save_pretrained(base)
    AutoTokenizer.from_pretrained(DATA / "tokenizer").save_pretrained(base)
    out = tmp_path / "lora"
    run_script(
        torchrun_command(
            EXAMPLES / "finetune_causal_lm.py",
            "--model_name_or_path",
            str(base),
            "--dataset_name",
            str(DATA / "clinic_notes"),
            "--use_lora",
            "true",
            "--learning_rate",
            "1e-2",
            "--max_steps",
            "3",
            "--max_train_samples",
            "400",
            "--max_eval_samples",
            "20",
            "--per_device_train_batch_size",
            "32",
            "--target_epsilon",
            "4",
            "--output_dir",
            str(out),
            "--disable_tqdm",
            "true",
        )
    )
    report = _load_json(out / "privacy_report.json")
    assert report["steps"] == 3 and report["dataset_size"] == 400
    assert 3.0 < report["epsilon"] <= 4.0

    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 4 * 7  # every attention and MLP projection of the 4 layers
    assert all(p.abs().max() > 0 for p in lora_b)  # trained (peft initialises B to zero)


@pytest.mark.slow
def test_demo_with_fsdp_over_dp_and_ghost_clipping(tmp_path):
    """The README's full fine-tuning line on the tiny default: ``--fsdp full_shard
    --grad_sample_mode ghost --tp_size 2`` on 4 processes (FSDP2 over dp=2 × TP 2): it trains,
    reports its guarantee for dp=2 × tp=2, and saves a model that loads in one process."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "fsdp"
    run_script(
        torchrun_command(
            EXAMPLES / "finetune_causal_lm.py",
            *("--fsdp", "full_shard", "--grad_sample_mode", "ghost", "--tp_size", "2"),
            *("--max_steps", "2", "--max_train_samples", "400", "--max_eval_samples", "20"),
            *("--output_dir", str(out), "--disable_tqdm", "true"),
            nproc=4,
        ),
        quiet=True,  # no FSDP2 view-output or DTensor two-gather warnings, no accountant ones
    )
    report = _load_json(out / "privacy_report.json")
    assert report["steps"] == 2 and report["dataset_size"] == 400
    # the demo's logical batch, not doubled by dp=2: 32 per DP rank
    assert report["expected_batch_size"] == 64 and report["sample_rate"] == 64 / 400
    assert 0 < report["epsilon"] < float("inf")
    assert (report["dp_size"], report["tp_size"], report["dp_shard_size"]) == (2, 2, 2)
    model = AutoModelForCausalLM.from_pretrained(out)  # ordinary, unsharded weights
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_demo_under_accelerate_launch_with_its_fsdp2_config(tmp_path):
    """``accelerate launch`` with the repo's FSDP2 config (its CPU variant: 4 processes, no bf16)
    runs DPTrainer's own FSDP2 over dp=2 × TP 2, with accelerate's FSDP plugin turned off."""
    config = (EXAMPLES / "accelerate_configs" / "fsdp2_tp_gpus.yaml").read_text()
    config = config.replace("num_processes: 8", "num_processes: 4")
    config = config.replace("mixed_precision: bf16", 'mixed_precision: "no"')
    cpu_config = tmp_path / "fsdp2_cpu.yaml"
    cpu_config.write_text(config)
    out = tmp_path / "fsdp_accelerate"
    run_script(
        [
            *(sys.executable, "-m", "accelerate.commands.launch"),
            *("--config_file", str(cpu_config)),
            str(EXAMPLES / "finetune_causal_lm.py"),
            *("--grad_sample_mode", "ghost", "--tp_size", "2"),
            *("--max_steps", "2", "--max_train_samples", "400", "--max_eval_samples", "20"),
            *("--output_dir", str(out), "--disable_tqdm", "true"),
        ]
    )
    report = _load_json(out / "privacy_report.json")
    assert (report["dp_size"], report["tp_size"], report["dp_shard_size"]) == (2, 2, 2)
    assert 0 < report["epsilon"] < float("inf")


@pytest.mark.slow
def test_notebook_executes_top_to_bottom_on_cpu(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("matplotlib")

    path = ROOT / "notebooks" / "dp_tp_finetune_demo.ipynb"
    notebook = nbformat.read(path, as_version=4)
    out = tmp_path / "notebook"
    os.environ.update(
        HF_DP_TP_NOTEBOOK_QUICK="1", HF_DP_TP_NOTEBOOK_OUTPUT_DIR=str(out), MPLBACKEND="Agg"
    )
    try:
        nbclient.NotebookClient(
            notebook,
            timeout=420,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        ).execute()  # raises CellExecutionError if any cell fails
    finally:
        for key in ("HF_DP_TP_NOTEBOOK_QUICK", "HF_DP_TP_NOTEBOOK_OUTPUT_DIR", "MPLBACKEND"):
            os.environ.pop(key, None)
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss / ε plot
    assert _load_json(out / "privacy_report.json")["steps"] == 6
