"""The examples keep working: each runs under ``torchrun`` on 2 CPU processes (gloo) and reports a
finite ε that grows with the steps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # torchrun picks a free port itself
        "--nproc-per-node",
        "2",
        str(ROOT / "examples" / script),
        *args,
    ]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


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
