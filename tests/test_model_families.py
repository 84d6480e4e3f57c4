"""Model families beyond Llama: per-sample rules by class, checked by probes, and one DP-SGD step.

1. Every HF norm family rule (and the scaled-embedding rule) equals autograd's per-sample
   gradient on the transformers classes it is registered for, in the installed transformers.
2. An HF norm class no rule was written for is matched to a family by a numerical probe (never by
   its source text); one that matches no family, and a subclass aliased to a rule that does not
   compute its forward, are refused when the controller attaches.
3. Gemma, Gemma2, Gemma3 (HF plan) and GPT-2 (``hf_dp_tp.gpt2_tp_plan()``, Conv1D): one
   ``DPTrainer`` step at tp=2 with σ=0 and every sample clipped, saved and loaded in one process,
   equals single-process DP-SGD on the same batch (one spawned process group runs all of them).
4. A model that flattens ``[B, T, H]`` to ``[B·T, H]`` (OPT's decoder MLP) is refused with an
   error that says so.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
import time
import warnings

import pytest
import torch
from torch import nn

from hf_dp_tp import GradSampleControllerTP, UnsupportedLayoutError, register_grad_sampler_alias
from hf_dp_tp import grad_samplers as gs
from hf_dp_tp.losses import token_mean_per_sample
from tests import models
from tests.distributed_harness import run_distributed
from tests.test_trainer import N, _args, _dataset, _records


def _class(qualified: str) -> type:
    module, name = qualified.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _instance(cls: type, width: int = 8) -> nn.Module:
    for call in (lambda: cls(width), lambda: cls(hidden_size=width)):
        try:
            return call()
        except TypeError:
            continue
    raise TypeError(f"cannot build {cls.__name__}({width})")


# --------------------------------------------------------------------------- rules by class
WRITTEN_FOR = [
    pytest.param(family.name, name, id=name.rsplit(".", 1)[1])
    for family in gs.NORM_FAMILIES
    for name in family.classes
]


@pytest.mark.parametrize("family, qualified", WRITTEN_FOR)
def test_family_rule_equals_autograd_on_the_classes_it_is_registered_for(family, qualified):
    cls = _class(qualified)
    module = _instance(cls)
    sampler = gs.find_grad_sampler(module)
    assert sampler is gs.rule_written_for(cls)
    assert sampler is next(f for f in gs.NORM_FAMILIES if f.name == family).sampler
    assert gs.verify_rule(module, sampler) is None


def test_families_are_told_apart_by_the_probe():
    """Each family's rule fails on a class of another family where the formulas differ: the
    probe is a real check, not a formality."""
    cohere = _instance(_class(gs.NORM_FAMILIES[3].classes[0]))
    llama = _instance(_class(gs.NORM_FAMILIES[0].classes[0]))
    assert gs.verify_rule(cohere, gs.NORM_FAMILIES[0].sampler) is not None
    assert gs.verify_rule(llama, gs.NORM_FAMILIES[3].sampler) is not None
    assert gs.verify_rule(llama, gs._BY_TYPE[nn.LayerNorm]) is not None


@pytest.mark.parametrize("qualified", gs._SCALED_EMBEDDING_CLASSES, ids=lambda q: q.split(".")[-1])
def test_scaled_word_embedding_rule_equals_autograd(qualified):
    cls = _class(qualified)
    module = cls(16, 8, padding_idx=0, embed_scale=8**0.5)
    assert gs.find_grad_sampler(module) is gs.SCALED_EMBEDDING
    assert gs.verify_rule(module, gs.SCALED_EMBEDDING) is None
    assert gs.verify_rule(module, gs._BY_TYPE[nn.Embedding]) is not None  # the scale matters


# --------------------------------------------------------------------------- rules by probe
def _hf_class(name: str, forward, init=None) -> type:
    """A norm class as a new transformers model would define it (the lookup reads the module)."""

    def __init__(self, hidden_size, eps=1e-6):
        nn.Module.__init__(self)
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    cls = type(name, (nn.Module,), {"__init__": init or __init__, "forward": forward})
    cls.__module__ = "transformers.models.brand_new.modeling_brand_new"
    return cls


def _rewritten_llama_forward(self, x):
    # Llama's function, written differently (no source text in common)
    dtype = x.dtype
    h = x.float()
    scale = (h.square().sum(-1, keepdim=True) / h.shape[-1] + self.variance_epsilon) ** -0.5
    return self.weight * (h * scale).to(dtype)


def _wrong_eps_forward(self, x):
    h = x.float()
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-2)).to(x.dtype)


def _mean_over_batch_forward(self, x):  # mixes samples: the per-sample probe sees it
    h = x.float()
    scale = torch.rsqrt(h.pow(2).mean((0, -1), keepdim=True) + self.variance_epsilon)
    return self.weight * (h * scale).to(x.dtype)


def test_new_hf_norm_class_is_matched_to_a_family_by_probe():
    cls = _hf_class("BrandNewRMSNorm", _rewritten_llama_forward)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), cls(8)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 3, 6, dtype=torch.float64)
    reference = {
        name: torch.stack(
            [torch.autograd.grad(model(x[i : i + 1]).pow(2).sum(), p)[0] for i in range(x.shape[0])]
        )
        for name, p in model.named_parameters()
    }
    controller = GradSampleControllerTP(model, grad_sample_mode="hooks", loss_reduction="sum")
    model(x).pow(2).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample, reference[name], rtol=1e-6, atol=1e-9)
    assert gs.find_grad_sampler(model[1]) is gs.NORM_FAMILIES[0].sampler
    controller.cleanup()


@pytest.mark.parametrize(
    "forward, why",
    [
        (_wrong_eps_forward, r"relative error"),
        (_mean_over_batch_forward, r"mixes samples"),
    ],
    ids=["another_eps", "statistics_across_samples"],
)
def test_hf_norm_class_matching_no_family_is_refused_at_attach(forward, why):
    cls = _hf_class(f"Odd{forward.__name__}Norm", forward)
    model = nn.Sequential(nn.Linear(4, 8), cls(8))
    with pytest.raises(
        UnsupportedLayoutError, match=rf"matches none of the rules.*Tried: llama.*{why}"
    ):
        GradSampleControllerTP(model, grad_sample_mode="hooks")


class _ScaledLinear(nn.Linear):
    """A subclass whose forward is not its parent's: ``2 · (x Wᵀ + b)``."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_alias_to_a_rule_of_another_function_is_refused_at_attach(monkeypatch):
    monkeypatch.setattr(gs, "_BY_TYPE", dict(gs._BY_TYPE))
    monkeypatch.setattr(gs, "_UNVERIFIED_ALIASES", dict(gs._UNVERIFIED_ALIASES))
    register_grad_sampler_alias(_ScaledLinear, nn.Linear)
    with pytest.raises(UnsupportedLayoutError, match=r"aliased to Linear's rule.*probe input"):
        GradSampleControllerTP(nn.Sequential(_ScaledLinear(4, 3)), grad_sample_mode="hooks")


