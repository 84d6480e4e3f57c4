"""Layers and inputs that would make per-sample clipping silently wrong are refused, in one process.

Each test builds the failure a careless model would cause — a record leaking into every other
sample's output (BatchNorm in train mode), a batch that is not dim 0 (clipping per time step), a
subclass whose forward differs from its parent's rule, a weight used outside its module — and
checks that it is refused before an optimizer step; the rules that must stay exact (LayerNorm
without bias) are compared with a per-sample reference. Trainer-level checks: the default δ, a
dataset Poisson sampling cannot draw from, settings that publish data-dependent counts.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_dp_tp import GradSampleControllerTP, UnsupportedLayoutError, register_grad_sampler_alias
from hf_dp_tp import grad_samplers as grad_samplers_module
from hf_dp_tp.privacy_plan import default_delta
from tests.test_trainer import _args, _dataset


def _per_sample_reference(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample gradients of ``model(x_i).pow(2).sum()`` by one backward per sample."""
    grads: dict[str, list[torch.Tensor]] = {n: [] for n, p in model.named_parameters()}
    for i in range(x.shape[0]):
        model.zero_grad()
        model(x[i : i + 1]).pow(2).sum().backward()
        for n, p in model.named_parameters():
            grads[n].append(p.grad.detach().clone())
    model.zero_grad()
    return {n: torch.stack(g) for n, g in grads.items()}


def _controller(model: nn.Module) -> GradSampleControllerTP:
    return GradSampleControllerTP(model, grad_sample_mode="hooks", loss_reduction="sum")


# --------------------------------------------------------------------------- batch statistics
@pytest.mark.parametrize(
    "norm",
    [
        lambda: nn.BatchNorm1d(8),  # trainable affine parameters
        lambda: nn.BatchNorm1d(8, affine=False),  # no parameters: running stats still leak
        lambda: nn.InstanceNorm1d(8, track_running_stats=True),
    ],
)
def test_batch_statistics_in_train_mode_refused_at_attach(norm):
    model = nn.Sequential(nn.Linear(4, 8), norm(), nn.Linear(8, 2))
    with pytest.raises(UnsupportedLayoutError, match=r"statistics across the batch.*GroupNorm"):
        _controller(model)


def test_frozen_batchnorm_switched_to_train_mode_refused_at_forward():
    """Frozen and attached in eval(): harmless; put back in train() (as Trainer does), the next
    forward with hooks active is refused before anything mixes samples."""
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    for p in model[1].parameters():
        p.requires_grad_(False)
    model.eval()
    controller = _controller(model)
    model.train()
    with pytest.raises(UnsupportedLayoutError, match=r"module '1' \(BatchNorm1d\)"):
        model(torch.randn(4, 4))
    with controller.hooks_disabled(), torch.no_grad():
        model.eval()(torch.randn(4, 4))  # evaluation stays possible


# --------------------------------------------------------------------------- batch not dim 0
def test_sequence_first_inputs_refused_by_check_batch_size():
    model = nn.Linear(4, 3)
    controller = _controller(model)
    model(torch.randn(5, 2, 4))  # [T=5, B=2, F]: dim 0 is time, clipped as if it were samples
    with pytest.raises(UnsupportedLayoutError, match=r"batch must be dim 0.*batch_first"):
        controller.check_batch_size(2)
    controller.check_batch_size(5)  # the same forward read batch-first is consistent


class _SequenceFirstLM(nn.Module):
    """A causal LM that transposes to ``[T, B, H]`` inside: hooks see T as the batch."""

    def __init__(self, vocab: int = 64, hidden: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids, labels=None, **kwargs):
        h = self.embed(input_ids.t())  # [T, B, H]
        return {"logits": self.head(h).transpose(0, 1)}  # back to [B, T, V]


def _sequence_first_loss(model, inputs):
    logits = model(inputs["input_ids"])["logits"]
    labels = inputs["labels"]
    losses = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    mask = (labels != -100).float()
    return (losses * mask).sum(1) / mask.sum(1).clamp_min(1), None


def test_dptrainer_refuses_a_sequence_first_model_before_any_step(tmp_path):
    from datasets import Dataset

    from hf_dp_tp import DPTrainer

    torch.manual_seed(0)
    ids = torch.randint(0, 64, (8, 5)).tolist()  # 8 records of 5 tokens: T != B
    model = _SequenceFirstLM()
    before = [p.detach().clone() for p in model.parameters()]
    args = _args(str(tmp_path), tp_size=1, grad_sample_mode="hooks", noise_multiplier=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
            per_sample_loss=_sequence_first_loss,
        )
        with pytest.raises(UnsupportedLayoutError, match=r"'embed'.*size 5.*batch is \d.*\[B, T"):
            trainer.train()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


# --------------------------------------------------------------------------- subclasses
class _ScaledLinear(nn.Linear):
    """A subclass whose forward is not its parent's: ``2 · (x Wᵀ + b)``."""

    def forward(self, x):
        return 2 * super().forward(x)


class _RenamedLinear(nn.Linear):
    """A subclass with its parent's forward."""


@pytest.fixture
def restore_registry():
    saved = dict(grad_samplers_module._BY_TYPE)
    aliases = dict(grad_samplers_module._UNVERIFIED_ALIASES)
    yield
    grad_samplers_module._BY_TYPE.clear()
    grad_samplers_module._BY_TYPE.update(saved)
    grad_samplers_module._UNVERIFIED_ALIASES.clear()
    grad_samplers_module._UNVERIFIED_ALIASES.update(aliases)


