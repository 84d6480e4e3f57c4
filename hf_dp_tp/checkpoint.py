"""Files a DP run reads and writes besides the full model: the ledger, per-rank optimizer state,
sharded models (FSDP) and sharded resumes, and the opt-in secrets file.

What is at rest matters for privacy (docs/usage.md, "Checkpointing the privacy ledger"):

- checkpoints hold the privacy ledger (accountant history, σ, q, step counts) and never a seed,
  a key or a generator state from which the noise or the Poisson batches could be rebuilt;
- optimizer state is loaded with ``weights_only=True`` (a checkpoint cannot run code);
- the only file that may hold a secret is the *secrets file* a user asks for explicitly to replay
  a run bit for bit. It must lie outside ``output_dir`` (which ``push_to_hub`` uploads), is
  created with mode 0600, and is read back only when it is still private (owned by the user,
  no group/other access), as ssh treats a private key.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import warnings
from typing import Any

import torch
from torch import nn

LEDGER_NAME = "dp_ledger.json"
REPORT_NAME = "privacy_report.json"
OPTIMIZER_RANK_NAME = "optimizer.rank{rank}.pt"
TRAINER_STATE_NAME = "trainer_state.json"
SHARDED_MODEL_DIR = "pytorch_model_fsdp_0"  # the folder name accelerate gives FSDP shards


# ---------------------------------------------------------------------- ledger
def write_ledger(checkpoint_dir: str, ledger: dict[str, Any]) -> None:
    with open(os.path.join(checkpoint_dir, LEDGER_NAME), "w") as f:
        json.dump(ledger, f)


def checkpoint_global_step(checkpoint_dir: str) -> int:
    """The global step recorded by Trainer in ``trainer_state.json`` of a checkpoint."""
    path = os.path.join(checkpoint_dir, TRAINER_STATE_NAME)
    try:
        with open(path) as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"cannot read the global step of checkpoint {checkpoint_dir} from {path} ({err}): "
            "resume only from complete DPTrainer checkpoints."
        ) from None


# ---------------------------------------------------------------------- sharded model (FSDP)
def save_sharded_model(model: nn.Module, checkpoint_dir: str) -> None:
    """Every rank writes its own shards of ``model``'s state dict (DTensors: FSDP and TP shards)
    with ``torch.distributed.checkpoint`` under ``checkpoint_dir/pytorch_model_fsdp_0``: nothing
    is gathered, no rank holds the full model. A collective: every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    dcp.save(
        get_model_state_dict(model), checkpoint_id=os.path.join(checkpoint_dir, SHARDED_MODEL_DIR)
    )


def has_sharded_model(checkpoint_dir: str) -> bool:
    return os.path.isdir(os.path.join(checkpoint_dir, SHARDED_MODEL_DIR))


