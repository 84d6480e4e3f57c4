"""Multi-process test harness: spawn ``world_size`` ranks, run a function on each, collect results.

Follows the usual multi-GPU test pattern: ``setup()`` initialises the default process group with
``init_method="env://"`` on a free port, ``cleanup()`` destroys it. NCCL with one GPU per rank is used
when enough GPUs exist, gloo on CPU otherwise, so the same tests run in CI.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def backend_for(world_size: int) -> str:
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def device_type_for(world_size: int) -> str:
    return "cuda" if backend_for(world_size) == "nccl" else "cpu"


def setup(rank: int, world_size: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    backend = backend_for(world_size)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    setup(rank, world_size, port)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        cleanup()
    # The result is on disk. Leave without interpreter teardown: gloo's worker threads, still
    # referenced by meshes the test built, can abort the process (SIGABRT) while being destroyed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return each rank's result.

    ``fn`` must be a module-level function (it is pickled into the children). Any exception in a
    rank fails the caller with that rank's traceback.
    """
    port = find_free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.spawn(
                _worker, args=(world_size, port, out_dir, fn, args), nprocs=world_size, join=True
            )
        except Exception as exc:
            errors = []
            for rank in range(world_size):
                path = os.path.join(out_dir, f"rank{rank}.err")
                if os.path.exists(path):
                    with open(path) as f:
                        errors.append(f"--- rank {rank} ---\n{f.read()}")
            raise AssertionError("distributed test failed:\n" + "\n".join(errors)) from exc
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]


# --------------------------------------------------------------------------- launched scripts
ROOT = Path(__file__).resolve().parents[1]


def script_env(**extra: str) -> dict[str, str]:
    """The environment of a script launched from a test: the repo importable, one thread per
    process (2 processes share the 2 CI cores)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def torchrun_command(script: str | Path, *args: str, nproc: int = 2) -> list[str]:
    """``torchrun --standalone`` (it picks a free port itself) on ``nproc`` local processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        str(script),
        *args,
    ]


def run_on_two_local_nodes(target: list[str], nproc_per_node: int = 2, timeout: int = 300) -> str:
    """The multi-node launch on one machine: two ``torchrun --nnodes 2`` launchers (one per
    "node", ``nproc_per_node`` processes each) rendezvous over c10d on a free localhost port and
    run ``target`` (a script and its arguments, or ``-m module ...``) from the repo root; fail
    with their output unless both exit 0. Returns node 0's stdout."""
    port = find_free_port()
    launchers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                *("--nnodes", "2", "--node-rank", str(node)),
                *("--nproc-per-node", str(nproc_per_node)),
                *("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"),
                *("--rdzv-id", f"two-nodes-{port}"),
                *target,
            ],
            cwd=ROOT,
            env=script_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [launcher.communicate(timeout=timeout) for launcher in launchers]
    for launcher, (out, err) in zip(launchers, outputs, strict=True):
        assert launcher.returncode == 0, out[-3000:] + err[-3000:]
    return outputs[0][0]


def run_script(
    cmd: list[str], env: dict[str, str] | None = None, timeout: int = 420, *, quiet: bool = False
) -> str:
    """Run ``cmd`` from the repo root; fail with the tail of its output unless it exits 0.
    Returns its stdout. ``quiet``: also fail if its stderr has a warning (see
    :func:`warning_lines`)."""
    done = subprocess.run(
        cmd, env=env or script_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    if quiet:
        assert not warning_lines(done.stderr), "\n".join(warning_lines(done.stderr))
    return done.stdout


def warning_lines(stderr: str) -> list[str]:
    """Lines of a script's stderr that are warnings: Python ``warnings`` (``...Warning: ...``) and
    torch's logged ones (``W1208 02:13:23.646000 ...``, with an optional ``[rankN]:`` prefix)."""
    pattern = re.compile(r"\w+Warning: |^(\[rank\d+\]:)?W\d{4} \d")
    return [line for line in stderr.splitlines() if pattern.search(line)]
