"""ParallelDims (the run's parallelism sizes, decided once), DPTrainer turning accelerate's
sharding switches off where it needs to (not the arguments), and the parallel package's import
graph (no cycles)."""

from __future__ import annotations

import ast
import os
import pathlib
from types import SimpleNamespace

import pytest

from hf_dp_tp.parallel import ParallelDims


def _args(tp=1, fully_shard=False, replicate=1, mesh_size=None):
    return SimpleNamespace(
        tp_size=tp, dp_fully_shard=fully_shard, dp_replicate_size=replicate, dp_mesh_size=mesh_size
    )


def test_sizes_are_validated_once_with_the_fix_named():
    with pytest.raises(ValueError, match=r"tp must be an int ≥ 1, got 0"):
        ParallelDims(dp_replicate=1, dp_shard=1, tp=0, world_size=1)
    with pytest.raises(ValueError, match=r"dp_replicate=2 × dp_shard=2 × tp=2 = 8 ranks.*has 4"):
        ParallelDims(dp_replicate=2, dp_shard=2, tp=2, world_size=4)
    with pytest.raises(ValueError, match=r"tp_size=3 must divide the world size 4"):
        ParallelDims.for_world(4, 3)
    with pytest.raises(ValueError, match=r"dp_replicate_size=3 must divide the data-parallel"):
        ParallelDims.for_world(8, 2, fsdp=True, replicas=3)
    with pytest.raises(ValueError, match=r"without FSDP"):
        ParallelDims.for_world(4, 1, replicas=2)


@pytest.mark.parametrize(
    "args, world, local, expected",
    [
        # (dp_replicate, dp_shard, tp, fsdp, hsdp, dp_size)
        (_args(tp=2), 4, 4, (2, 1, 2, False, False, 2)),  # replicated DP × TP
        (_args(tp=2, fully_shard=True), 2, 2, (1, 1, 2, True, False, 1)),  # FSDP asked, dp 1
        (_args(fully_shard=True), 4, 4, (1, 4, 1, True, False, 4)),  # FSDP over every DP rank
        (_args(tp=2, fully_shard=True, replicate=None), 8, 4, (2, 2, 2, True, True, 4)),  # hybrid
        (_args(tp=2, fully_shard=True, replicate=2, mesh_size=4), 8, 8, (2, 2, 2, True, True, 4)),
        (_args(tp=2, mesh_size=2), 4, 4, (2, 1, 2, False, False, 2)),  # config: replicas only
        (_args(), 1, 1, (1, 1, 1, False, False, 1)),  # one process
    ],
)
def test_from_args_decides_the_sizes_and_flags(args, world, local, expected):
    dims = ParallelDims.from_args(args, world, local)
    got = (
        dims.dp_replicate,
        dims.dp_shard,
        dims.tp,
        dims.fsdp_enabled,
        dims.hsdp_enabled,
        dims.dp_size,
    )
    assert got == expected
    assert dims.tp_enabled == (dims.tp > 1) and dims.dp_enabled == (dims.dp_size > 1)


@pytest.mark.parametrize(
    "args, world, local, pattern",
    [
        (_args(tp=2), 1, 1, r"tp_size=2 needs 2 processes"),
        (_args(tp=2, mesh_size=2), 2, 2, r"covers .* = 4 ranks but the launch has 2"),
        (_args(tp=3), 2, 2, r"tp_size=3 must divide the world size 2"),
        (_args(tp=4, fully_shard=True, replicate=None), 8, 2, r"tp_size must divide the proc"),
    ],
)
def test_from_args_refuses_a_launch_the_arguments_do_not_fit(args, world, local, pattern):
    with pytest.raises(ValueError, match=pattern):
        ParallelDims.from_args(args, world, local)


def test_the_arguments_only_read_accelerate_switches_and_dptrainer_turns_them_off(monkeypatch):
    """Building DPTrainingArguments leaves the environment alone; DPTrainer turns accelerate's
    FSDP switch off before anything else (before Trainer builds its Accelerator), also when it
    then refuses the run."""
    from torch import nn

    from hf_dp_tp import DPTrainer, DPTrainingArguments

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    args = DPTrainingArguments(output_dir="/tmp/unused", report_to=[], noise_multiplier=1.0)
    assert args.dp_fully_shard and os.environ["ACCELERATE_USE_FSDP"] == "true"
    with pytest.raises(ValueError, match="needs a distributed launch"):
        DPTrainer(model=nn.Linear(2, 2), args=args)  # one process: FSDP has no DP group
    assert os.environ["ACCELERATE_USE_FSDP"] == "false"


def _import_graph(package: pathlib.Path) -> dict[str, set[str]]:
    """Intra-package imports of every module under ``package``, function-level ones included."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                stem = base[: len(base) - node.level + 1] + ([node.module] if node.module else [])
                target = ".".join(stem)
            else:
                target = node.module or ""
            for candidate in [target] + [f"{target}.{a.name}" for a in node.names]:
                if candidate in modules and candidate != name:
                    graph[name].add(candidate)
    return graph


def test_the_parallel_package_has_no_import_cycle():
    """No module of hf_dp_tp.parallel reaches itself again through imports, at module or
    function level (a function-level import must not hide a cycle); the package imports nothing
    above it (LoRA, the trainer): hf_dp_tp.parallelize composes them."""
    import hf_dp_tp

    graph = _import_graph(pathlib.Path(hf_dp_tp.__file__).parent)
    parallel = {n for n in graph if n == "hf_dp_tp.parallel" or n.startswith("hf_dp_tp.parallel.")}
    for name in parallel:
        assert graph[name] <= parallel, (name, graph[name] - parallel)

    def reaches(start: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node == start:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node] - {"hf_dp_tp.parallel"})  # a submodule via its package
        return False

    cyclic = sorted(n for n in parallel - {"hf_dp_tp.parallel"} if reaches(n))
    assert not cyclic, cyclic