# --------------------------------------------------------------------------- OPT: [B·T, H]
def test_flattened_batch_and_tokens_are_diagnosed_as_such():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=64,
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
        dropout=0.0,
    )
    model = OPTForCausalLM(config).train()
    # OPT's learned positions (an embedding with an offset, called on position ids) have no rule
    model.model.decoder.embed_positions.requires_grad_(False)
    controller = GradSampleControllerTP(model, grad_sample_mode="hooks")
    ids = torch.randint(0, 64, (3, 5))
    with pytest.raises(UnsupportedLayoutError) as info:
        model(input_ids=ids, position_ids=torch.arange(5).expand(3, 5))
    message = str(info.value)
    assert re.search(r"'model\.decoder\.layers\.0\.final_layer_norm'.*size 15.*batch is 3", message)
    assert "15 = 3 x 5" in message and "flattens batch and tokens" in message
    assert "broadcast" not in message  # the old, wrong diagnosis
    controller.cleanup()
    # what the message recommends works: the flattened MLP frozen, the rest trains
    for name in ("final_layer_norm", "fc1", "fc2"):
        getattr(model.model.decoder.layers[0], name).requires_grad_(False)
    controller = GradSampleControllerTP(model, grad_sample_mode="hooks")
    logits = model(input_ids=ids, position_ids=torch.arange(5).expand(3, 5)).logits
    token_mean_per_sample(logits, ids).mean().backward()
    assert model.model.decoder.layers[0].self_attn.q_proj.weight.grad_sample.shape[0] == 3
    controller.cleanup()


# --------------------------------------------------------------------------- one DP-SGD step
def _gemma(arch: str):
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GemmaConfig

    config = {"gemma": GemmaConfig, "gemma2": Gemma2Config, "gemma3": Gemma3TextConfig}[arch]
    extra = {} if arch == "gemma" else {"sliding_window": 4}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config(**models.TINY_LM, **extra))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0
    )
    config.attn_pdrop = config.embd_pdrop = 0.0
    return GPT2LMHeadModel(config)


