"""Sample independence: replacing one record must not change any other sample's loss, gradient
or output (docs/usage.md, "Samples must not mix").

Per-sample clipping bounds a record's influence on the clipped sum by ``2C`` only if every other
sample's gradient ignores that record. A module that computes statistics across the batch
(BatchNorm, batch centering, ``F.batch_norm``, a norm that looks at the batch), a sequence-first
model whose "rows" along dim 0 are time steps, or a per-sample loss with the batch inside
(in-batch contrastive losses) breaks that, whatever its class. So rather than a list of classes,
this module *measures* it: run the computation on a probe batch of ``≥ 4`` rows, run it again with
row 0 replaced, and compare every other row — per-sample losses, per-sample gradient norms per
parameter (:func:`~hf_dp_tp.ghost.squared_norms_of`, which works for materialised and factored
per-sample gradients), or the model outputs when no loss is known. Both runs start from the same
RNG state (dropout masks coincide) and buffers; the global RNG and the buffers are restored after.
When rows differ, forward hooks on every submodule locate the first module (in execution order)
whose output rows ``i ≥ 1`` changed while its input rows ``i ≥ 1`` did not; with no such module,
the per-sample loss (or its backward) is named.

Two entry points: :func:`check_per_sample_losses_and_gradients` (``DPTrainer``'s first training
micro-batch, on a synthetic probe from :func:`synthetic_probe`) and :func:`check_forward`
(:class:`~hf_dp_tp.GradSampleControllerTP`'s first train-mode forward, on the caller's inputs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .ghost import squared_norms_of
from .grad_samplers import UnsupportedLayoutError
from .parallel.groups import collective_device

#: Rows of a probe batch: ≥ 4, so that mixing that only starts above two samples shows.
PROBE_ROWS = 4
#: Per-row scales of synthetic float inputs (very different, so scale-dependent mixing shows).
ROW_SCALES = (1.0, 10.0, 0.1, 100.0)
#: Relative tolerance on rows i ≥ 1 (fp32/fp64 rounding: rows of identical shapes are computed
#: identically; MoE expert batches and GPU atomics leave ~1e-6). Mixing moves them by O(1).
TOLERANCE = 1e-3
#: The same in half precision.
HALF_TOLERANCE = 3e-2


class SampleMixingError(UnsupportedLayoutError):
    """One sample's loss, gradient or output depends on another sample of the batch."""


def tolerance_for(half: bool) -> float:
    return HALF_TOLERANCE if half else TOLERANCE


def is_half(*dtypes: torch.dtype) -> bool:
    return any(d in (torch.float16, torch.bfloat16) for d in dtypes)


# --------------------------------------------------------------------------- side effects
def _dtensor_rng_tracker():
    try:
        from torch.distributed.tensor import _random
    except ImportError:  # pragma: no cover - DTensor is always there in supported torch
        return None
    return getattr(_random, "_rng_tracker", None)


