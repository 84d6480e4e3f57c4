"""Bad inputs fail early, with a message that says what to change: a layout the code cannot handle
raises a clear error naming the module and placement; it never trains silently with a wrong norm.

Single-process checks run directly. Every check that needs ``torch.distributed`` (a TP mesh,
DTensor parameters) runs inside ONE 2-rank worker, spawned once per module by a fixture; each
check there is a ``pytest.raises`` whose message (or failure) is returned by name, and the
parametrized ``test_distributed`` asserts on it.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    SequentialSampler,
    TensorDataset,
)

from hf_dp_tp import (
    DPOptimizerTP,
    GradSampleControllerTP,
    MeshInfo,
    PrivacyEngineGradSampleController,
    UnsupportedLayoutError,
    build_poisson_data_loader,
    calibrate_noise_multiplier,
    make_accountant,
)
from hf_dp_tp.accounting import epsilon_spent
from hf_dp_tp.parallel import check_tp_divisibility
from tests.distributed_harness import run_distributed


# --------------------------------------------------------------------------- helpers
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _optimizer(model: nn.Module, **overrides) -> DPOptimizerTP:
    kwargs = dict(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=4,
        mesh=MeshInfo(),
        noise_seed=0,
    )
    kwargs.update(overrides)
    return DPOptimizerTP(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def _quiet_optimizer(model: nn.Module, **overrides) -> DPOptimizerTP:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _optimizer(model, **overrides)


def _has_forward_hooks(model: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class Scale(nn.Module):
    """A custom layer with a bare nn.Parameter: no grad sampler knows it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.block = nn.Module()
        self.block.conv = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block.conv(self.fc(x)[:, :, None, None])[:, :, 0, 0]
        return self.head(h)


class ScaleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.block = nn.Module()
        self.block.scale = Scale(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block.scale(self.fc(x)))


