"""The two axes of a run are decided once (hf_dp_tp.layout): the public grad_sample_mode maps to a
clipping method and a layout ("ghost" infers the layout from the model); per-sample norms are
reduced from per-layer squared norms (contract rule 3, docs/usage.md, in hf_dp_tp.norms); the
optimizer's step is a sequence of named stages that a subclass can replace one at a time."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hf_dp_tp import (
    DPOptimizerTP,
    GradSampleControllerTP,
    MeshInfo,
    PrivacyEngineGradSampleController,
)
from hf_dp_tp.layout import (
    CLIPPING_METHODS,
    GHOST,
    GRAD_SAMPLE_MODES,
    PER_SAMPLE,
    PLAIN,
    TP,
    ModelLayout,
    clipping_method,
    declared_layout,
    infer_layout,
    model_layout,
)
from hf_dp_tp.norms import per_sample_norms, reduce_squared_norms, squared_norm_per_sample
from hf_dp_tp.parallel import ParamLayout


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_modes_map_to_a_method_and_a_layout():
    assert GRAD_SAMPLE_MODES == ("tp", "hooks", "ghost")
    assert CLIPPING_METHODS == (PER_SAMPLE, GHOST)
    assert clipping_method("tp") == clipping_method("hooks") == PER_SAMPLE
    assert clipping_method("ghost") == GHOST
    assert (declared_layout("tp"), declared_layout("hooks")) == (TP, PLAIN)
    assert declared_layout("ghost") is None  # inferred from the model
    assert model_layout(_mlp(), "hooks") == ModelLayout(layout=PLAIN, method=PER_SAMPLE)
    assert model_layout(_mlp(), "ghost") == ModelLayout(layout=PLAIN, method=GHOST)
    assert model_layout(_mlp(), "tp").tp and not model_layout(_mlp(), "hooks").tp
    assert infer_layout(_mlp()) == PLAIN


def test_unknown_modes_are_refused_by_every_entry_point():
    from hf_dp_tp import DPTrainingArguments

    match = r"unknown grad_sample_mode 'functorch'.*'tp', 'hooks', 'ghost'"
    with pytest.raises(ValueError, match=match):
        GradSampleControllerTP(_mlp(), grad_sample_mode="functorch")
    with pytest.raises(ValueError, match=match):
        model_layout(_mlp(), "functorch")
    model = _mlp()
    data = TensorDataset(torch.randn(16, 4), torch.randn(16, 2))
    with pytest.raises(ValueError, match=match):
        PrivacyEngineGradSampleController(accountant="rdp").make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode="functorch",
        )
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match=match):
        DPTrainingArguments(
            output_dir="/tmp/unused",
            report_to=[],
            noise_multiplier=1.0,
            grad_sample_mode="functorch",
        )


def test_norms_from_squared_norms_equal_norms_from_grad_samples():
    torch.manual_seed(0)
    grads = [torch.randn(5, 3, 4), torch.randn(5, 7), torch.randn(5, 2, 2, 2)]
    layouts = [
        ParamLayout((6, 4), (3, 4), shard_dim=0, offset=0, length=3),
        ParamLayout((7,), (7,)),
        ParamLayout((2, 2, 2), (2, 2, 2)),
    ]
    from_grads = per_sample_norms(list(zip(grads, layouts, strict=True)), MeshInfo())
    squared = [
        (squared_norm_per_sample(g), lay.sharded) for g, lay in zip(grads, layouts, strict=True)
    ]
    assert torch.equal(reduce_squared_norms(squared, MeshInfo()), from_grads)
    expected = torch.cat([g.flatten(1) for g in grads], 1).norm(dim=1)
    torch.testing.assert_close(from_grads, expected)
    assert reduce_squared_norms([], MeshInfo()) is None
    bf16 = [(squared_norm_per_sample(g.bfloat16()), True) for g in grads]
    assert reduce_squared_norms(bf16, MeshInfo()).dtype == torch.float32
    with pytest.raises(RuntimeError, match="different batch sizes"):
        reduce_squared_norms([(torch.ones(2), True), (torch.ones(3), False)], MeshInfo())


class _RecordingOptimizer(DPOptimizerTP):
    calls: list[str]

    def take_clipped_sums(self, params):
        self.calls.append("take_clipped_sums")
        return super().take_clipped_sums(params)

    def add_noise(self, sums, layouts):
        self.calls.append("add_noise")
        super().add_noise(sums, layouts)

    def reduce(self, sums, layouts):
        self.calls.append("reduce")
        super().reduce(sums, layouts)

    def scale(self, sums):
        self.calls.append("scale")
        super().scale(sums)

    def write_grads(self, params, grads):
        self.calls.append("write_grads")
        super().write_grads(params, grads)


def _step(optimizer_class, model: nn.Module, sigma: float) -> DPOptimizerTP:
    controller = GradSampleControllerTP(model, grad_sample_mode="hooks", loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = optimizer_class(
            torch.optim.SGD(model.parameters(), lr=0.1),
            noise_multiplier=sigma,
            max_grad_norm=0.1,
            expected_batch_size=4,
            mesh=MeshInfo(),
            loss_reduction="sum",
            noise_seed=7,
        )
    optimizer.calls = []
    torch.manual_seed(1)
    x, y = torch.randn(4, 4), torch.randn(4, 2)
    ((model(x) - y) ** 2).sum(1).sum().backward()
    optimizer.step()
    controller.cleanup()
    return optimizer


def test_the_step_runs_its_named_stages_in_order():
    base = _mlp()
    plain = _step(DPOptimizerTP, copy.deepcopy(base), sigma=0.5)
    staged = _step(_RecordingOptimizer, copy.deepcopy(base), sigma=0.5)
    assert staged.calls == ["take_clipped_sums", "add_noise", "reduce", "scale", "write_grads"]
    for p, q in zip(plain.params(), staged.params(), strict=True):
        assert torch.equal(p, q)


def test_one_stage_can_be_replaced():
    """A subclass that replaces only the noise stage (σ = 0 through the stage) gives the noiseless
    update of an optimizer built with σ = 0: the other stages are untouched."""

    class NoNoise(DPOptimizerTP):
        def add_noise(self, sums, layouts):
            pass

    base = _mlp()
    silent = _step(NoNoise, copy.deepcopy(base), sigma=0.5)
    zero = _step(DPOptimizerTP, copy.deepcopy(base), sigma=0.0)
    noisy = _step(DPOptimizerTP, copy.deepcopy(base), sigma=0.5)
    for p, q, r in zip(silent.params(), zero.params(), noisy.params(), strict=True):
        assert torch.equal(p, q)
        assert not torch.equal(p, r)  # the replaced stage did matter
