"""Process groups: start torch.distributed from the launcher's environment, bound collectives by
a timeout, tear everything down.

One job: the default process group and its timeouts. The named mesh built on top of it is
:mod:`hf_dp_tp.parallel.mesh`.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed(timeout: timedelta | None = None) -> torch.device:
    """Initialise torch.distributed from the launcher's environment (torchrun, accelerate) and
    return this process's device: NCCL with one GPU per process when the node has at least as
    many GPUs as local processes, otherwise gloo on CPU with the cores split between them.

    ``timeout`` bounds every collective on the default group (torch's default otherwise: 30 min
    for gloo, 10 min for NCCL): a rank that stops responding makes the others fail after it."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    kwargs = {} if timeout is None else {"timeout": timeout}
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", **kwargs)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        dist.init_process_group("gloo", **kwargs)
    return device


def collective_device_type(group: dist.ProcessGroup | None = None) -> str:
    """``"cuda"`` when ``group`` (default: the default group) runs NCCL — alone or beside gloo,
    as accelerate sets ``"cuda:nccl,cpu:gloo"`` up for some FSDP configs —, else ``"cpu"``: the
    device a mesh over it, and the tensors of its collectives, live on."""
    return "cuda" if "nccl" in str(dist.get_backend(group)) else "cpu"


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device of the tensors a collective on ``group`` takes: this rank's current CUDA
    device under NCCL (:func:`collective_device_type`), else the CPU. The one place that
    choice is made."""
    if collective_device_type(group) == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def set_collective_timeout(timeout: timedelta, group: dist.ProcessGroup | None = None) -> None:
    """Bound every later collective on ``group`` (default: the default group) by ``timeout``.

    Sub-groups (``new_group``, a ``DeviceMesh``'s dims) do not inherit the default group's
    timeout, and accelerate does not pass ``ddp_timeout`` on to CPU (gloo) runs; this sets it
    after the fact."""
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if setter is not None:
        setter(timeout, group)


def destroy_process_groups(timeout: timedelta = timedelta(seconds=60)) -> None:
    """Tear torch.distributed down (the mesh's sub-groups included); a no-op if it is not up.

    Under gloo every rank first waits for its peers (bounded by ``timeout``, so a rank left behind
    by a failed peer still exits): a rank tearing gloo down while another still completes the last
    collective aborts one of them ("terminate called without an active exception")."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=timeout)
        except RuntimeError:
            pass
    dist.destroy_process_group()