def load_sharded_model(model: nn.Module, checkpoint_dir: str) -> None:
    """Load the shards :func:`save_sharded_model` wrote into ``model`` (sharded the same way or
    differently: ``torch.distributed.checkpoint`` reads each rank's slices). A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = get_model_state_dict(model)
    dcp.load(state, checkpoint_id=os.path.join(checkpoint_dir, SHARDED_MODEL_DIR))
    set_model_state_dict(model, state)


# ---------------------------------------------------------------------- optimizer state
def save_rank_optimizer(checkpoint_dir: str, rank: int, state: dict[str, Any]) -> None:
    os.makedirs(checkpoint_dir, exist_ok=True)
    torch.save(state, os.path.join(checkpoint_dir, OPTIMIZER_RANK_NAME.format(rank=rank)))


def rank_optimizer_files(checkpoint_dir: str) -> int:
    """How many per-rank optimizer files (``optimizer.rank*.pt``) ``checkpoint_dir`` holds."""
    prefix, suffix = OPTIMIZER_RANK_NAME.split("{rank}")
    try:
        names = os.listdir(checkpoint_dir)
    except OSError:
        return 0
    return sum(
        1
        for name in names
        if name.startswith(prefix)
        and name.endswith(suffix)
        and name[len(prefix) : -len(suffix)].isdigit()
    )


def load_rank_optimizer(checkpoint_dir: str, rank: int) -> dict[str, Any] | None:
    """This rank's optimizer state, or None when the checkpoint has none. Loaded with
    ``weights_only=True``: a file that needs arbitrary unpickling is refused, never executed."""
    path = os.path.join(checkpoint_dir, OPTIMIZER_RANK_NAME.format(rank=rank))
    if not os.path.isfile(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except UNSAFE_LOAD_ERRORS as err:
        raise unsafe_load_refusal(path, err) from None


#: What ``torch.load(..., weights_only=True)`` raises for a file it will not unpickle.
UNSAFE_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError)


def unsafe_load_refusal(path: str, err: BaseException) -> ValueError:
    """The error for a checkpoint file that ``torch.load(weights_only=True)`` refused: names the
    file and the offending global (not torch's advice to load it with ``weights_only=False``)."""
    reason = next(
        (line.strip() for line in str(err).splitlines() if "Unsupported global" in line),
        str(err).splitlines()[0] if str(err) else type(err).__name__,
    )
    return ValueError(
        f"refusing to load {path}: it is not plain tensor/optimizer state and loading it "
        f"would run code from the checkpoint ({reason}). Resume from a checkpoint written by "
        "DPTrainer."
    )


# ---------------------------------------------------------------------- sharded weights
def load_full_checkpoint_into_sharded(
    model: nn.Module, checkpoint_dir: str, adapter_name: str | None = None
) -> None:
    """Load an unsharded safetensors checkpoint into a TP-sharded model: each rank copies its own
    slice of every DTensor entry. With ``adapter_name``, the checkpoint is a peft adapter
    (``adapter_model.safetensors``, names without the adapter name) and only its entries load."""
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor, distribute_tensor

    names = sorted(n for n in os.listdir(checkpoint_dir) if n.endswith(".safetensors"))
    wanted = [n for n in names if ("adapter" in n) == (adapter_name is not None)]
    if not wanted:
        raise ValueError(f"no safetensors weights to resume from in {checkpoint_dir}")
    full: dict[str, torch.Tensor] = {}
    for name in wanted:
        full.update(load_file(os.path.join(checkpoint_dir, name)))
    loaded = 0
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            key = name.replace(f".{adapter_name}.", ".") if adapter_name else name
            if key not in full:
                continue
            source = full[key]
            if isinstance(tensor, DTensor):
                local = distribute_tensor(
                    source.to(tensor.dtype),
                    tensor.device_mesh,
                    tensor.placements,
                    src_data_rank=None,
                ).to_local()
                tensor.to_local().copy_(local)
            else:
                tensor.copy_(source.to(dtype=tensor.dtype, device=tensor.device))
            loaded += 1
    if loaded < len(full):
        raise ValueError(
            f"{checkpoint_dir}: only {loaded} of {len(full)} saved tensors match the model's "
            "parameters; resume with the same model and adapter configuration."
        )


# ---------------------------------------------------------------------- the secrets file
def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def check_secrets_file_location(path: str, output_dir: str | None) -> None:
    """The secrets file must not lie under ``output_dir`` (checkpoints, pushes to the Hub)."""
    if output_dir and _inside(path, output_dir):
        raise ValueError(
            f"dp_secrets_file={path!r} lies inside output_dir={output_dir!r}, which holds "
            "checkpoints that may be shared or pushed to the Hub: with two checkpoints the seed "
            "subtracts the noise. Put it outside output_dir, somewhere only you can read."
        )


def _refuse_secrets_file(path: str, problem: str, *, fix: str | None = None) -> ValueError:
    fix = fix or (
        f"If you wrote it yourself, make it yours and private (chown $USER {path}; chmod 600 "
        f"{path}); otherwise delete it, and a fresh secret is drawn (and stored there, mode 0600)"
    )
    return ValueError(
        f"refusing to use dp_secrets_file {path}: {problem}. Whoever could write it chose this "
        "run's Poisson batches and noise, and whoever could read it can subtract the noise. "
        f"{fix}."
    )


def _check_private(path: str, info: os.stat_result, what: str) -> None:
    """``info`` (of ``path`` or of the file it links to) must be owned by this user and neither
    readable nor writable by group or others, as ssh demands of a private key."""
    uid = os.getuid()
    if info.st_uid != uid:
        raise _refuse_secrets_file(
            path, f"{what} is owned by uid {info.st_uid}, not by you ({uid})"
        )
    mode = stat.S_IMODE(info.st_mode)
    if what != "the symlink" and mode & 0o077:  # a symlink's own mode means nothing
        raise _refuse_secrets_file(
            path, f"{what} has mode {mode:04o}: group or others can read or write it"
        )


def _degenerate(secret: int | bytes) -> bool:
    """A key whose bytes are all equal (all zeros, say), or a seed of 0: never drawn from
    ``os.urandom`` in practice, typical of a hand-written or planted file."""
    if isinstance(secret, bytes):
        return len(set(secret)) <= 1
    return secret == 0


def read_secrets_file(path: str, *, secure_mode: bool) -> int | bytes | None:
    """The seed (seeded mode) or key (secure mode) stored in ``path``; None if it does not exist.

    The file is trusted only as ssh trusts a private key: it (and, for a symlink, the link
    itself) must be owned by the current user, and the file must be a regular file not readable
    or writable by group or others (mode ``0600`` or stricter). The checks are made on the open
    file, so what is checked is what is read. A key of identical bytes (e.g. all zeros) or a
    seed of 0 is refused too. Otherwise a ``ValueError`` says what is wrong and how to fix it
    (``chmod 600``, or delete the file to draw fresh secrets).
    """
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(link.st_mode):
        _check_private(path, link, "the symlink")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise _refuse_secrets_file(path, "it is a symlink to a missing file") from None
    except OSError as err:
        raise ValueError(f"dp_secrets_file {path} is unreadable ({err}).") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _refuse_secrets_file(path, "it is not a regular file")
        _check_private(path, info, "the file it links to" if stat.S_ISLNK(link.st_mode) else "it")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd) as f:
        try:
            data = json.load(f)
            mode = data["mode"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"dp_secrets_file {path} is unreadable or corrupt ({err}).") from None
    expected = "secure" if secure_mode else "seeded"
    if mode != expected:
        raise ValueError(
            f"dp_secrets_file {path} holds a {mode!r} secret but this run is {expected!r} "
            "(secure_mode must match the run that wrote it)."
        )
    try:
        secret: int | bytes = bytes.fromhex(data["key"]) if secure_mode else int(data["seed"])
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"dp_secrets_file {path} is unreadable or corrupt ({err}).") from None
    if _degenerate(secret):
        raise _refuse_secrets_file(
            path,
            "its secret is degenerate (all bytes equal, or a seed of 0), never a drawn one",
            fix="Delete it, and a fresh secret is drawn (and stored there, mode 0600)",
        )
    return secret