@dataclass
class _Replay:
    """Rewinds every RNG to one snapshot and restores the module's buffers."""

    module: nn.Module
    devices: list[int]
    buffers: list[tuple[dict, str, torch.Tensor, torch.Tensor]]
    cpu: torch.Tensor
    cuda: list[torch.Tensor]
    dtensor: dict[str, torch.Tensor] | None

    def __call__(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in zip(self.devices, self.cuda, strict=True):
            torch.cuda.set_rng_state(state, device)
        tracker = _dtensor_rng_tracker()
        if self.dtensor is not None and tracker is not None:
            for name, state in self.dtensor.items():
                tracker.rng_states[name] = state.clone()
        with torch.no_grad():
            for owner, name, original, saved in self.buffers:
                owner[name] = original
                if original.shape == saved.shape:
                    original.copy_(saved)
                else:  # pragma: no cover - a buffer resized in place
                    owner[name] = saved.clone()


def _cuda_devices(module: nn.Module, tensors: list[torch.Tensor]) -> list[int]:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    devices = {t.device.index for t in tensors if t.device.type == "cuda"}
    devices |= {p.device.index for p in module.parameters() if p.device.type == "cuda"}
    devices.discard(None)
    return sorted(devices) or [torch.cuda.current_device()]


@contextmanager
def isolated(module: nn.Module, tensors: list[torch.Tensor] = ()) -> Iterator[_Replay]:
    """Yield a ``replay()`` that rewinds the CPU, CUDA and DTensor RNGs to their state at entry
    and restores ``module``'s buffers; at exit both are as at entry (the probe leaves no trace:
    the global RNG has not advanced, BatchNorm running statistics are unchanged)."""
    devices = _cuda_devices(module, list(tensors))
    buffers = []
    for sub in module.modules():
        for name, b in sub._buffers.items():
            if b is not None:
                buffers.append((sub._buffers, name, b, b.detach().clone()))
    tracker = _dtensor_rng_tracker()
    states = getattr(tracker, "rng_states", None)
    dtensor = {k: v.clone() for k, v in states.items()} if isinstance(states, dict) else None
    with torch.random.fork_rng(devices=devices):
        replay = _Replay(
            module,
            devices,
            buffers,
            torch.get_rng_state(),
            [torch.cuda.get_rng_state(d) for d in devices],
            dtensor,
        )
        try:
            yield replay
        finally:
            replay()


# --------------------------------------------------------------------------- rows
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def batch_tensors(value: Any, rows: int) -> list[torch.Tensor]:
    """The tensors with ``rows`` rows along dim 0 inside ``value`` (tensors, mappings, lists,
    tuples, dataclass-like model outputs), in a fixed order."""
    out: list[torch.Tensor] = []

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            if v.ndim > 0 and v.shape[0] == rows:
                out.append(_local(v))
        elif isinstance(v, Mapping):
            for key in v:
                walk(v[key])
        elif isinstance(v, (list, tuple)):
            for item in v:
                walk(item)

    walk(value)
    return out


def row_digest(t: torch.Tensor) -> torch.Tensor:
    """``[rows, 2]`` float64: ``Σ|x|`` and ``Σ x·w`` per row (``w`` fixed, ``|w| ≤ 1``), over
    finite values — a cheap fingerprint whose change is told apart from rounding by
    :func:`rows_differ`."""
    x = t.detach()
    if not (x.is_floating_point() or x.is_complex()):
        x = x.to(torch.float64)
    x = x.flatten(1) if x.ndim > 1 else x.unsqueeze(1)  # flatten: B may be 0
    x = torch.nan_to_num(x.to(torch.float64), 0.0, 0.0, 0.0)
    w = torch.sin(torch.arange(1, x.shape[1] + 1, device=x.device, dtype=torch.float64))
    return torch.stack([x.abs().sum(1), x @ w], 1)


def rows_differ(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> bool:
    """Whether rows ``i ≥ 1`` of two :func:`row_digest` results differ beyond rounding."""
    a, b = a[1:], b[1:]
    if a.shape != b.shape:
        return True
    scale = torch.maximum(a[:, :1], b[:, :1])
    return bool(((a - b).abs() > tolerance * scale).any())


def _digests(value: Any, rows: int) -> list[torch.Tensor]:
    return [row_digest(t) for t in batch_tensors(value, rows)]


def _any_differ(a: list[torch.Tensor], b: list[torch.Tensor], tolerance: float) -> bool:
    if len(a) != len(b):
        return True
    return any(rows_differ(x, y, tolerance) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- the culprit
def _describe(name: str, module: nn.Module) -> str:
    from .grad_samplers import module_class

    return f"module '{name or '<root>'}' ({module_class(module).__name__})"


@contextmanager
def _tracing(model: nn.Module, rows: int, calls: list) -> Iterator[None]:
    """Record, for every submodule call in completion order, the digests of its inputs' and
    outputs' rows."""
    pending: dict[int, list] = {}
    handles = []

    def pre(name, module, args, kwargs):
        pending.setdefault(id(module), []).append(_digests((args, kwargs), rows))

    def post(name, module, args, kwargs, output):
        stack = pending.get(id(module))
        inputs = stack.pop() if stack else []
        calls.append((name, module, inputs, _digests(output, rows)))

    from functools import partial

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(partial(pre, name), with_kwargs=True))
            handles.append(module.register_forward_hook(partial(post, name), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def locate(
    model: nn.Module,
    run: Callable[[Any], Any],
    probe: Any,
    neighbour: Any,
    rows: int,
    replay: Callable[[], None],
    tolerance: float,
) -> str | None:
    """The first module (in execution order) whose output rows ``i ≥ 1`` differ between ``run
    (probe)`` and ``run(neighbour)`` while its input rows ``i ≥ 1`` do not; None if no module
    call does. Runs both forwards under ``torch.no_grad()``."""
    traces: list[list] = []
    for batch in (probe, neighbour):
        calls: list = []
        replay()
        with torch.no_grad(), _tracing(model, rows, calls):
            run(batch)
        traces.append(calls)
    replay()
    for (name, module, in_a, out_a), (_, _, in_b, out_b) in zip(*traces, strict=False):
        if not _any_differ(in_a, in_b, tolerance) and _any_differ(out_a, out_b, tolerance):
            return _describe(name, module)
    return None


def _agree(flag: int, group: dist.ProcessGroup | None | bool) -> int:
    """The largest ``flag`` over ``group`` (``True``: every rank), so that all ranks that ran
    the probe in lockstep decide alike; no collective without a process group."""
    if group is False or group is None or not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([flag], dtype=torch.int64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=None if group is True else group)
    return int(t.item())


_WHY = (
    "per-sample clipping bounds a record's influence only if no sample's loss or gradient "
    'depends on another sample (docs/usage.md, "Samples must not mix").'
)


def _module_error(culprit: str, what: str) -> SampleMixingError:
    return SampleMixingError(
        f"{culprit} mixes samples: replacing one record of a probe batch changed the {what} of "
        f"other samples; {_WHY} Replace it with a per-sample computation (e.g. nn.LayerNorm or "
        "nn.GroupNorm instead of batch statistics, or the batch as dim 0 instead of a "
        "sequence-first layout), or freeze it in eval() mode if it only mixes in train mode."
    )


# --------------------------------------------------------------------------- trainer level
def synthetic_probe(
    example: Mapping[str, Any],
    *,
    vocab_size: int | None = None,
    causal_lm: bool = False,
    rows: int = PROBE_ROWS,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(probe, neighbour)``: a batch of ``rows`` synthetic records with the keys, dtypes and
    trailing shapes of ``example`` (one collated record), and the same batch with row 0
    replaced. No value of the record is used except as a range: ``*mask*`` keys are ones;
    ``input_ids`` / ``decoder_input_ids`` are random in ``[0, vocab_size)``; ``labels`` of a
    causal LM copy ``input_ids``; ``*position*`` keys copy the record's row; other integer
    tensors draw from the record's own values; float tensors are normal with row scales
    :data:`ROW_SCALES`. Built with a fixed-seed generator: identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    draws = rows + 1  # the last row replaces row 0 in the neighbour
    scales = torch.tensor([*ROW_SCALES, 30.0][:draws] + [1.0] * max(0, draws - 5))
    full: dict[str, Any] = {}
    for key, value in example.items():
        if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != 1:
            full[key] = value
            continue
        shape = (draws, *value.shape[1:])
        lower = key.lower()
        if "mask" in lower:
            new = torch.ones(shape, dtype=value.dtype)
        elif "position" in lower:
            new = value.cpu().expand(shape).clone()
        elif value.is_floating_point():
            new = torch.randn(shape, generator=g, dtype=torch.float32)
            new = (new * scales.view(-1, *[1] * (len(shape) - 1))).to(value.dtype)
        elif value.dtype == torch.bool:
            new = torch.ones(shape, dtype=torch.bool)
        elif key in ("input_ids", "decoder_input_ids") and vocab_size:
            new = torch.randint(0, vocab_size, shape, generator=g).to(value.dtype)
        else:
            pool = value.reshape(-1).cpu()
            new = (
                pool[torch.randint(0, pool.numel(), shape, generator=g)]
                if pool.numel()
                else (torch.zeros(shape, dtype=value.dtype))
            )
        full[key] = new.to(value.device)
    ids = full.get("input_ids")
    labels = example.get("labels")
    if (
        causal_lm
        and isinstance(ids, torch.Tensor)
        and isinstance(labels, torch.Tensor)
        and labels.shape == example["input_ids"].shape
    ):
        full["labels"] = ids.clone().to(labels.dtype)

    def take(index: list[int]) -> dict[str, Any]:
        return {
            k: v[index] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == draws else v
            for k, v in full.items()
        }

    return take(list(range(rows))), take([rows, *range(1, rows)])


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def check_per_sample_losses_and_gradients(
    model: nn.Module,
    controller,
    per_sample_loss: Callable[[nn.Module, Mapping[str, Any]], tuple[torch.Tensor, Any]],
    probe: Mapping[str, Any],
    neighbour: Mapping[str, Any],
    *,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    forward_context: Callable[[], Any] = nullcontext,
    group: dist.ProcessGroup | None | bool = True,
    half: bool = False,
) -> None:
    """Run ``per_sample_loss`` and its backward (with the controller's hooks) on ``probe`` and on
    ``neighbour`` (row 0 replaced): every other row's per-sample loss and per-sample squared
    gradient norm, per parameter (local pieces under TP/FSDP), must be unchanged. Every rank of
    ``group`` (``True``: all ranks) must call it at the same time: it runs 2 forward/backward
    passes (4 more forwards, under ``no_grad``, to locate a culprit) and one all-reduce of a flag.
    Per-sample gradients, raw gradients, buffers and the RNG are left as they were.

    Raises:
        SampleMixingError: naming the first module whose output rows changed while its input
            rows did not, or else the per-sample loss function (or its backward).
    """
    rows = next(v.shape[0] for v in probe.values() if isinstance(v, torch.Tensor) and v.ndim > 0)
    tolerance = tolerance_for(half)
    params = _trainable(model)
    saved_grads = [(p, p.grad) for _, p in params]
    for p, _ in saved_grads:
        p.grad = None
    tensors = [v for v in probe.values() if isinstance(v, torch.Tensor)]
    results = []
    try:
        with isolated(model, tensors) as replay:
            for batch in (probe, neighbour):
                replay()
                try:
                    with forward_context():
                        losses, _ = per_sample_loss(model, batch)
                    controller.check_batch_size(losses.shape[0])
                except SampleMixingError:
                    raise
                except UnsupportedLayoutError as err:  # say where the batch size comes from
                    raise UnsupportedLayoutError(
                        f"{err} (raised on the {rows}-sample synthetic probe of the "
                        "sample-independence check, before the first training step)"
                    ) from err
                if tuple(losses.shape) != (rows,):
                    raise ValueError(
                        f"the per-sample loss returned shape {tuple(losses.shape)} for a batch of "
                        f"{rows} samples; it must return one loss per sample."
                    )
                backward(losses.mean())
                norms = {
                    name: squared_norms_of(p.grad_sample).detach().double()
                    for name, p in params
                    if getattr(p, "grad_sample", None) is not None
                }
                controller.zero_grad_sample()
                for p, _ in saved_grads:
                    p.grad = None
                results.append((losses.detach().double(), norms))
            flag = _compare(results, tolerance)
            flag = _agree(flag, group)
            if flag == 0:
                return
            culprit = None
            with controller.hooks_disabled():
                culprit = locate(
                    model,
                    lambda b: per_sample_loss(model, b),
                    probe,
                    neighbour,
                    rows,
                    replay,
                    tolerance,
                )
    finally:
        controller.zero_grad_sample()
        for p, grad in saved_grads:
            p.grad = grad
    if culprit is not None:
        raise _module_error(culprit, "outputs, losses and gradients")
    name = getattr(per_sample_loss, "__qualname__", type(per_sample_loss).__name__)
    if flag == 2:
        raise SampleMixingError(
            f"the per-sample loss {name} mixes samples: replacing one record of a probe batch "
            f"changed the losses of other samples while the model outputs of those samples did "
            f"not change; {_WHY} Each sample's loss must depend on that sample only (no in-batch "
            "negatives, batch-wide normalisation or token counts)."
        )
    raise SampleMixingError(
        "per-sample gradients mix samples: replacing one record of a probe batch changed the "
        "per-sample gradients of other samples while their losses did not change (a custom "
        f"autograd function, a gradient hook, or a batch that is not dim 0 of every module "
        f"input); {_WHY}"
    )


def _compare(results: list, tolerance: float) -> int:
    """0: rows i ≥ 1 agree; 2: their losses differ; 1: only their gradients differ."""
    (la, na), (lb, nb) = results
    scale = torch.maximum(la.abs(), lb.abs()).mean().clamp_min(1e-30)
    limit = tolerance * torch.maximum(torch.maximum(la.abs(), lb.abs()), 1e-3 * scale)
    if bool(((la - lb).abs() > limit)[1:].any()):
        return 2
    if set(na) != set(nb):
        return 1
    total = sum(torch.maximum(na[k], nb[k]) for k in na) if na else None
    for key in na:
        a, b = na[key][1:], nb[key][1:]
        bound = tolerance * (torch.maximum(a, b) + tolerance * total[1:])
        if bool(((a - b).abs() > bound).any()):
            return 1
    return 0


# --------------------------------------------------------------------------- engine level
def _probe_rows(value: Any, batch: int, index: torch.Tensor) -> Any:
    """``value`` with every tensor of ``batch`` rows along dim 0 cut/tiled to ``index``."""
    if isinstance(value, torch.Tensor):
        if value.ndim > 0 and value.shape[0] == batch:
            return value.detach()[index.to(value.device)]
        return value
    if isinstance(value, dict):
        return {k: _probe_rows(v, batch, index) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_probe_rows(v, batch, index) for v in value)
    return value


def _replace_row0(value: Any, rows: int, key: str = "") -> Any:
    """A copy of ``value`` whose tensors of ``rows`` rows have row 0 replaced by another valid
    record: floats ``-7x + 3``; integers ``(x + 1) mod (max + 1)`` on non-negative entries (ids
    stay in range, ``-100`` labels stay); masks (``*mask*`` keys, bool) unchanged."""
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 or value.shape[0] != rows or rows == 0 or "mask" in key.lower():
            return value
        if value.dtype == torch.bool:
            return value
        out = value.clone()
        if value.is_floating_point():
            out[0] = value[0] * -7 + 3
        elif not value.is_complex():
            top = int(value.max())
            if top > 0:
                out[0] = torch.where(value[0] >= 0, (value[0] + 1) % (top + 1), value[0])
        return out
    if isinstance(value, dict):
        return {k: _replace_row0(v, rows, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_replace_row0(v, rows, key) for v in value)
    return value


def _has_cache(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_cache(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_cache(v) for v in value)
    return type(value).__name__.endswith("Cache")


def check_forward(
    module: nn.Module,
    forward: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    batch: int,
    *,
    group: dist.ProcessGroup | None | bool = None,
) -> bool:
    """Run ``forward(*args, **kwargs)`` under ``torch.no_grad()`` on the caller's inputs cut or
    tiled to :data:`PROBE_ROWS` rows (every tensor whose dim 0 is ``batch``), once as is and once
    with row 0 replaced: output rows ``i ≥ 1`` (every output tensor with that many rows) must
    agree. Returns False when it cannot check (inputs hold a KV cache: it would be mutated);
    with ``batch == 0`` the two forwards still run (FSDP's collectives) and nothing is compared.
    RNG and buffers are restored. Every rank of ``group`` must call it together.

    Raises:
        SampleMixingError: naming the first module whose output rows changed while its input
            rows did not (else the model).
    """
    if _has_cache((args, kwargs)):
        return False
    rows = PROBE_ROWS if batch > 0 else 0
    index = torch.arange(rows) % max(batch, 1)
    probe = _probe_rows((args, kwargs), batch, index)
    neighbour = _replace_row0(probe, rows)
    tensors = batch_tensors(probe, rows)

    def run(inputs):
        a, k = inputs
        return forward(*a, **k)

    with isolated(module, tensors) as replay:
        outputs = []
        for inputs in (probe, neighbour):
            replay()
            with torch.no_grad():
                outputs.append(_digests(run(inputs), rows))
        half = is_half(*(t.dtype for t in batch_tensors(probe, rows) if t.is_floating_point()))
        half = half or is_half(*(p.dtype for p in module.parameters()))
        tolerance = tolerance_for(half)
        flag = int(rows > 0 and _any_differ(outputs[0], outputs[1], tolerance))
        if _agree(flag, group) == 0:
            return True
        culprit = locate(module, run, probe, neighbour, rows, replay, tolerance)
    raise _module_error(culprit or _describe("", module), "outputs")