class PositionNet(nn.Module):
    """GPT-2-like: position ids built with batch dim 1 and broadcast over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(16, 8)
        self.wpe = nn.Embedding(6, 8)
        self.head = nn.Linear(8, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1]).unsqueeze(0)  # [1, T], not [B, T]
        return self.head(self.wte(ids) + self.wpe(positions))


GPT2_TINY = dict(
    n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0
)


def _dataset(n: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g))


# --------------------------------------------------------------------------- controller
def test_controller_unknown_grad_sample_mode():
    with pytest.raises(ValueError, match=r"grad_sample_mode 'functorch'.*'tp', 'hooks'"):
        GradSampleControllerTP(_mlp(), grad_sample_mode="functorch")


def test_controller_bad_loss_reduction():
    with pytest.raises(ValueError, match=r"loss_reduction must be one of \('mean', 'sum'\)"):
        GradSampleControllerTP(_mlp(), grad_sample_mode="hooks", loss_reduction="avg")


def test_tp_mode_on_plain_model_without_mesh():
    with pytest.raises(ValueError, match=r"grad_sample_mode='tp' needs .*DTensor.*device_mesh"):
        GradSampleControllerTP(_mlp(), grad_sample_mode="tp")


@pytest.mark.parametrize(
    "net, path, cls, params",
    [
        (ConvNet, "block.conv", "Conv2d", "['bias', 'weight']"),
        (ScaleNet, "block.scale", "Scale", "['gain']"),
    ],
)
def test_layer_without_grad_sampler(net, path, cls, params):
    model = net()
    expected = rf"module '{path}' \({cls}\) has trainable parameters {re.escape(params)}"
    with pytest.raises(UnsupportedLayoutError, match=expected) as info:
        GradSampleControllerTP(model, grad_sample_mode="hooks")
    assert "requires_grad=False" in str(info.value)
    assert "register_grad_sampler" in str(info.value)

    # frozen, it attaches (fresh model: see test_failed_attach_leaves_no_hooks for why)
    model = net()
    model.get_submodule(path).requires_grad_(False)
    controller = GradSampleControllerTP(model, grad_sample_mode="hooks")
    model(torch.randn(3, 4)).pow(2).sum().backward()
    assert model.fc.weight.grad_sample.shape == (3, 4, 4)
    assert model.head.weight.grad_sample.shape == (3, 2, 4)
    controller.cleanup()


def test_root_module_parameter_without_sampler_names_root():
    with pytest.raises(UnsupportedLayoutError, match=r"module '<root>' \(Scale\).*\['gain'\]"):
        GradSampleControllerTP(Scale(4), grad_sample_mode="hooks")


def test_failed_attach_leaves_no_hooks():
    model = ConvNet()
    with pytest.raises(UnsupportedLayoutError):
        GradSampleControllerTP(model, grad_sample_mode="hooks")
    leftover = _has_forward_hooks(model)
    model.block.conv.requires_grad_(False)
    controller = GradSampleControllerTP(model, grad_sample_mode="hooks")
    model(torch.randn(3, 4)).pow(2).sum().backward()
    assert model.fc.weight.grad_sample.shape == (3, 4, 4)
    controller.cleanup()
    assert not leftover


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparse=True), r"sparse=True"),
        (dict(scale_grad_by_freq=True), r"scale_grad_by_freq=True"),
        (dict(max_norm=1.0), r"max_norm"),
    ],
)
def test_embedding_options_refused(kwargs, match):
    model = nn.Sequential()
    model.emb = nn.Embedding(10, 4, **kwargs)
    with pytest.raises(UnsupportedLayoutError, match=rf"module 'emb' \(Embedding\).*{match}"):
        GradSampleControllerTP(model, grad_sample_mode="hooks")


def test_output_broadcast_over_batch_refused_at_forward():
    model = PositionNet()
    controller = GradSampleControllerTP(model, grad_sample_mode="hooks")
    ids = torch.randint(0, 16, (3, 6))
    with pytest.raises(UnsupportedLayoutError, match=r"module 'wpe'.*size 1.*is 3.*broadcast"):
        model(ids)
    controller.cleanup()
    # frozen, the broadcast module is fine
    model.wpe.requires_grad_(False)
    controller = GradSampleControllerTP(model, grad_sample_mode="hooks")
    model(ids).sum().backward()
    assert model.wte.weight.grad_sample.shape == (3, 16, 8)
    controller.cleanup()


def test_gpt2_default_position_ids_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2_TINY)).train()
    controller = GradSampleControllerTP(model, grad_sample_mode="hooks")
    ids = torch.randint(0, 32, (3, 5))
    with pytest.raises(
        UnsupportedLayoutError, match=r"'transformer\.wpe'.*broadcast.*\[B, \.\.\.\]"
    ):
        model(input_ids=ids, labels=ids)
    controller.cleanup()


# --------------------------------------------------------------------------- DP optimizer
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(noise_multiplier=-0.5), r"noise_multiplier must be a finite number >= 0, got -0\.5"),
        (dict(max_grad_norm=0.0), r"max_grad_norm must be a finite number > 0, got 0\.0"),
        (dict(max_grad_norm=-1.0), r"max_grad_norm must be a finite number > 0"),
        (dict(max_grad_norm=float("nan")), r"max_grad_norm must be a finite number > 0, got nan"),
        (dict(expected_batch_size=0), r"expected_batch_size must be > 0, got 0"),
        (dict(expected_batch_size=-3), r"expected_batch_size must be > 0"),
        (dict(loss_reduction="avg"), r"loss_reduction must be one of \('mean', 'sum'\)"),
        (dict(secure_mode=True, noise_seed=3), r"noise_seed cannot be set in secure_mode"),
    ],
)
def test_optimizer_bad_arguments(overrides, match):
    with pytest.raises(ValueError, match=match):
        _quiet_optimizer(_mlp(), **overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(noise_multiplier=float("nan")),
        dict(noise_multiplier=float("inf")),
        dict(max_grad_norm=float("inf")),
    ],
)
def test_optimizer_non_finite_arguments(overrides):
    with pytest.raises(ValueError):
        _quiet_optimizer(_mlp(), **overrides)


def test_zero_noise_warns_not_private():
    with pytest.warns(UserWarning, match=r"NOT differentially private \(epsilon is infinite\)"):
        _optimizer(_mlp(), noise_multiplier=0.0)


def _attach_with_optimizer(model: nn.Module) -> DPOptimizerTP:
    GradSampleControllerTP(model, grad_sample_mode="hooks")
    return _quiet_optimizer(model)


def test_backward_in_eval_mode_refused():
    model = _mlp().eval()  # hooks skip eval mode: a gradient without a per-sample gradient
    _attach_with_optimizer(model)
    with pytest.raises(RuntimeError, match=r"without a per-sample gradient.*train\(\) mode"):
        model(torch.randn(4, 4)).pow(2).sum().backward()


def test_backward_with_one_module_in_eval_mode_refused():
    model = _mlp()
    model[0].eval()
    _attach_with_optimizer(model)
    with pytest.raises(RuntimeError, match=r"parameter 0\.(weight|bias) received a gradient"):
        model(torch.randn(4, 4)).pow(2).sum().backward()


def test_step_without_per_sample_gradients_refused():
    """Second line of defence: grads that did not come through a hooked backward at all."""
    model = _mlp()
    optimizer = _attach_with_optimizer(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"no per-sample gradients.*train\(\) mode.*Refusing"):
        optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_direct_submodule_call_is_not_a_broadcast():
    model = _mlp()
    controller = GradSampleControllerTP(model, grad_sample_mode="hooks")
    model(torch.randn(4, 4)).sum().backward()
    controller.zero_grad_sample()
    model[2](torch.randn(3, 8)).sum().backward()
    assert model[2].weight.grad_sample.shape == (3, 2, 8)


# --------------------------------------------------------------------------- accounting
def test_unknown_accountant():
    with pytest.raises(ValueError, match=r"unknown accountant 'foo'; choose one of .*'prv'"):
        make_accountant("foo")
    with pytest.raises(ValueError, match=r"unknown accountant 'foo'"):
        PrivacyEngineGradSampleController(accountant="foo")


def test_calibrate_unreachable_target(monkeypatch):
    # opacus doubles σ up to MAX_SIGMA=1e6 before giving up (~17 accountant evaluations, 30-70 s);
    # a lower cap exercises the same path in ~1 s.
    import opacus.accountants.utils as opacus_utils

    monkeypatch.setattr(opacus_utils, "MAX_SIGMA", 50)
    with pytest.raises(ValueError, match=r"target_epsilon=1e-06 .* unreachable .*Raise"):
        calibrate_noise_multiplier(
            target_epsilon=1e-6,
            target_delta=1e-5,
            sample_rate=0.5,
            steps=10000,
            accountant="rdp",
        )


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(target_epsilon=0.0), r"target_epsilon must be a positive finite number"),
        (dict(target_epsilon=float("inf")), r"target_epsilon must be a positive finite number"),
        (dict(target_delta=0.0), r"target_delta must be in \(0, 1\)"),
        (dict(target_delta=1.0), r"target_delta must be in \(0, 1\)"),
        (dict(sample_rate=0.0), r"sample_rate must be in \(0, 1\]"),
        (dict(sample_rate=1.5), r"sample_rate must be in \(0, 1\]"),
        (dict(steps=0), r"number of steps must be >= 1"),
    ],
)
def test_calibrate_bad_arguments(overrides, match):
    kwargs = dict(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.1, steps=10)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=match):
        calibrate_noise_multiplier(**kwargs)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5])
def test_epsilon_bad_delta(delta):
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        epsilon_spent(make_accountant("rdp"), delta)


# --------------------------------------------------------------------------- engine
def _make_private(data_loader: DataLoader, model: nn.Module | None = None, **overrides):
    model = model or _mlp()
    kwargs = dict(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=data_loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode="hooks",
    )
    kwargs.update(overrides)
    return PrivacyEngineGradSampleController(accountant="rdp").make_private(**kwargs)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(grad_sample_mode="functorch"), r"unknown grad_sample_mode 'functorch'.*'hooks'"),
        (dict(num_micro_batches=0), r"num_micro_batches must be a positive int, got 0"),
        (dict(loss_reduction="avg"), r"loss_reduction must be one of"),
        (dict(max_grad_norm=0.0), r"max_grad_norm must be a finite number > 0"),
    ],
)
def test_make_private_bad_arguments(overrides, match):
    with pytest.raises(ValueError, match=match):
        _make_private(DataLoader(_dataset(), batch_size=4), **overrides)


def test_make_private_secure_mode_with_seed():
    model = _mlp()
    with pytest.raises(ValueError, match=r"secure_mode .*do not pass seeds"):
        PrivacyEngineGradSampleController(secure_mode=True).make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_dataset(), batch_size=4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode="hooks",
            sampling_seed=1,
        )


def test_make_private_loader_without_batch_size():
    sampler = BatchSampler(SequentialSampler(range(16)), batch_size=4, drop_last=False)
    loader = DataLoader(_dataset(), batch_sampler=sampler)
    assert loader.batch_size is None
    with pytest.raises(ValueError, match=r"data loader must have a batch_size.*batch_sampler"):
        _make_private(loader)


def test_make_private_batch_larger_than_dataset():
    with pytest.raises(ValueError, match=r"logical batch 32 exceeds the 16 training records"):
        _make_private(DataLoader(_dataset(16), batch_size=32))


def test_make_private_rejected_loader_leaves_model_untouched():
    model = _mlp()
    with pytest.raises(ValueError, match=r"exceeds the 16 training records"):
        _make_private(DataLoader(_dataset(16), batch_size=32), model=model)
    assert not _has_forward_hooks(model)


@pytest.mark.parametrize("schedule", [dict(epochs=1, steps=10), dict()])
def test_make_private_with_epsilon_needs_one_of_epochs_or_steps(schedule):
    model = _mlp()
    with pytest.raises(ValueError, match=r"exactly one of epochs or steps"):
        PrivacyEngineGradSampleController(accountant="rdp").make_private_with_epsilon(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_dataset(), batch_size=4),
            target_epsilon=1.0,
            target_delta=1e-5,
            max_grad_norm=1.0,
            grad_sample_mode="hooks",
            **schedule,
        )


# --------------------------------------------------------------------------- sampling
class _Stream(IterableDataset):
    def __iter__(self):
        yield from range(4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sample_rate=0.0), r"sample_rate must be a float in \(0, 1\], got 0\.0"),
        (dict(sample_rate=1.5), r"sample_rate must be a float in \(0, 1\], got 1\.5"),
        (dict(sample_rate=True), r"sample_rate must be a float in \(0, 1\], got True"),
        (
            dict(sample_rate=0.5, dp_rank=2, dp_size=2),
            r"dp_rank must be an int in \[0, dp_size=2\)",
        ),
        (dict(sample_rate=0.5, num_micro_batches=0), r"num_micro_batches must be an int >= 1"),
        (dict(sample_rate=0.5, secure_mode=True, seed=1), r"seed must not be given with secure"),
    ],
)
def test_poisson_loader_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_poisson_data_loader(DataLoader(_dataset(), batch_size=4), **kwargs)


def test_poisson_loader_refuses_iterable_dataset():
    with pytest.raises(ValueError, match=r"map-style dataset, got an IterableDataset"):
        build_poisson_data_loader(DataLoader(_Stream(), batch_size=2), sample_rate=0.5, seed=0)


# --------------------------------------------------------------------------- TP plans
def test_heads_not_divisible_by_tp_size():
    from transformers import LlamaConfig

    config = LlamaConfig(num_attention_heads=3, num_key_value_heads=3, hidden_size=24)
    with pytest.raises(ValueError, match=r"num_attention_heads=3 is not divisible by tp_size=2"):
        check_tp_divisibility(config, 2)
    check_tp_divisibility(config, 3)  # fine


def test_tp_size_hint_divides_every_head_count():
    """9 divides 9 query heads but not 3 KV heads: the hint offers only common divisors."""
    from transformers import LlamaConfig

    config = LlamaConfig(num_attention_heads=9, num_key_value_heads=3, hidden_size=72)
    with pytest.raises(ValueError) as info:
        check_tp_divisibility(config, 2)
    assert "num_attention_heads=9" in str(info.value)
    assert str(info.value).endswith("e.g. [1, 3].")
    with pytest.raises(ValueError, match=r"num_key_value_heads=3 is not divisible by tp_size=9"):
        check_tp_divisibility(config, 9)


# --------------------------------------------------------------------------- 2-rank worker
class Pair(nn.Module):
    """fc → norm → head, inputs ``[B, T, 8]``."""

    def __init__(self, head_in: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(head_in, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.fc(x)))


class ColwiseThenPlain(nn.Module):
    """Column-wise ``fc`` (DTensor output, feature-sharded) feeding a plain replicated Linear
    under ``implicit_replication``: the hook sees the local half of its input features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor.experimental import implicit_replication

        h = self.fc(x)
        with implicit_replication():
            out = self.head(h)
        return out.full_tensor() if isinstance(out, DTensor) else out


