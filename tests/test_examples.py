"""The examples keep working: each runs under ``torchrun`` on 2 CPU processes (gloo) and reports a
finite ε that grows with the steps."""

from __future__ import annotations

import re

import pytest

from tests.distributed_harness import (
    ROOT,
    run_on_two_local_nodes,
    run_script,
    torchrun_command,
)


def _torchrun(script: str, *args: str) -> str:
    return run_script(torchrun_command(ROOT / "examples" / script, *args), timeout=300)


def _epsilons(output: str) -> list[float]:
    return [float(x) for x in re.findall(r"ε\s*=?\s*([0-9.]+)", output)]


@pytest.mark.slow
def test_toy_controller_example_runs():
    out = _torchrun("tensor_parallelism_toy_controller.py", "--epochs", "1", "--num_samples", "512")
    eps = _epsilons(out)
    assert len(eps) >= 3, out
    assert eps == sorted(eps) and eps[-1] > 0, eps


@pytest.mark.slow
def test_llama_controller_example_runs():
    out = _torchrun(
        "tensor_parallelism_llama_controller.py", "--steps", "4", "--num_samples", "512"
    )
    eps = _epsilons(out)
    assert len(eps) >= 3, out
    assert eps == sorted(eps) and eps[-1] > 0, eps


@pytest.mark.slow
def test_fsdp_tp_ghost_on_two_local_nodes():
    """The multi-node launch on one machine: two ``torchrun`` launchers (``--nnodes 2``, one per
    "node", 2 processes each) rendezvous over c10d; TP inside a node, FSDP2 over DP across the
    two nodes, ghost clipping."""
    script = ROOT / "examples" / "tensor_parallelism_llama_controller.py"
    args = ["--tp_size", "2", "--fsdp", "--grad_sample_mode", "ghost", "--steps", "3"]
    node0 = run_on_two_local_nodes([str(script), *args, "--num_samples", "512"])
    assert "dp=2 (FSDP) tp=2" in node0 and "mode=ghost" in node0, node0
    eps = _epsilons(node0)
    assert len(eps) >= 3 and eps == sorted(eps) and eps[-1] > 0, node0