def test_subclass_of_a_registered_layer_is_refused(restore_registry):
    model = nn.Sequential(_ScaledLinear(4, 3))
    with pytest.raises(UnsupportedLayoutError, match=r"_ScaledLinear.*subclass"):
        _controller(model)


def test_aliased_subclass_with_another_forward_is_refused_at_attach(restore_registry):
    """The alias is checked on a probe input against autograd before any training."""
    register_grad_sampler_alias(_ScaledLinear, nn.Linear)
    model = nn.Sequential(_ScaledLinear(4, 3))
    with pytest.raises(UnsupportedLayoutError, match=r"aliased to Linear's rule.*differ"):
        _controller(model)


def test_aliased_subclass_of_a_rule_without_probe_is_caught_by_the_self_check(restore_registry):
    """A user rule registered without probe_input: the first-step self-check still catches an
    alias whose forward computes something else."""
    grad_samplers_module._BY_TYPE[_Linearish] = grad_samplers_module.GradSampler(
        grad_samplers_module._BY_TYPE[nn.Linear].compute,
        grad_samplers_module._BY_TYPE[nn.Linear].check,
    )
    register_grad_sampler_alias(_ScaledLinearish, _Linearish)
    model = nn.Sequential(_ScaledLinearish(4, 3))
    _controller(model)
    with pytest.raises(RuntimeError, match=r"differs from the sum of its per-sample gradients"):
        model(torch.randn(6, 4)).pow(2).sum().backward()


class _Linearish(nn.Linear):
    """A class with a user rule (no probe input)."""


class _ScaledLinearish(_Linearish):
    def forward(self, x):
        return 2 * super().forward(x)


def test_aliased_subclass_with_the_same_forward_is_exact(restore_registry):
    register_grad_sampler_alias(_RenamedLinear, nn.Linear)
    torch.manual_seed(0)
    model = nn.Sequential(_RenamedLinear(4, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    reference = _per_sample_reference(model, x)
    _controller(model)
    model(x).pow(2).sum().backward()  # the self-check passes
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample, reference[name], rtol=1e-10, atol=1e-12)


def test_alias_needs_a_registered_base_and_a_real_subclass(restore_registry):
    with pytest.raises(ValueError, match="not a subclass"):
        register_grad_sampler_alias(nn.Conv1d, nn.Linear)
    with pytest.raises(ValueError, match="no registered grad sampler"):
        register_grad_sampler_alias(_RenamedLinear, nn.Bilinear)


# --------------------------------------------------------------------------- weights reused
class _TiedByFunctional(nn.Module):
    """An output layer reusing the embedding matrix through ``F.linear``: autograd's gradient of
    ``embed.weight`` has a part no hook sees."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.mix = nn.Linear(8, 8)

    def forward(self, ids):
        return F.linear(self.mix(self.embed(ids)), self.embed.weight)


def test_weight_reused_outside_its_module_is_caught_by_the_self_check():
    model = _TiedByFunctional()
    _controller(model)
    with pytest.raises(RuntimeError, match=r"parameter embed\.weight.*outside its module"):
        model(torch.randint(0, 16, (4, 5))).pow(2).sum().backward()


# --------------------------------------------------------------------------- exact rules
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_per_sample_gradients_equal_the_reference(bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6, bias=bias)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    reference = _per_sample_reference(model, x)
    _controller(model)
    model(x).pow(2).sum().backward()
    assert {n for n, _ in model.named_parameters()} == set(reference)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample, reference[name], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- trainer settings
def test_default_delta_is_well_below_one_over_n():
    assert default_delta(64) == 1e-5
    assert default_delta(10**6) == pytest.approx(1e-7)
    assert all(default_delta(n) * n <= 0.1 for n in (1, 10, 10**4, 10**5, 10**7))


def _single_process_trainer(tmp_path, dataset, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_dp_tp import DPTrainer

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    args = _args(str(tmp_path), tp_size=1, grad_sample_mode="hooks", **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPTrainer(model=GPT2LMHeadModel(config), args=args, train_dataset=dataset)


def test_trainer_default_delta_and_report_of_what_is_not_covered(tmp_path):
    trainer = _single_process_trainer(tmp_path, _dataset(64), noise_multiplier=1.0)
    assert trainer.target_delta == 1e-5
    report = trainer.privacy_report()
    assert report["delta"] == 1e-5
    assert any("evaluation" in item for item in report["not_covered"])


def test_datasets_poisson_sampling_cannot_draw_from_are_refused_at_construction(tmp_path):
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            yield from _dataset(8)

    with pytest.raises(ValueError, match="empty"):
        _single_process_trainer(tmp_path, _dataset(0))
    with pytest.raises(ValueError, match="map-style train dataset"):
        _single_process_trainer(tmp_path, Stream())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"include_num_input_tokens_seen": "all"}, "include_num_input_tokens_seen"),
        ({"dp_seed": 3, "dp_secrets_file": "/tmp/x.json"}, "at most one of dp_seed"),
    ],
)
def test_settings_that_reveal_data_or_conflict_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _args(str(tmp_path), tp_size=1, grad_sample_mode="hooks", **overrides)


def test_self_check_accepts_bf16_rounding_of_autograd_gradients():
    """bf16 parameters: autograd's gradient is rounded to bf16 while per-sample gradients of the
    norms are kept in fp32; the self-check must not mistake that rounding for a wrong rule."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.LayerNorm(256), nn.Linear(256, 8))
    model.to(torch.bfloat16)
    _controller(model)
    x = torch.randn(32, 16, 64, dtype=torch.bfloat16)
    model(x).float().pow(2).sum().backward()
    assert all(p.grad_sample is not None for p in model.parameters())
