"""Noise in the precision of the gradient: a membership game on one float64 update.

The attacker knows every record but one candidate, the weights before and after one DP-SGD step,
and the learning rate. If the noise were drawn on a coarser grid than the clipped sum it is added
to (float32 noise on a float64 sum), ``update - S_in`` would land on the float32 grid exactly
when the candidate was in the batch, and the attacker would win every round. Drawn in the dtype of
the sum, the game is at chance level. The game runs through ``DPOptimizerTP`` itself, seeded and
secure.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from hf_dp_tp import DPOptimizerTP, GradSampleControllerTP, MeshInfo

ROUNDS = 120


def _update(x: torch.Tensor, y: torch.Tensor, *, sigma: float, secure: bool) -> torch.Tensor:
    """``θ_before - θ_after`` of one DP-SGD step (SGD, lr 1, sum reduction) from θ = 0, so the
    update is exactly the noisy clipped sum ``S + Z``."""
    model = nn.Linear(x.shape[1], y.shape[1], bias=False).double()
    nn.init.zeros_(model.weight)
    GradSampleControllerTP(model, grad_sample_mode="hooks", loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # σ = 0: not private, used for the attacker's S
        optimizer = DPOptimizerTP(
            torch.optim.SGD(model.parameters(), lr=1.0),
            noise_multiplier=sigma,
            max_grad_norm=1.0,
            expected_batch_size=x.shape[0],
            mesh=MeshInfo(),
            loss_reduction="sum",
            secure_mode=secure,
        )
    (model(x) - y).pow(2).sum().backward()
    optimizer.clip_and_accumulate()
    optimizer.step()
    return -model.weight.detach().clone()


def _off_float32_grid(r: torch.Tensor) -> float:
    """Mean distance of ``r`` to the float32 grid, in float32 ulps (0 on the grid, ~0.25 off)."""
    nearest = r.float().double()
    ulp = torch.finfo(torch.float32).eps * nearest.abs().clamp_min(1e-30)
    return ((r - nearest).abs() / ulp).mean().item()


def _membership_game(secure: bool) -> int:
    g = torch.Generator().manual_seed(0)
    wins = 0
    for _ in range(ROUNDS):
        x = torch.randn(8, 6, generator=g, dtype=torch.float64)
        y = torch.randn(8, 3, generator=g, dtype=torch.float64)
        s_in = _update(x, y, sigma=0.0, secure=False)  # the attacker's two candidate sums
        s_out = _update(x[:7], y[:7], sigma=0.0, secure=False)
        member = bool(torch.randint(0, 2, (1,), generator=g).item())
        batch = slice(None) if member else slice(0, 7)
        observed = _update(x[batch], y[batch], sigma=1.0, secure=secure)
        guess_in = _off_float32_grid(observed - s_in) < _off_float32_grid(observed - s_out)
        wins += guess_in == member
    return wins


@pytest.mark.parametrize("secure", [False, True], ids=["seeded", "secure"])
def test_float64_update_does_not_reveal_membership(secure):
    wins = _membership_game(secure)
    # chance: Binomial(120, 1/2) has sd 5.5; 84 wins is 4.4 sd above 60. Float32 noise: 120/120.
    assert wins <= 84, f"the attacker won {wins}/{ROUNDS} membership rounds"
