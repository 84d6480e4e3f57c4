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
