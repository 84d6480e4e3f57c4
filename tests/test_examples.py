"""The examples keep working: each runs under ``torchrun`` on 2 CPU processes (gloo) and reports a
finite ε that grows with the steps."""

from __future__ import annotations

import re

import pytest

from tests.distributed_harness import ROOT, run_script, torchrun_command


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
    import subprocess
    import sys

    from tests.distributed_harness import find_free_port, script_env

    port = find_free_port()
    script = ROOT / "examples" / "tensor_parallelism_llama_controller.py"
    args = ["--tp_size", "2", "--fsdp", "--grad_sample_mode", "ghost", "--steps", "3"]
    launchers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                *("--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "2"),
                *("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"),
                *("--rdzv-id", f"two-nodes-{port}"),
                str(script),
                *args,
                *("--num_samples", "512"),
            ],
            cwd=ROOT,
            env=script_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [launcher.communicate(timeout=300) for launcher in launchers]
    for launcher, (out, err) in zip(launchers, outputs, strict=True):
        assert launcher.returncode == 0, out[-3000:] + err[-3000:]
    node0 = outputs[0][0]
    assert "dp=2 (FSDP) tp=2" in node0 and "mode=ghost" in node0, node0
    eps = _epsilons(node0)
    assert len(eps) >= 3 and eps == sorted(eps) and eps[-1] > 0, node0
