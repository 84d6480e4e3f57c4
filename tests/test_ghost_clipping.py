"""Ghost clipping (``grad_sample_mode="ghost"``, hf_dp_tp.ghost): factored per-sample gradients.

The distributed equivalence of ghost clipping with the single-process reference (TP, DP×TP, every
model, every norm form) is in test_equivalence.py, test_lora_tp.py, test_trainer.py and
test_accumulation_and_hooks_mode.py. Here: the algebra of the factors against materialised
per-sample gradients, the choice of form, the cross term of tied weights (and a mutation that
drops it, which the reference comparison must catch), the mode's API, and the self-check and
empty batches in ghost mode.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from hf_dp_tp import GradSampleControllerTP, PrivacyEngineGradSampleController
from hf_dp_tp import ghost as ghost_module
from hf_dp_tp.ghost import FactoredGradSample, OuterProducts, norm_form, prefers_ghost
from hf_dp_tp.layout import GHOST, PLAIN, model_layout
from tests import models
from tests.test_silent_gradient_errors import _TiedByFunctional

F64 = torch.float64


def _dense(b: int, t: int, m: int, n: int, seed: int) -> OuterProducts:
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(b, t, m, generator=g, dtype=F64)
    right = torch.randn(b, t, n, generator=g, dtype=F64)
    return OuterProducts(left, right, rows=m, dtype=F64)


def _index(b: int, t: int, m: int, n: int, seed: int) -> OuterProducts:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, m, (b, t), generator=g)  # -1: a token outside this shard's rows
    ids[:, :2] = 1  # repeated ids in a sample
    right = torch.randn(b, t, n, generator=g, dtype=F64)
    return OuterProducts(ids, right, rows=m, dtype=F64)


def _materialised_reference(term: OuterProducts) -> torch.Tensor:
    """``Σ_t l[t] ⊗ r[t]`` one sample and one token at a time."""
    b, t = term.batch_size, term.tokens
    out = torch.zeros(b, term.rows, term.cols, dtype=F64)
    for i in range(b):
        for s in range(t):
            if term.is_index:
                row = int(term.left[i, s])
                if row >= 0:
                    out[i, row] += term.right[i, s]
            else:
                out[i] += torch.outer(term.left[i, s], term.right[i, s])
    return out


@pytest.mark.parametrize("kinds", [("dense", "dense"), ("index", "index"), ("index", "dense")])
def test_inner_products_and_sums_equal_materialised_gradients(kinds):
    make = {"dense": _dense, "index": _index}
    a = make[kinds[0]](3, 5, 7, 4, seed=1)
    b = make[kinds[1]](3, 6, 7, 4, seed=2)
    ga, gb = _materialised_reference(a), _materialised_reference(b)
    torch.testing.assert_close(a.materialise(), ga, rtol=1e-12, atol=1e-12)
    want = (ga * gb).flatten(1).sum(1)
    torch.testing.assert_close(a.inner(b), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.inner(a), want, rtol=1e-12, atol=1e-12)
    weights = torch.tensor([0.3, 1.0, 0.0], dtype=F64)
    torch.testing.assert_close(
        a.weighted_sum(weights), torch.einsum("b,bmn->mn", weights, ga), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("form", ["ghost", "materialise"])
def test_two_uses_of_one_parameter_include_the_cross_term(form):
    """An embedding tied to an output layer: ``‖G_emb + G_head‖²``, not the sum of the two
    squares; both forms agree with the materialised sum, over two forward passes."""
    fs = FactoredGradSample((7, 4))
    emb, head = _index(3, 5, 7, 4, seed=3), _dense(3, 5, 7, 4, seed=4)
    fs.add(emb, generation=1)
    fs.add(head, generation=1)
    later = _dense(2, 5, 7, 4, seed=5)
    fs.add(later, generation=2)
    first = _materialised_reference(emb) + _materialised_reference(head)
    want = torch.cat([first, _materialised_reference(later)])
    with norm_form(form):
        got = fs.squared_norms()
    torch.testing.assert_close(got, want.pow(2).flatten(1).sum(1), rtol=1e-12, atol=1e-12)
    squares_only = torch.cat(
        [
            _materialised_reference(emb).pow(2).flatten(1).sum(1)
            + _materialised_reference(head).pow(2).flatten(1).sum(1),
            _materialised_reference(later).pow(2).flatten(1).sum(1),
        ]
    )
    assert (got - squares_only).abs().max() > 1e-3  # the cross term is not negligible here
    factors = torch.rand(5, dtype=F64)
    torch.testing.assert_close(
        fs.clipped_sum(factors), torch.einsum("b,bmn->mn", factors, want), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(fs.materialise(), want)


def test_empty_and_bf16_terms():
    empty = _dense(0, 5, 3, 2, seed=6)
    assert empty.inner(empty).shape == (0,)
    assert empty.weighted_sum(torch.zeros(0, dtype=F64)).abs().sum() == 0
    bf16 = OuterProducts(
        torch.full((2, 4096, 1), 0.01, dtype=torch.bfloat16),
        torch.ones(2, 4096, 1, dtype=torch.bfloat16),
        rows=1,
        dtype=torch.bfloat16,
    )
    # per sample: G = Σ_t 0.01 = 40.96; accumulated in fp32, not bf16
    assert bf16.inner(bf16).dtype == torch.float32
    torch.testing.assert_close(bf16.inner(bf16), torch.full((2,), 40.96**2), rtol=1e-2, atol=0)
    torch.testing.assert_close(
        bf16.weighted_sum(torch.ones(2)), torch.full((1, 1), 81.92), rtol=1e-2, atol=0
    )


def test_the_cheaper_form_is_chosen_per_layer():
    # a long sequence on a small square layer: materialise (T·m·n < T²(m + n))
    assert not prefers_ghost([_dense(1, 256, 16, 16, seed=0)])
    # a short sequence on a wide layer: token Grams
    assert prefers_ghost([_dense(1, 8, 512, 512, seed=0)])
    # an embedding with a large vocabulary: never the [B, V, d] tensor
    big_vocab = OuterProducts(
        torch.zeros(1, 64, dtype=torch.long), torch.zeros(1, 64, 8), rows=32000, dtype=F64
    )
    assert prefers_ghost([big_vocab])


def _tied_llama_case(tmp):
    model = models.load_tiny_llama(models.save_tiny_llama(f"{tmp}/tied", tie=True)).double()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = models.lm_batch(6, vocab=64, seq=8)
    return model, batch


def _ghost_norms(model, batch) -> torch.Tensor:
    controller = GradSampleControllerTP(model, grad_sample_mode="ghost")
    models.llama_losses(model, batch).mean().backward()
    norms = controller.get_per_sample_norms()
    controller.cleanup()
    return norms


@pytest.mark.parametrize("form", ["ghost", "materialise"])
def test_dropping_the_tied_cross_term_is_caught(form, monkeypatch, tmp_path):
    """The mutation the issue names: count each use of the tied embedding / LM head separately.
    The comparison with the single-process reference must fail on it."""
    model, batch = _tied_llama_case(tmp_path)
    _, reference = models.reference_per_sample_grads(
        copy.deepcopy(model), models.llama_losses, batch
    )
    with norm_form(form):
        exact = _ghost_norms(copy.deepcopy(model), batch)
        # the per-sample mode shows the same ~1e-8 here (fp32 rounding inside the model)
        assert ((exact - reference).abs().max() / reference.max()) < 1e-6
        original = ghost_module._generation_squared_norms

        def without_cross_terms(terms, shape):
            return sum(original([t], shape) for t in terms)

        monkeypatch.setattr(ghost_module, "_generation_squared_norms", without_cross_terms)
        mutant = _ghost_norms(copy.deepcopy(model), batch)
    error = ((mutant - reference).abs().max() / reference.max()).item()
    print(f"{form}: relative norm error without the cross term {error:.3g}")
    assert error > 1e-3


def test_ghost_mode_is_accepted_by_both_entry_points_with_the_layout_inferred():
    from hf_dp_tp import DPTrainingArguments

    model = models.ToyMLP()
    layout = model_layout(model, "ghost")
    assert (layout.layout, layout.method) == (PLAIN, GHOST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DPTrainingArguments(
            output_dir="unused",
            report_to=[],
            noise_multiplier=1.0,
            grad_sample_mode="ghost",
            tp_size=2,
        )
    assert args.grad_sample_mode == "ghost"
    engine = PrivacyEngineGradSampleController()
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 8))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    controller, _, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode="ghost",
    )
    assert controller.ghost and not controller.layout.tp
    model(torch.randn(4, 3, 8)).sum().backward()
    assert isinstance(model.fc1.weight.grad_sample, FactoredGradSample)
    (weight_term,) = model.fc1.weight.grad_sample.generations[0]
    (bias_term,) = model.fc1.bias.grad_sample.generations[0]
    assert isinstance(weight_term, OuterProducts)  # factors, never [B, 16, 8]
    assert isinstance(bias_term, torch.Tensor) and bias_term.shape == (4, 16)  # small: built
    controller.cleanup()


def test_self_check_catches_a_weight_used_outside_its_module_in_ghost_mode():
    model = _TiedByFunctional()
    GradSampleControllerTP(model, grad_sample_mode="ghost", loss_reduction="sum")
    with pytest.raises(RuntimeError, match=r"parameter embed\.weight.*outside its module"):
        model(torch.randint(0, 16, (4, 5))).pow(2).sum().backward()


def test_empty_batch_in_ghost_mode():
    """An empty Poisson batch: factored terms of batch 0 and a step with a zero gradient."""
    torch.manual_seed(0)
    model = models.EmbedNormNet()
    controller = GradSampleControllerTP(model, grad_sample_mode="ghost")
    from hf_dp_tp import MeshInfo

    optimizer = models.dp_optimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), MeshInfo(), clip=1.0, expected_batch=4
    )
    models.embed_norm_losses(
        model, {"input_ids": torch.zeros(0, 6, dtype=torch.long)}
    ).sum().backward()
    assert all(p.grad_sample.batch_size == 0 for p in model.parameters() if p.dim() == 2)
    optimizer.step()
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    controller.cleanup()


@pytest.mark.parametrize("form", ["ghost", "materialise"])
def test_two_dimensional_inputs_match_the_reference(form):
    """``[B, features]`` inputs (one token per sample), Linear with and without bias."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3, bias=False)
    ).double()
    x = torch.randn(5, 4, dtype=F64)
    batch = {"x": x}

    def losses(m, b):
        return m(b["x"]).pow(2).sum(1)

    _, reference = models.reference_per_sample_grads(copy.deepcopy(model), losses, batch)
    with norm_form(form):
        controller = GradSampleControllerTP(model, grad_sample_mode="ghost", loss_reduction="sum")
        losses(model, batch).sum().backward()
        norms = controller.get_per_sample_norms()
        controller.cleanup()
    torch.testing.assert_close(norms, reference, rtol=1e-12, atol=1e-12)