def write_secrets_file(path: str, secret: int | bytes) -> None:
    """Create ``path`` with mode 0600 holding the seed or key (never overwrites a file)."""
    if isinstance(secret, bytes):
        data = {"mode": "secure", "key": secret.hex()}
    else:
        data = {"mode": "seeded", "seed": int(secret)}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    warnings.warn(
        f"the DP seed/key of this run is stored in {path} (mode 0600) so it can be replayed. "
        "Whoever can read it and two checkpoints can subtract the noise and rebuild every batch: "
        "keep it private and delete it when replay is no longer needed.",
        stacklevel=2,
    )


# ---------------------------------------------------------------------- resume
#: ``resume_from_checkpoint`` strings that mean "the latest checkpoint in output_dir" (a flag
#: given on the command line arrives as a string).
LATEST_CHECKPOINT_WORDS = ("true", "latest")


def checkpoints_in(directory: str) -> list[str]:
    """The ``checkpoint-N`` folders of ``directory``, oldest first."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        step = name[len(PREFIX_CHECKPOINT_DIR) + 1 :]
        if name.startswith(PREFIX_CHECKPOINT_DIR + "-") and step.isdigit():
            if os.path.isdir(os.path.join(directory, name)):
                found.append((int(step), name))
    return [os.path.join(directory, name) for _, name in sorted(found)]


def resolve_resume_path(resume: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint folder ``resume_from_checkpoint`` names, checked before anything is loaded:
    ``True`` (or the strings ``"true"`` / ``"latest"``, as a command-line flag arrives) is the
    latest ``checkpoint-N`` in ``output_dir``; a path must exist. Refusals list the checkpoints
    found in ``output_dir``."""
    if resume is None or resume is False:
        return None
    latest = resume is True or (
        isinstance(resume, str)
        and not os.path.exists(resume)
        and resume.strip().lower() in LATEST_CHECKPOINT_WORDS
    )
    found = checkpoints_in(output_dir)
    listing = ", ".join(os.path.basename(p) for p in found) or "none"
    if latest:
        if not found:
            raise ValueError(
                f"resume_from_checkpoint={resume!r} resumes the latest checkpoint in output_dir "
                f"{output_dir}, but it has none (checkpoint-N folders found: {listing})."
            )
        return found[-1]
    path = str(resume)
    if not os.path.isdir(path):
        raise ValueError(
            f"resume_from_checkpoint={path!r} does not exist (or is not a folder). Checkpoints "
            f"in output_dir {output_dir}: {listing}. Pass one of them, or True for the latest."
        )
    return path
