"""Noise (contract rule 6, docs/usage.md) and replica consistency, on a dp=2 × tp=2 mesh.

On zero gradients the step's gradient *is* the noise (``loss_reduction="sum"``), so its statistics
are measured directly: std exactly σ·C on every parameter (never divided by world/tp/dp size, never
added once per DP replica), independent across TP ranks for sharded parameters, identical across
TP ranks for replicated ones and across DP replicas, fresh at every step, and from no global RNG.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from hf_dp_tp import DPOptimizerTP, GradSampleControllerTP, init_dp_tp_mesh
from hf_dp_tp.parallel import apply_tp_plan
from tests.distributed_harness import run_distributed

SIGMA, CLIP, STEPS = 1.5, 2.0, 3


class WideMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)  # column-wise: sharded weight and bias
        self.fc2 = nn.Linear(128, 64)  # row-wise: sharded weight, replicated bias
        self.norm = nn.LayerNorm(64)  # replicated (plain) parameters
        self.head = nn.Linear(64, 96)  # column-wise, gathered output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.fc2(torch.relu(self.fc1(x)))))


PLAN = {
    "fc1": ColwiseParallel(),
    "fc2": RowwiseParallel(),
    "head": ColwiseParallel(output_layouts=Replicate()),
}


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def _noise_worker(rank: int, world: int, secure: bool) -> dict:
    mesh = init_dp_tp_mesh(2)
    torch.manual_seed(0)
    model = WideMLP()
    apply_tp_plan(model, mesh["tp"], PLAN)
    controller = GradSampleControllerTP(model, device_mesh=mesh, loss_reduction="sum")
    optimizer = DPOptimizerTP(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        expected_batch_size=4,
        mesh=controller.mesh,
        loss_reduction="sum",
        secure_mode=secure,
        noise_seed=None,
    )
    global_rng = torch.get_rng_state()
    steps = []
    for _ in range(STEPS):
        x = torch.randn(4, 5, 64, generator=torch.Generator().manual_seed(7))
        (model(x) * 0.0).sum().backward()  # every per-sample gradient is exactly zero
        optimizer.step()
        steps.append(
            {
                name: {
                    "local": _local(p.grad),
                    "full": (
                        p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                    ).clone(),
                    "sharded": isinstance(p, DTensor) and not p.placements[0].is_replicate(),
                }
                for name, p in model.named_parameters()
            }
        )
        optimizer.zero_grad()
    params = {name: _local(p) for name, p in model.named_parameters()}
    controller.cleanup()
    return {
        "steps": steps,
        "params": params,
        "global_rng_untouched": torch.equal(global_rng, torch.get_rng_state()),
        "tp_rank": mesh["tp"].get_local_rank(),
        "dp_rank": mesh["dp"].get_local_rank(),
        "world_rank": dist.get_rank(),
    }


def _check_noise(results: list[dict]) -> dict[str, float]:
    by_coord = {(r["dp_rank"], r["tp_rank"]): r for r in results}
    stds: dict[str, float] = {}
    for r in results:
        assert r["global_rng_untouched"]
    for step in range(STEPS):
        ref = by_coord[(0, 0)]["steps"][step]
        for name, entry in ref.items():
            full = entry["full"].double()
            n = full.numel()
            std = full.std().item()
            stds[name] = std
            # std of N(0, (σC)²) estimated from n values: relative standard error ≈ 1/sqrt(2n)
            rel_se = 1 / math.sqrt(2 * n)
            assert abs(std / (SIGMA * CLIP) - 1) < 6 * rel_se, (name, std, n)
            assert abs(full.mean().item()) < 6 * SIGMA * CLIP / math.sqrt(n), name
            for dp in (0, 1):
                for tp in (0, 1):
                    other = by_coord[(dp, tp)]["steps"][step][name]
                    # every replica ends the step with the same full gradient
                    assert torch.equal(other["full"], entry["full"]), (name, dp, tp)
                # identical across DP replicas of the same shard
                assert torch.equal(
                    by_coord[(dp, 1)]["steps"][step][name]["local"],
                    by_coord[(0, 1)]["steps"][step][name]["local"],
                ), name
            shard0 = by_coord[(0, 0)]["steps"][step][name]["local"].flatten().double()
            shard1 = by_coord[(0, 1)]["steps"][step][name]["local"].flatten().double()
            if entry["sharded"]:
                # independent slices: equal draws would publish S1 - S2 without noise
                m = min(shard0.numel(), shard1.numel())
                corr = torch.corrcoef(torch.stack([shard0[:m], shard1[:m]]))[0, 1].item()
                assert abs(corr) < 6 / math.sqrt(m), (name, corr)
            else:
                assert torch.equal(shard0, shard1), name
            if step > 0:  # fresh noise at every step
                previous = by_coord[(0, 0)]["steps"][step - 1][name]["full"].flatten().double()
                corr = torch.corrcoef(torch.stack([previous, full.flatten()]))[0, 1].item()
                assert abs(corr) < 6 / math.sqrt(n), (name, corr)
    # replicas stay bit-identical after several noisy steps
    for name in results[0]["params"]:
        for tp in (0, 1):
            assert torch.equal(by_coord[(0, tp)]["params"][name], by_coord[(1, tp)]["params"][name])
        if not results[0]["steps"][0][name]["sharded"]:
            assert torch.equal(by_coord[(0, 0)]["params"][name], by_coord[(0, 1)]["params"][name])
    return stds


def test_noise_statistics_and_replica_identity_seeded():
    stds = _check_noise(run_distributed(_noise_worker, 4, False))
    print("noise std per parameter (target", SIGMA * CLIP, "):", stds)


def test_noise_statistics_secure_mode():
    stds = _check_noise(run_distributed(_noise_worker, 4, True))
    print("secure noise std per parameter (target", SIGMA * CLIP, "):", stds)
