"""The examples keep working: each runs under ``torchrun`` on 2 CPU processes (gloo) and reports a
finite ε that grows with the steps.

They also keep the library's privacy rules (tests/example_spy.py records what they passed to
``make_private`` and every batch their Poisson sampler drew): by default the Poisson batches and
the noise come from fresh secrets, never from the public ``--seed``; a fixed ``--dp_seed`` only
with a loud warning; and nothing a DP run must not reveal is printed — no realised batch size, no
metric on the training records (metrics are on held-out data)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest

from tests.distributed_harness import (
    ROOT,
    run_on_two_local_nodes,
    run_script,
    torchrun_command,
)

EXAMPLES = ROOT / "examples"
TOY = "tensor_parallelism_toy_controller.py"
LLAMA = "tensor_parallelism_llama_controller.py"


def _torchrun_spied(tmp_path, script: str, *args: str) -> tuple[str, list[dict]]:
    """Run ``script`` under ``torchrun`` (2 processes) through tests/example_spy.py: its stdout
    and each rank's records."""
    spy, out = ROOT / "tests" / "example_spy.py", tmp_path / "spy"
    stdout = run_script(torchrun_command(spy, str(out), str(EXAMPLES / script), *args), timeout=300)
    return stdout, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _epsilons(output: str) -> list[float]:
    return [float(x) for x in re.findall(r"ε\s*=?\s*([0-9.]+)", output)]


def _integers(line: str) -> set[int]:
    """The whole numbers printed on ``line`` (not the digits of a decimal like 0.128)."""
    return {int(x) for x in re.findall(r"(?<![\d.])\d+(?![\d.])", line)}


def _check_privacy_of_a_default_run(stdout: str, records: list[dict], seed: int) -> None:
    for rank in records:
        # fresh secrets: no seed passed, the sampler agreed on a random 63-bit one
        assert rank["make_private"] == [{"sampling_seed": None, "noise_seed": None}], rank
        (sampler_seed,) = rank["sampler_seeds"]
        assert sampler_seed not in range(seed - 100, seed + 100) and sampler_seed >= 2**20
    assert records[0]["sampler_seeds"] == records[1]["sampler_seeds"]  # agreed by the ranks
    # dp=1: each rank drew the whole logical batch; no step line shows its size
    sizes = records[0]["batch_sizes"]
    step_lines = [line for line in stdout.splitlines() if re.search(r"\bstep\s+\d+", line)]
    assert len(step_lines) >= len(sizes) >= 3, stdout
    for line in step_lines:
        assert not set(sizes) & _integers(line), (line, sizes)
    assert not re.search(r"batch\s*[:=]?\s*\d", stdout), stdout
    # metrics only on held-out data, or labelled as outside the guarantee
    for line in stdout.splitlines():
        if re.search(r"train(ing)?[ -](loss|accuracy)", line):
            assert "not covered by the DP guarantee" in line, line
    assert "held-out" in stdout, stdout


@pytest.mark.slow
def test_toy_controller_example_runs(tmp_path):
    out, records = _torchrun_spied(tmp_path, TOY, "--epochs", "1", "--num_samples", "512")
    eps = _epsilons(out)
    assert len(eps) >= 3, out
    assert eps == sorted(eps) and eps[-1] > 0, eps
    _check_privacy_of_a_default_run(out, records, seed=0)


@pytest.mark.slow
def test_llama_controller_example_runs(tmp_path):
    out, records = _torchrun_spied(
        tmp_path, LLAMA, "--steps", "4", "--num_samples", "512", "--num_eval", "64"
    )
    eps = _epsilons(out)
    assert len(eps) >= 3, out
    assert eps == sorted(eps) and eps[-1] > 0, eps
    _check_privacy_of_a_default_run(out, records, seed=0)


def _example(script: str):
    name = script.removesuffix(".py")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.parametrize("script", [TOY, LLAMA])
def test_seed_never_feeds_the_privacy_randomness(script):
    """``--seed`` (public) is not the sampler's or the noise's seed; ``--dp_seed`` is, loudly."""
    example = _example(script)
    assert example.dp_randomness(example.parse_args([]), rank=0) == {}
    assert example.dp_randomness(example.parse_args(["--seed", "5"]), rank=0) == {}
    args = example.parse_args(["--seed", "5", "--dp_seed", "7"])
    with pytest.warns(UserWarning, match="batches and the noise of this run are PUBLIC"):
        assert example.dp_randomness(args, rank=0) == {"sampling_seed": 7, "noise_seed": 7}


def test_llama_example_refuses_dp_seed_in_secure_mode():
    example = _example(LLAMA)
    with pytest.raises(SystemExit, match="drop --dp_seed"):
        example.dp_randomness(example.parse_args(["--secure_mode", "--dp_seed", "7"]), rank=0)


@pytest.mark.slow
def test_fsdp_tp_ghost_on_two_local_nodes():
    """The multi-node launch on one machine: two ``torchrun`` launchers (``--nnodes 2``, one per
    "node", 2 processes each) rendezvous over c10d; TP inside a node, FSDP2 over DP across the
    two nodes, ghost clipping."""
    script = EXAMPLES / LLAMA
    args = ["--tp_size", "2", "--fsdp", "--grad_sample_mode", "ghost", "--steps", "3"]
    node0 = run_on_two_local_nodes([str(script), *args, "--num_samples", "512", "--num_eval", "32"])
    assert "dp=2 (FSDP) tp=2" in node0 and "mode=ghost" in node0, node0
    eps = _epsilons(node0)
    assert len(eps) >= 3 and eps == sorted(eps) and eps[-1] > 0, node0
    assert not re.search(r"batch\s*[:=]?\s*\d", node0), node0
