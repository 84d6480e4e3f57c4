"""Checks that run on every rank and fail on every rank together.

A check that reads a per-rank file (``optimizer.rank{r}.pt``, ``rng_state_{r}.pth``) or a file
each node reads from its own disk (the privacy ledger) can fail on one rank only. If that rank
raises and the others go on, they wait in their next collective until ``ddp_timeout`` (30 min by
default) and then fail with a timeout that does not say why. :func:`fail_together` runs the check
on every rank, then the ranks agree (one all-reduce over the world group), and if it failed
anywhere every rank raises at once, with the failing ranks' reasons.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from .parallel.groups import collective_device

T = TypeVar("T")

#: Bytes of each failing rank's message that reach the others.
MESSAGE_BYTES = 4096


def _encode(err: BaseException) -> bytes:
    kind = f"{type(err).__module__}:{type(err).__qualname__}"
    return (kind + "\n" + str(err)).encode("utf-8")[:MESSAGE_BYTES]


def _decode(row: torch.Tensor) -> tuple[str, str]:
    text = bytes(row.to(torch.uint8).tolist()).rstrip(b"\0").decode("utf-8", errors="ignore")
    kind, _, message = text.partition("\n")
    return kind, message


def _exception_class(kind: str) -> type[Exception]:
    """The exception class named ``module:qualname``, if it is a builtin or one of this
    package's; RuntimeError otherwise (nothing else is imported on a peer's word)."""
    module, _, name = kind.partition(":")
    if module == "builtins" or module.split(".")[0] == __name__.split(".")[0]:
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            cls = None
        if isinstance(cls, type) and issubclass(cls, Exception):
            return cls
    return RuntimeError


def _combined(failures: list[tuple[int, str]]) -> str:
    """One message naming every failing rank; ranks with the same reason are listed together."""
    by_message: dict[str, list[int]] = {}
    for rank, message in failures:
        by_message.setdefault(message, []).append(rank)
    parts = []
    for message, ranks in by_message.items():
        label = "rank" if len(ranks) == 1 else "ranks"
        parts.append(f"[{label} {', '.join(map(str, ranks))}] {message}")
    return " | ".join(parts)


def fail_together(check: Callable[[], T], *, what: str) -> T:
    """Run ``check()`` on this rank and return its result if it succeeded on every rank.

    A collective of the default (world) group: every rank must call it, at the same point. If
    ``check`` raised on any rank, every rank raises at once an exception of the first failing
    rank's class (a builtin or hf_dp_tp class; else ``RuntimeError``) whose message names
    ``what``, the failing ranks and their reasons; the failing rank's own exception is chained.
    Without a process group (or with one rank) ``check``'s exception propagates unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return check()
    rank, world = dist.get_rank(), dist.get_world_size()
    error: Exception | None = None
    result = None
    try:
        result = check()
    except Exception as err:  # noqa: BLE001 - reported to every rank below
        error = err
    device = collective_device()
    failed = torch.zeros(world, dtype=torch.int32, device=device)
    failed[rank] = int(error is not None)
    dist.all_reduce(failed)
    failing = [r for r in range(world) if failed[r].item()]
    if not failing:
        return result
    # the reasons: each failing rank writes its row (a second all-reduce, on failure only)
    messages = torch.zeros(len(failing), MESSAGE_BYTES, dtype=torch.int32, device=device)
    if error is not None:
        encoded = _encode(error)
        row = torch.tensor(list(encoded), dtype=torch.int32, device=device)
        messages[failing.index(rank), : len(encoded)] = row
    dist.all_reduce(messages)
    decoded = [_decode(messages[i].cpu()) for i in range(len(failing))]
    cls = _exception_class(decoded[0][0])
    text = f"{what} failed on {len(failing)} of {world} ranks, so every rank stops: " + _combined(
        [(r, message) for r, (_, message) in zip(failing, decoded, strict=True)]
    )
    try:
        raised = cls(text)
    except Exception:  # noqa: BLE001 - a class that cannot be built from one message
        raised = RuntimeError(text)
    raise raised from error
