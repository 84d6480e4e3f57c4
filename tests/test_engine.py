"""The engine end to end on tp=2: Poisson loader, DP optimizer and accountant together.

ε must equal an independently built opacus accountant fed (σ, q, steps) — one accountant step per
optimizer step with the *global* q (contract rule 10, docs/usage.md) — and grow with every step; σ
calibrated for a target ε must spend that ε by the planned step; the privacy ledger round-trips.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from opacus.accountants import create_accountant
from torch.utils.data import DataLoader, TensorDataset

from hf_dp_tp import PrivacyEngineGradSampleController, init_dp_tp_mesh
from hf_dp_tp.parallel import apply_tp_plan
from tests import models
from tests.distributed_harness import run_distributed

N, BATCH, DELTA = 64, 8, 1e-5


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(N, 3, 8, generator=g), torch.randn(N, 3, 4, generator=g))


def _engine_worker(rank: int, world: int, accountant: str) -> dict:
    mesh = init_dp_tp_mesh(2)
    torch.manual_seed(0)
    model = models.ToyMLP()
    apply_tp_plan(model, mesh["tp"], models.toy_mlp_plan())
    engine = PrivacyEngineGradSampleController(accountant=accountant)
    controller, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=DataLoader(_dataset(), batch_size=BATCH),
        noise_multiplier=1.1,
        max_grad_norm=1.0,
        grad_sample_mode="tp",
        device_mesh=mesh,
        sampling_seed=5,
        noise_seed=6,
    )
    epsilons, batch_indices, losses = [], [], []
    for x, y in loader:
        batch_indices.append(x.sum().item())  # cheap fingerprint of the batch
        loss = models.toy_mlp_losses(model, {"x": x, "y": y})
        (loss.mean() if len(loss) else loss.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach().mean().item() if len(loss) else float("nan"))
        epsilons.append(engine.get_epsilon(DELTA))
    ledger = engine.state_dict()
    controller.cleanup()
    return {
        "epsilons": epsilons,
        "fingerprints": batch_indices,
        "sample_rate": engine.sample_rate,
        "steps": len(epsilons),
        "ledger_history": ledger["accountant"]["history"],
        "sampler_state": ledger["sampler"],
        "noise_steps": ledger["optimizer"]["steps_taken"],
    }


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_engine_epsilon_matches_opacus_accountant(accountant):
    results = run_distributed(_engine_worker, 2, accountant)
    r0, r1 = results
    assert r0["fingerprints"] == r1["fingerprints"]  # TP peers see the same Poisson batches
    assert r0["epsilons"] == r1["epsilons"]
    assert r0["sample_rate"] == pytest.approx(BATCH / N)
    assert r0["steps"] == round(N / BATCH) == r0["noise_steps"]
    reference = create_accountant(mechanism=accountant)
    expected = []
    for _ in range(r0["steps"]):
        reference.step(noise_multiplier=1.1, sample_rate=BATCH / N)
        expected.append(reference.get_epsilon(delta=DELTA))
    print(f"{accountant}: epsilon per step", r0["epsilons"])
    assert r0["epsilons"] == pytest.approx(expected, rel=1e-9)
    assert all(b > a for a, b in zip(r0["epsilons"], r0["epsilons"][1:], strict=False))


def _with_epsilon_worker(rank: int, world: int) -> dict:
    mesh = init_dp_tp_mesh(2)
    torch.manual_seed(0)
    model = models.ToyMLP()
    apply_tp_plan(model, mesh["tp"], models.toy_mlp_plan())
    engine = PrivacyEngineGradSampleController(accountant="rdp")
    controller, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=DataLoader(_dataset(), batch_size=BATCH),
        target_epsilon=4.0,
        target_delta=DELTA,
        max_grad_norm=1.0,
        epochs=2,
        device_mesh=mesh,
    )
    for _ in range(2):
        for x, y in loader:
            loss = models.toy_mlp_losses(model, {"x": x, "y": y})
            (loss.mean() if len(loss) else loss.sum()).backward()
            optimizer.step()
            optimizer.zero_grad()
    return {"epsilon": engine.get_epsilon(DELTA), "sigma": optimizer.noise_multiplier}


def test_make_private_with_epsilon_spends_the_target():
    results = run_distributed(_with_epsilon_worker, 2)
    print("calibrated:", results[0])
    assert results[0] == results[1]
    assert 4.0 - 0.05 < results[0]["epsilon"] <= 4.0 + 1e-9


def test_zero_noise_reports_infinite_epsilon_without_crashing():
    from hf_dp_tp.accounting import epsilon_spent, make_accountant

    accountant = make_accountant("prv")
    accountant.step(noise_multiplier=0.0, sample_rate=0.1)
    assert math.isinf(epsilon_spent(accountant, DELTA))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_accountant("gdp", allow_approximate_accountant=True)
    assert any("understate" in str(w.message) for w in caught)


def test_prv_accounting_is_quiet_and_rdp_uses_a_wider_order_grid():
    """opacus's PRV accountant sizes its domain with an RDP bound over RDP's default orders and
    warns "Optimal order is the largest alpha" on the demo's settings (σ ≈ 0.62, q = 0.04): the
    warning concerns only that (conservative) domain size, so PRV calls are silent, as they are
    at q = 1 (numpy's divide by zero in log(1 - q)). The "rdp"
    accountant evaluates a wider grid: a tighter ε where opacus's optimum was its largest order."""
    from opacus.accountants import RDPAccountant

    from hf_dp_tp.accounting import calibrate_noise_multiplier, epsilon_spent, make_accountant

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sigma = calibrate_noise_multiplier(
            target_epsilon=8.0, target_delta=1e-5, sample_rate=0.04, steps=75
        )
        prv = make_accountant("prv")
        prv.history = [(sigma, 0.04, 5)]
        assert 0 < epsilon_spent(prv, 1e-5) < 8.0
        # q = 1 (the audit's full batches): log(1 - q) = -inf in opacus's PRV is the right limit
        full = make_accountant("prv")
        full.history = [(4.0, 1.0, 4)]
        assert 1.9 < epsilon_spent(full, 1e-5) < 2.1
        calibrate_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=1.0, steps=4)
    assert not [str(w.message) for w in caught], [str(w.message) for w in caught]

    large_sigma = [(5.0, 0.01, 10)]  # opacus's best order is its largest, 63 (ours: 192)
    opacus_rdp, ours = RDPAccountant(), make_accountant("rdp")
    opacus_rdp.history, ours.history = list(large_sigma), list(large_sigma)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loose = opacus_rdp.get_epsilon(delta=1e-5)
    assert any("largest alpha" in str(w.message) for w in caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tight = epsilon_spent(ours, 1e-5)
    assert tight < loose and not caught