class ColwiseThenLocalLinear(nn.Module):
    """Column-wise ``fc`` with a local output of width 8 feeding a *plain* Linear(8, 4): each TP
    rank applies the "replicated" head to different features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x))


def _x() -> torch.Tensor:
    return torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(1))


def _expect(results: dict, name: str, exc: type[BaseException], match: str, fn) -> None:
    """Run ``fn`` under ``pytest.raises``; record the message, or why the check failed."""
    try:
        with pytest.raises(exc, match=match) as info:
            fn()
        results[name] = str(info.value)
    except BaseException as err:  # pytest's Failed is a BaseException
        results[name] = f"CHECK FAILED: {type(err).__name__}: {err}"


def _errors_worker(rank: int, world: int) -> dict[str, str]:
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    from hf_dp_tp import init_dp_tp_mesh
    from hf_dp_tp.parallel import apply_tp_plan

    warnings.simplefilter("ignore")
    mesh = init_dp_tp_mesh(2)
    tp = mesh["tp"]
    results: dict[str, str] = {}

    def sharded_pair() -> nn.Module:
        torch.manual_seed(0)
        model = Pair()
        parallelize_module(model, tp, {"fc": ColwiseParallel(output_layouts=Shard(-1))})
        return model

    _expect(
        results,
        "init_mesh_bad_tp_size",
        ValueError,
        r"tp_size=3 must divide the world size 2",
        lambda: init_dp_tp_mesh(3),
    )
    _expect(
        results,
        "dtensor_model_in_hooks_mode",
        ValueError,
        r"DTensor .* grad_sample_mode='hooks'.*Use grad_sample_mode='tp'",
        lambda: GradSampleControllerTP(sharded_pair(), grad_sample_mode="hooks"),
    )
    _expect(
        results,
        "hooks_mode_on_tp_mesh",
        ValueError,
        r"grad_sample_mode='hooks' cannot run on a mesh with tp size > 1",
        lambda: GradSampleControllerTP(Pair(), grad_sample_mode="hooks", device_mesh=mesh),
    )
    _expect(
        results,
        "tp_mode_without_dtensor_or_mesh",
        ValueError,
        r"grad_sample_mode='tp' needs .*device_mesh.*grad_sample_mode='hooks'",
        lambda: GradSampleControllerTP(Pair(), grad_sample_mode="tp"),
    )

    def sharded_norm() -> None:
        torch.manual_seed(0)
        model = Pair()
        weight = model.norm.weight.detach()
        model.norm.weight = nn.Parameter(distribute_tensor(weight, tp, [Shard(0)]))
        GradSampleControllerTP(model, device_mesh=mesh)

    _expect(
        results,
        "sharded_layernorm_weight",
        UnsupportedLayoutError,
        r"module 'norm' \(LayerNorm\).*'weight': 'Shard\(0\)'.*LayerNorm\.weight is Shard\(0\)"
        r".*only replicated",
        sharded_norm,
    )

    def hf_style(via_apply_tp_plan: bool) -> None:
        torch.manual_seed(0)
        model = Pair()
        if via_apply_tp_plan:
            apply_tp_plan(model, tp, {"head": "all_reduce"})
        else:  # what transformers' own loading does; it reads an HF model's attributes
            from transformers import PretrainedConfig

            model.config, model._mesh_manager = PretrainedConfig(), None
            apply_tensor_parallelism(model, tp, {"head": "all_reduce"})
        GradSampleControllerTP(model, device_mesh=mesh)

    _expect(
        results,
        "hf_style_all_reduce_direct",
        UnsupportedLayoutError,
        r"module 'head' \(Linear\) uses the transformers TP style 'all_reduce'.*supported",
        lambda: hf_style(False),
    )
    _expect(
        results,
        "hf_style_all_reduce_apply_tp_plan",
        UnsupportedLayoutError,
        r"module 'head' \(Linear\) uses the transformers TP style 'all_reduce'.*supported",
        lambda: hf_style(True),
    )

    def plain_after_colwise(model_cls) -> str:
        torch.manual_seed(0)
        model = model_cls()
        use_local = model_cls is ColwiseThenLocalLinear
        parallelize_module(model, tp, {"fc": ColwiseParallel(use_local_output=use_local)})
        controller = GradSampleControllerTP(model, device_mesh=mesh)
        model(_x()).pow(2).sum().backward()
        norms = controller.get_per_sample_norms()
        controller.cleanup()
        return f"no error; per-sample norms {norms.tolist()}"

    _expect(
        results,
        "plain_linear_sees_local_slice",
        UnsupportedLayoutError,
        r"module 'head': input activation has width 8 but this parameter layout needs the full "
        r"width 16",
        lambda: plain_after_colwise(ColwiseThenPlain),
    )
    _expect(
        results,
        "plain_local_linear_after_colwise",
        RuntimeError,
        r"replicated parameters differ across TP ranks.*rank-local activations",
        lambda: plain_after_colwise(ColwiseThenLocalLinear),
    )

    # ---- apply_tp_plan
    def gpt2() -> nn.Module:
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(**GPT2_TINY))

    # the message suggests only plans that work: for a Conv1D model, the shipped GPT-2 plan
    _expect(
        results,
        "auto_plan_without_hf_tp_plan",
        ValueError,
        r"GPT2LMHeadModel has no HF tp_plan.*Conv1D.*tp_plan=hf_dp_tp\.gpt2_tp_plan\(\)",
        lambda: apply_tp_plan(gpt2(), tp, "auto"),
    )
    _expect(
        results,
        "auto_plan_without_hf_tp_plan_linear",
        ValueError,
        r"Pair has no HF tp_plan.*'colwise'.*ColwiseParallel",
        lambda: apply_tp_plan(Pair(), tp, "auto"),
    )
    _expect(
        results,
        "linear_style_on_conv1d",
        ValueError,
        r"transformer\.h\.0\.mlp\.c_fc is a transformers Conv1D.*Conv1DParallel\('colwise'\)",
        lambda: apply_tp_plan(gpt2(), tp, {"transformer.h.*.mlp.c_fc": ColwiseParallel()}),
    )
    _expect(
        results,
        "hf_linear_style_on_conv1d",
        ValueError,
        r"c_proj is a transformers Conv1D.*'rowwise' shards nn\.Linear.*Conv1DParallel\('rowwise'\)",
        lambda: apply_tp_plan(gpt2(), tp, {"transformer.h.*.mlp.c_proj": "rowwise"}),
    )
    _expect(
        results,
        "plan_entry_matches_nothing",
        ValueError,
        r"TP plan entries \['fc_typo'\] match no module of Pair",
        lambda: apply_tp_plan(Pair(), tp, {"fc": ColwiseParallel(), "fc_typo": "colwise"}),
    )
    _expect(
        results,
        "unknown_hf_style",
        ValueError,
        r"unknown TP style 'column' for fc; HF styles: .*'colwise'.*ParallelStyle",
        lambda: apply_tp_plan(Pair(), tp, {"fc": "column"}),
    )
    _expect(
        results,
        "plan_not_a_dict",
        TypeError,
        r"tp plan must be 'auto' or a dict, got list",
        lambda: apply_tp_plan(Pair(), tp, ["fc"]),
    )

    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=3,
            num_key_value_heads=3,
            max_position_embeddings=16,
        )
    )
    _expect(
        results,
        "heads_not_divisible_by_tp",
        ValueError,
        r"num_attention_heads=3 is not divisible by tp_size=2.*\[1, 3\]",
        lambda: apply_tp_plan(llama, tp, "auto"),
    )
    untouched = not any(isinstance(p, DTensor) for p in llama.parameters())
    results["heads_not_divisible_model_untouched"] = str(untouched)
    return results


@pytest.fixture(scope="module")
def dist_results() -> list[dict[str, str]]:
    return run_distributed(_errors_worker, 2)


DIST_CHECKS = [
    "init_mesh_bad_tp_size",
    "dtensor_model_in_hooks_mode",
    "hooks_mode_on_tp_mesh",
    "tp_mode_without_dtensor_or_mesh",
    "sharded_layernorm_weight",
    "hf_style_all_reduce_direct",
    "hf_style_all_reduce_apply_tp_plan",
    "plain_linear_sees_local_slice",
    "auto_plan_without_hf_tp_plan",
    "auto_plan_without_hf_tp_plan_linear",
    "linear_style_on_conv1d",
    "hf_linear_style_on_conv1d",
    "plan_entry_matches_nothing",
    "unknown_hf_style",
    "plan_not_a_dict",
    "heads_not_divisible_by_tp",
]


@pytest.mark.parametrize("name", DIST_CHECKS)
def test_distributed(dist_results, name):
    messages = [r[name] for r in dist_results]
    for rank, message in enumerate(messages):
        print(f"rank {rank} {name}: {message}")
        assert not message.startswith("CHECK FAILED"), f"rank {rank}: {message}"
    assert messages[0] == messages[1]


def test_distributed_heads_check_runs_before_sharding(dist_results):
    assert [r["heads_not_divisible_model_untouched"] for r in dist_results] == ["True", "True"]


def test_distributed_plain_linear_on_local_slice_raises(dist_results):
    for r in dist_results:
        assert not r["plain_local_linear_after_colwise"].startswith("CHECK FAILED"), r[
            "plain_local_linear_after_colwise"
        ]
