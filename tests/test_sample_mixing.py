"""Samples that mix without BatchNorm are refused (docs/usage.md, "Samples must not mix").

Five constructions let one record move the clipped sum by more than 2C (measured below with the
check turned off, C = 1, σ = 0): a parameter-free batch-centering module, ``F.batch_norm`` inside
a module, a ``LayerNorm`` subclass aliased to LayerNorm's rule that mixes only for batches above
two samples, an in-batch contrastive per-sample loss, and a sequence-first ``[T, B, F]`` input
with ``T = B``. With the check on, each is refused before any step, naming the module or the
loss; models that do not mix are accepted, and the check leaves no trace (RNG, buffers,
gradients: one step with and without it gives the same model).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from hf_dp_tp import GradSampleControllerTP, UnsupportedLayoutError, register_grad_sampler_alias
from hf_dp_tp import grad_samplers as grad_samplers_module
from hf_dp_tp.separability import SampleMixingError, synthetic_probe
from tests import mixing_attacks as attacks
from tests import models
from tests.test_trainer import _args

MODULE_ATTACKS = ["centering", "functional_bn", "layernorm_subclass"]


@pytest.fixture
def mixing_alias():
    """``MixingLayerNorm`` aliased to ``nn.LayerNorm``'s rule, as a user would opt in."""
    saved = dict(grad_samplers_module._BY_TYPE)
    aliases = dict(grad_samplers_module._UNVERIFIED_ALIASES)
    register_grad_sampler_alias(attacks.MixingLayerNorm, nn.LayerNorm)
    yield
    grad_samplers_module._BY_TYPE.clear()
    grad_samplers_module._BY_TYPE.update(saved)
    grad_samplers_module._UNVERIFIED_ALIASES.clear()
    grad_samplers_module._UNVERIFIED_ALIASES.update(aliases)


def _controller(model: nn.Module, **kwargs) -> GradSampleControllerTP:
    return GradSampleControllerTP(model, grad_sample_mode="hooks", **kwargs)


# --------------------------------------------------------------------------- the attacks are real
@pytest.mark.parametrize(
    ("case", "model_fn", "losses_fn", "sequence_first"),
    [
        *[
            (k, lambda k=k: attacks.mixing_model(k), attacks.squared_output_losses, False)
            for k in MODULE_ATTACKS
        ],
        ("contrastive", attacks.Encoder, attacks.contrastive_losses, False),
        ("sequence_first", attacks.SequenceFirstNet, attacks.sequence_first_losses, True),
    ],
)
def test_without_the_check_one_record_moves_the_clipped_sum_beyond_2C(
    case, model_fn, losses_fn, sequence_first, mixing_alias
):
    """The sensitivity each attack reaches when nothing refuses it (the alias verified as a
    two-sample probe did): above 2C, while a model that does not mix stays within it."""
    grad_samplers_module._UNVERIFIED_ALIASES.pop(attacks.MixingLayerNorm, None)
    off = {"check_sample_independence": False}
    value = attacks.sensitivity(model_fn, losses_fn, sequence_first=sequence_first, **off)
    assert value > 2.0, (case, value)
    control = attacks.sensitivity(
        lambda: attacks.MixingNet(nn.Identity()), attacks.squared_output_losses, **off
    )
    assert control <= 2.0 + 1e-5


# --------------------------------------------------------------------------- engine level
@pytest.mark.parametrize(
    ("kind", "cls"), [("centering", "BatchCentering"), ("functional_bn", "FunctionalBatchNorm")]
)
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_mixing_module_refused_at_the_first_forward_naming_it(kind, cls, batch):
    model = attacks.mixing_model(kind)
    before = [p.detach().clone() for p in model.parameters()]
    _controller(model)
    x = attacks.batch(batch)["x"]
    rng = torch.get_rng_state()
    with pytest.raises(SampleMixingError, match=rf"module 'mixer' \({cls}\) mixes samples"):
        model(x)
    assert torch.equal(torch.get_rng_state(), rng)  # the probe left the RNG where it was
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_aliased_layernorm_subclass_mixing_above_two_samples_fails_the_probe(mixing_alias):
    """The rule probe now has four samples of different scales: the subclass is refused at
    attach; and were the alias trusted, the first forward refuses it."""
    with pytest.raises(UnsupportedLayoutError, match=r"aliased to LayerNorm.*mixes samples"):
        _controller(attacks.mixing_model("layernorm_subclass"))
    grad_samplers_module._UNVERIFIED_ALIASES.pop(attacks.MixingLayerNorm, None)
    model = attacks.mixing_model("layernorm_subclass")
    _controller(model)
    with pytest.raises(SampleMixingError, match=r"module 'mixer' \(MixingLayerNorm\)"):
        model(attacks.batch(8)["x"])