BUILDERS = {
    "gemma": lambda: _gemma("gemma"),
    "gemma2": lambda: _gemma("gemma2"),
    "gemma3": lambda: _gemma("gemma3"),
    "gpt2": _gpt2,
}


def _plan(case: str):
    from hf_dp_tp import gpt2_tp_plan

    return gpt2_tp_plan() if case == "gpt2" else "auto"


def _step_worker(rank: int, world: int, runs: dict[str, dict]) -> dict[str, str]:
    from transformers import AutoModelForCausalLM

    from hf_dp_tp import DPTrainer

    status = {}
    for case, run in runs.items():
        start = time.monotonic()
        model = AutoModelForCausalLM.from_pretrained(run["model_dir"], dtype=torch.float64)
        args = _args(
            run["out"],
            per_sample_max_grad_norm=run["clip"],
            tp_plan=_plan(run["family"]),
            grad_sample_mode=run["mode"],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = DPTrainer(model=model, args=args, train_dataset=_dataset())
            trainer.train()
        trainer.save_model()
        sharded = sorted(
            n for n, p in trainer.model.named_parameters() if type(p).__name__ == "DTensor"
        )
        status[case] = f"{time.monotonic() - start:.1f}s, {len(sharded)} sharded parameters"
        assert trainer.state.log_history[0]["epsilon"] == math.inf
    return status


def _losses(model, batch):
    ids = batch["input_ids"]
    logits = model(input_ids=ids, position_ids=torch.arange(ids.shape[1]).expand_as(ids)).logits
    return token_mean_per_sample(logits, batch["labels"])


@pytest.fixture(scope="module")
def one_step_runs(tmp_path_factory):
    """Saves each tiny model, computes its single-process DP-SGD step (σ = 0, every sample
    clipped), then runs all the tp=2 DPTrainer steps in one spawned process group."""
    root = tmp_path_factory.mktemp("families")
    runs, expected = {}, {}
    batch = {k: torch.tensor(v) for k, v in _records().items()}
    for case, build in BUILDERS.items():
        model_dir = str(root / case)
        build().save_pretrained(model_dir)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).train()
        grads, norms = models.reference_per_sample_grads(model, _losses, batch)
        clip = 0.5 * norms.min().item()
        update = models.reference_dp_update(grads, norms, clip, N)
        before = models.full_params(model)
        expected[case] = {k: before[k] - update[k] for k in update}
        runs[case] = {
            "model_dir": model_dir,
            "out": str(root / f"{case}-out"),
            "clip": clip,
            "family": case,
            "mode": "tp",
        }
    for case in GHOST_CASES:  # the same models with ghost clipping
        family = case.removesuffix("_ghost")
        runs[case] = {**runs[family], "out": str(root / f"{case}-out"), "mode": "ghost"}
        expected[case] = expected[family]
    start = time.monotonic()
    status = run_distributed(_step_worker, 2, runs)[0]
    print(f"\none spawned group, {len(runs)} DPTrainer steps: {time.monotonic() - start:.1f}s")
    return runs, expected, status


#: GPT-2 (Conv1D under its TP plan, tied wte/lm_head) and Gemma (scaled embeddings, 1 + w norms)
#: again with ghost clipping
GHOST_CASES = ("gpt2_ghost", "gemma_ghost")


@pytest.mark.parametrize("case", [*BUILDERS, *GHOST_CASES])
def test_one_dptrainer_step_at_tp2_equals_single_process_dp_sgd(one_step_runs, case):
    from transformers import AutoModelForCausalLM

    runs, expected, status = one_step_runs
    saved = AutoModelForCausalLM.from_pretrained(runs[case]["out"], dtype=torch.float64)
    params = dict(saved.named_parameters())
    assert set(params) == set(expected[case])
    initial = models.full_params(
        AutoModelForCausalLM.from_pretrained(runs[case]["model_dir"], dtype=torch.float64)
    )
    worst = 0.0
    for name, want in expected[case].items():
        scale = (want - initial[name]).abs().max().clamp_min(1e-12)
        worst = max(worst, ((params[name].detach() - want).abs().max() / scale).item())
    print(
        f"{case} tp=2 ({status[case]}): saved checkpoint vs reference, relative error {worst:.3g}"
    )
    sys.stdout.flush()
    # Gemma-style norms compute in fp32 inside a float64 model: ~1e-7 on their weights
    assert worst < (1e-6 if case.startswith("gemma") else 1e-9)
    assert "0 sharded" not in status[case]