def test_sequence_first_input_with_t_equal_b_refused_through_make_private():
    from torch.utils.data import DataLoader, TensorDataset

    from hf_dp_tp import PrivacyEngineGradSampleController

    model = attacks.SequenceFirstNet()
    engine = PrivacyEngineGradSampleController(accountant="rdp")
    loader = DataLoader(TensorDataset(torch.randn(64, attacks.FEATURES)), batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode="hooks",
        )
    data = attacks.batch(8, sequence_first=True)  # [T=8, B=8, F]: check_batch_size(8) passes
    with pytest.raises(SampleMixingError, match=r"mixes samples.*sequence-first"):
        attacks.sequence_first_losses(model, data)


def test_models_that_do_not_mix_pass_and_the_check_runs_once():
    """Per-sample models (here the tiny Llama, batch 1 and 2 tiled to 4 rows) pass; the check
    runs at the first train-mode forward with gradients only."""
    model = models.tiny_causal_lm()
    controller = _controller(model)
    ids = models.lm_batch(2, 64, 6)["input_ids"]
    with torch.no_grad():
        model(input_ids=ids)  # no gradients: not checked yet
    assert controller._independence_pending
    models.llama_losses(model, {"input_ids": ids[:1]}).mean().backward()
    assert not controller._independence_pending
    controller.cleanup()


# --------------------------------------------------------------------------- DPTrainer
def _float_records(n: int = 16, seed: int = 0) -> dict[str, list]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, attacks.FEATURES, generator=g).tolist(),
        "y": torch.randn(n, attacks.FEATURES, generator=g).tolist(),
    }


def _output_loss(model, inputs):
    return model(inputs["x"]).pow(2).sum(1), None


def _trainer(tmp_path, model, per_sample_loss, **overrides):
    from datasets import Dataset

    from hf_dp_tp import DPTrainer

    args = _args(
        str(tmp_path),
        tp_size=1,
        grad_sample_mode="hooks",
        remove_unused_columns=False,
        per_device_train_batch_size=8,
        **overrides,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict(_float_records()),
            per_sample_loss=per_sample_loss,
        )


def _train(trainer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()


def test_dptrainer_refuses_an_in_batch_contrastive_loss_naming_it(tmp_path):
    model = attacks.Encoder()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _trainer(tmp_path, model, attacks.contrastive_per_sample_loss)
    with pytest.raises(SampleMixingError, match=r"per-sample loss contrastive_per_sample_loss"):
        _train(trainer)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("kind", MODULE_ATTACKS)
def test_dptrainer_refuses_a_mixing_module_naming_it(tmp_path, kind, mixing_alias):
    grad_samplers_module._UNVERIFIED_ALIASES.pop(attacks.MixingLayerNorm, None)
    model = attacks.mixing_model(kind)
    trainer = _trainer(tmp_path, model, _output_loss)
    with pytest.raises(SampleMixingError, match=r"module 'mixer' \(\w+\) mixes samples"):
        _train(trainer)


def test_dptrainer_opt_out_warns_and_trains(tmp_path):
    from hf_dp_tp import DPTrainingArguments

    with pytest.warns(UserWarning, match="check_sample_independence=False"):
        DPTrainingArguments(
            output_dir=str(tmp_path),
            grad_sample_mode="hooks",
            noise_multiplier=1.0,
            check_sample_independence=False,
        )
    trainer = _trainer(
        tmp_path, attacks.mixing_model("centering"), _output_loss, check_sample_independence=False
    )
    _train(trainer)
    assert trainer.state.global_step == 1


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dptrainer_check_accepts_a_dropout_model_and_leaves_no_trace(tmp_path, mode):
    """GPT-2 with dropout 0.1 passes (both probe runs draw the same masks), and a step with the
    check equals a step without it: the RNG, buffers and gradients are left as they were."""
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_dp_tp import DPTrainer
    from tests.test_trainer import _records

    results = []
    for check in (True, False):
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
        model = GPT2LMHeadModel(config)
        args = _args(
            str(tmp_path / str(check)),
            tp_size=1,
            grad_sample_mode=mode,
            check_sample_independence=check,
            seed=1,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = DPTrainer(
                model=model, args=args, train_dataset=Dataset.from_dict(_records(8))
            )
        _train(trainer)
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, value in results[0].items():
        assert torch.equal(value, results[1][name]), name


def test_synthetic_probe_keeps_structure_and_valid_ids():
    example = {
        "input_ids": torch.tensor([[5, 6, 7]]),
        "attention_mask": torch.tensor([[1, 1, 0]]),
        "labels": torch.tensor([[5, 6, -100]]),
        "pixel_values": torch.randn(1, 2, 2),
    }
    probe, neighbour = synthetic_probe(example, vocab_size=10, causal_lm=True)
    assert {k: v.shape[0] for k, v in probe.items()} == dict.fromkeys(example, 4)
    assert int(probe["input_ids"].max()) < 10 and torch.equal(probe["labels"], probe["input_ids"])
    assert bool((probe["attention_mask"] == 1).all())
    for key in example:
        assert torch.equal(probe[key][1:], neighbour[key][1:])
    assert not torch.equal(probe["input_ids"][0], neighbour["input_ids"][0])
    scales = probe["pixel_values"].flatten(1).abs().mean(1)
    assert scales.max() / scales.min() > 100  # very different row scales
