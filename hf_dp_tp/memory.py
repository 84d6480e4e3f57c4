"""Preflight memory estimate of a DP-SGD run, per rank, from shapes and settings only.

:func:`estimate_memory` adds up what one rank holds at its peak (every term in bytes, of this
rank's local shards under TP / FSDP):

- ``parameters``: every parameter's stored local shard (``to_local()`` of a DTensor), in its
  dtype. Already resident when ``train()`` starts (see :func:`check_memory`).
- ``gradients``: DP-SGD's running clipped sums, fp32 (at least) of every trainable stored shard,
  plus autograd's gradient in the parameter dtype (on the first step, before the controller stops
  autograd computing weight gradients; at each optimizer step the noised sum written as
  ``.grad``). Non-private: autograd's gradient only.
- ``optimizer_state``: states per trainable stored element, in the parameter dtype (torch
  optimizers allocate ``zeros_like(param)``): AdamW and Adam-likes 2, Lion / Adagrad / RMSprop /
  SGD with momentum 1, plain SGD 0; 8-bit variants 2 × 1 byte.
- ``per_sample_state``: what exists between the backward pass and clipping.
  ``"tp"`` / ``"hooks"``: every trainable parameter's per-sample gradient, ``b × (TP-local
  numel) × bytes`` — all layers' coexist until clipping — plus one more of the largest parameter
  (the transient of clipping it, or of summing a tied parameter's two uses).
  ``"ghost"``: per hooked use of a matrix weight (Linear, GPT-2 Conv1D, Embedding) whatever
  :func:`hf_dp_tp.ghost.keeps_factors` keeps — the factors, activation ``[b, T, d_in]`` and output
  gradient ``[b, T, d_out]`` (token ids, 8 bytes, and ``[b, T, d]`` for an embedding), when
  ``T (d_in + d_out) < d_in d_out`` — else the materialised ``[b, d_out, d_in]``; other
  parameters (norms, biases) materialised. Both factors are counted although the activation is
  shared with autograd's saved tensors during the backward pass (an overestimate of at most the
  inputs of the hooked layers). Non-private: 0.
- ``activations``: autograd's saved tensors of a decoder model, per layer and token
  ``bytes × (ACTIVATION_HIDDEN × hidden + ACTIVATION_INTERMEDIATE × intermediate)`` (+ ``2 ×
  heads × T`` values of attention probabilities for ``attn_implementation="eager"``), plus the
  embedding output and ``2 × V`` fp32 logits values per token (logits and log-softmax). The
  constants were measured with ``torch.autograd.graph.saved_tensors_hooks`` on LlamaForCausalLM
  (fp32, sdpa and eager; hidden 256/512, intermediate 1024/2048, 4/8 layers): 10 and 4 values per
  token. Models without ``hidden_size`` / ``num_hidden_layers`` in their config get 0 (said in
  :meth:`MemoryEstimate.describe`).

``b`` is the micro-batch the estimate is taken at. Poisson sampling makes a micro-batch's size
random (mean ``per_device_train_batch_size``); :func:`peak_micro_batch` gives the largest one
expected over the run, which is what has to fit. Not counted: the Python / torch / CUDA runtime,
the allocator's fragmentation, dataloader workers, evaluation, checkpoint writing (full-state
gathers), FSDP's transient all-gathered layers.

:func:`check_memory` is DPTrainer's preflight (``memory_check``, docs/trainer.md).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.utils import logging

from .parallel import param_layout

logger = logging.get_logger(__name__)  # Trainer's log_level applies, as to DPTrainer's lines

__all__ = [
    "MemoryEstimate",
    "estimate_memory",
    "available_memory",
    "peak_micro_batch",
    "check_memory",
    "MEMORY_CHECKS",
]

#: Saved activation values per token and decoder layer, per hidden unit and per MLP unit.
ACTIVATION_HIDDEN = 10
ACTIVATION_INTERMEDIATE = 4
#: ``memory_check`` settings.
MEMORY_CHECKS = ("error", "warn", "off")
#: Above this multiple of the available memory, ``memory_check="error"`` raises.
ERROR_RATIO = 1.1
#: Above this multiple (and up to ``ERROR_RATIO``), a warning.
WARN_RATIO = 0.9
#: Probability that some micro-batch of the run exceeds :func:`peak_micro_batch`.
PEAK_BATCH_TAIL = 0.01

_GIB = 1024**3


def _size(n: float) -> str:
    """``n`` bytes in GiB, or MiB below 1 GiB."""
    return f"{n / _GIB:.2f} GiB" if n >= _GIB else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class MemoryEstimate:
    """One rank's estimated peak memory, in bytes per term (see the module docstring)."""

    parameters: int
    gradients: int
    optimizer_state: int
    per_sample_state: int
    activations: int
    mode: str
    micro_batch: int
    seq_len: int
    notes: tuple[str, ...] = field(default=())

    @property
    def total(self) -> int:
        return (
            self.parameters
            + self.gradients
            + self.optimizer_state
            + self.per_sample_state
            + self.activations
        )

    @property
    def terms(self) -> dict[str, int]:
        return {
            "parameters": self.parameters,
            "gradients": self.gradients,
            "optimizer_state": self.optimizer_state,
            "per_sample_state": self.per_sample_state,
            "activations": self.activations,
        }

    def dominant(self) -> str:
        """The largest term's name."""
        return max(self.terms.items(), key=lambda kv: kv[1])[0]

    def describe(self) -> str:
        parts = ", ".join(f"{k.replace('_', ' ')} {_size(v)}" for k, v in self.terms.items())
        text = (
            f"estimated peak memory per rank {_size(self.total)} ({parts}; "
            f"grad_sample_mode={self.mode!r}, micro-batch {self.micro_batch}, "
            f"{self.seq_len} tokens)"
        )
        return text + "".join(f"; {n}" for n in self.notes)


def _stored_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def _compute_shape(p: torch.Tensor, name: str) -> tuple[int, ...]:
    """The TP-local shape per-sample gradients are taken on (FSDP: the unsharded TP-local one)."""
    try:
        return tuple(param_layout(p, name).local_shape)
    except ValueError:
        return tuple(p.shape)


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def optimizer_states(optim: str, optim_args: str | None = None) -> float:
    """Optimizer state tensors per trainable element (in units of the parameter's dtype; 8-bit
    variants count 1/4 of an fp32 value each), from ``TrainingArguments.optim``."""
    name = str(getattr(optim, "value", optim)).lower()
    if "8bit" in name:
        return 2 * 0.25 if ("adam" in name or "ademamix" in name) else 0.25
    if "adafactor" in name:
        return 0.0  # factored second moments: rows + cols, negligible
    if "sgd" in name:
        momentum = 0.0
        for item in (optim_args or "").replace(" ", "").split(","):
            if item.startswith("momentum="):
                momentum = float(item.split("=", 1)[1])
        return 1.0 if momentum else 0.0
    if any(k in name for k in ("lion", "adagrad", "rmsprop")):
        return 1.0
    if "ademamix" in name:
        return 3.0
    return 2.0  # AdamW / Adam and anything unknown


def _optimizer_states_of(optimizer: torch.optim.Optimizer) -> float:
    inner = getattr(optimizer, "original_optimizer", optimizer)
    name = type(inner).__name__.lower()
    if name == "sgd":
        return 1.0 if any(g.get("momentum", 0) for g in inner.param_groups) else 0.0
    return optimizer_states(name)


def _is_factored_module(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__ == "Conv1D"


def _ghost_bytes(model: nn.Module, batch: int, tokens: int, elem: int) -> tuple[int, int]:
    """``(bytes, largest materialised bytes)`` kept until clipping in ghost mode."""
    total = 0
    covered: set[int] = set()
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if not (_is_factored_module(module) and weight is not None and weight.requires_grad):
            continue
        shape = _compute_shape(weight, f"{name}.weight")
        if len(shape) != 2:
            continue
        covered.add(id(weight))
        rows, cols = shape
        if isinstance(module, nn.Embedding):
            factors = tokens * (8 + cols * elem)  # ids (int64) and the output gradient
            keep = tokens * (1 + cols) < rows * cols
        else:
            factors = tokens * (rows + cols) * elem
            keep = tokens * (rows + cols) < rows * cols
        total += batch * (factors if keep else rows * cols * elem)
    largest = 0
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in covered:
            size = batch * math.prod(_compute_shape(p, name)) * elem
            total += size
            largest = max(largest, size)
    return total, largest


def _activation_bytes(model: nn.Module, batch: int, tokens: int, elem: int) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not hidden or not layers:
        return None
    inner = (
        getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    )
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    vocab = getattr(config, "vocab_size", None) or 0
    per_token = (ACTIVATION_HIDDEN * hidden + ACTIVATION_INTERMEDIATE * inner) * elem
    if getattr(config, "_attn_implementation", None) == "eager":
        per_token += 2 * heads * tokens * elem
    head = hidden * elem + 2 * vocab * 4
    return batch * tokens * (layers * per_token + head)


def estimate_memory(
    model: nn.Module,
    *,
    grad_sample_mode: str | None,
    micro_batch: int,
    seq_len: int,
    optimizer_states_per_param: float = 2.0,
    first_step: bool = True,
    activation_dtype: torch.dtype | None = None,
) -> MemoryEstimate:
    """One rank's peak memory for ``micro_batch`` samples of ``seq_len`` tokens.

    ``grad_sample_mode``: ``"tp"`` / ``"hooks"`` (per-sample gradients), ``"ghost"``, or None
    (non-private training, for comparison). ``optimizer_states_per_param``: see
    :func:`optimizer_states`. ``first_step``: count autograd's gradient of the first step next to
    the per-sample state. ``activation_dtype``: the dtype activations are kept in (default: the
    parameters' dtype; bf16 under ``bf16=True`` autocast). Reads parameter shapes, dtypes and the
    model config only.
    """
    params = list(model.named_parameters())
    trainable = [(n, p) for n, p in params if p.requires_grad]
    param_bytes = sum(_stored_numel(p) * p.element_size() for _, p in params)
    trainable_stored = sum(_stored_numel(p) for _, p in trainable)
    trainable_bytes = sum(_stored_numel(p) * p.element_size() for _, p in trainable)
    elem = trainable[0][1].element_size() if trainable else 4
    act_elem = _elem(activation_dtype) if activation_dtype is not None else elem
    notes = []

    if grad_sample_mode is None:
        gradients = trainable_bytes
        per_sample = 0
    else:
        accumulate = sum(_stored_numel(p) * max(4, p.element_size()) for _, p in trainable)
        gradients = accumulate + (trainable_bytes if first_step else 0)
        if grad_sample_mode == "ghost":
            per_sample, _ = _ghost_bytes(model, micro_batch, seq_len, elem)
        else:
            sizes = [math.prod(_compute_shape(p, n)) for n, p in trainable]
            per_sample = micro_batch * elem * (sum(sizes) + max(sizes, default=0))
    optimizer = int(optimizer_states_per_param * trainable_stored * elem)
    activations = _activation_bytes(model, micro_batch, seq_len, act_elem)
    if activations is None:
        notes.append("activations not estimated (no decoder config)")
        activations = 0
    return MemoryEstimate(
        parameters=param_bytes,
        gradients=gradients,
        optimizer_state=optimizer,
        per_sample_state=per_sample,
        activations=activations,
        mode=str(grad_sample_mode),
        micro_batch=micro_batch,
        seq_len=seq_len,
        notes=tuple(notes),
    )


def peak_micro_batch(expected: int, micro_batches: int, tail: float = PEAK_BATCH_TAIL) -> int:
    """The smallest ``k`` such that, with each of ``micro_batches`` micro-batches of Poisson(
    ``expected``) size, the chance that any exceeds ``k`` is at most ``tail`` (a union bound).
    Poisson sampling with rate q gives Binomial micro-batches, at most as spread as Poisson."""
    if expected <= 0:
        return 0
    per_batch = tail / max(1, micro_batches)
    k, pmf = 0, math.exp(-expected)
    cdf = pmf
    while 1.0 - cdf > per_batch and k < 100 * expected + 100:
        k += 1
        pmf *= expected / k
        cdf += pmf
    return max(k, expected)


def available_memory(device: torch.device | str | None = None) -> int:
    """Bytes this rank may still allocate: free CUDA memory on a CUDA device; on CPU the
    machine's ``MemAvailable`` (``/proc/meminfo``, else psutil) divided by ``LOCAL_WORLD_SIZE``
    (the processes of this node share it)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        try:
            import psutil

            available = int(psutil.virtual_memory().available)
        except ImportError:
            return 0  # unknown: check_memory skips the comparison
    return available // local


def _sequence_length(trainer) -> int:
    """Tokens per sample: the longest dim-1 of the first training record as collated (the shape
    the stand-in batch and the sample-independence probe use; none of its values); else the
    model's ``max_position_embeddings``; else 1."""
    from .sampling import collate_with_empty

    try:
        dataset, collator = trainer._dataset_and_collator(trainer.train_dataset, "training")
        batch = collate_with_empty(collator, dataset).stand_in()
        lengths = [
            v.shape[1] for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim >= 2
        ]
        if lengths:
            return int(max(lengths))
    except Exception:  # noqa: BLE001 — an unusual dataset: fall back to the config
        pass
    config = getattr(trainer.model, "config", None)
    return int(getattr(config, "max_position_embeddings", None) or 1)


def _fixes(estimate: MemoryEstimate, args) -> list[str]:
    """What to change, most effective first for this estimate."""
    b, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    smaller = (
        f"a smaller per_device_train_batch_size with more gradient_accumulation_steps, the "
        f"expected batch B̄ unchanged (e.g. {max(1, b // 2)} × {accum * 2} instead of "
        f"{b} × {accum})"
    )
    fixes = []
    if estimate.mode in ("tp", "hooks") and estimate.dominant() == "per_sample_state":
        fixes.append(
            'grad_sample_mode="ghost" (no per-sample gradient of a matrix weight is built)'
        )
    fixes.append(smaller)
    if estimate.mode in ("tp", "hooks") and estimate.dominant() != "per_sample_state":
        fixes.append('grad_sample_mode="ghost"')
    fixes.append("LoRA (peft): only the adapters get gradients, optimizer state and clipping")
    fixes.append("more TP ranks (tp_size) or FSDP ranks (fsdp='full_shard') to shard the model")
    return fixes


def check_memory(trainer) -> MemoryEstimate | None:
    """DPTrainer's preflight at the start of ``train()``: estimate one rank's peak at the largest
    micro-batch expected over the run (:func:`peak_micro_batch`), log it (rank 0), and compare
    what it adds to the resident parameters with :func:`available_memory`: above
    ``ERROR_RATIO`` × available, ``memory_check="error"`` raises (``"warn"`` warns); above
    ``WARN_RATIO`` ×, a warning; ``"off"`` skips all of it."""
    args = trainer.args
    setting = getattr(args, "memory_check", "error")
    if setting == "off" or trainer.train_dataset is None:
        return None
    model = trainer.model
    micro = args.per_device_train_batch_size
    micro_batches = trainer.planned_steps * args.gradient_accumulation_steps
    peak = peak_micro_batch(micro, micro_batches)
    optimizer = trainer.optimizer
    states = (
        _optimizer_states_of(optimizer)
        if optimizer is not None
        else optimizer_states(args.optim, args.optim_args)
    )
    estimate = estimate_memory(
        model,
        grad_sample_mode=args.grad_sample_mode,
        micro_batch=peak,
        seq_len=_sequence_length(trainer),
        optimizer_states_per_param=states,
        activation_dtype=torch.bfloat16 if args.bf16 else None,
    )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    available = available_memory(device)
    needed = estimate.total - estimate.parameters  # the parameters are resident already
    if trainer.is_world_process_zero():
        logger.info(
            f"memory preflight: {estimate.describe()}; micro-batch {peak} is the largest of the "
            f"run's {micro_batches} Poisson micro-batches of mean {micro} ({1 - PEAK_BATCH_TAIL:.0%}"
            f" sure); needs {_size(needed)} beyond the loaded parameters, {_size(available)} "
            "available"
        )
    if available <= 0 or needed <= WARN_RATIO * available:
        return estimate
    fixes = "; ".join(f"({i}) {fix}" for i, fix in enumerate(_fixes(estimate, args), 1))
    message = (
        f"DP-SGD will likely run out of memory: {estimate.describe()}, i.e. "
        f"{_size(needed)} beyond the loaded parameters, with {_size(available)} available on "
        f"{device} per process. Fixes, most effective first: {fixes}. "
        'memory_check="warn" or "off" skips this check.'
    )
    if setting == "error" and needed > ERROR_RATIO * available:
        raise MemoryError(message)
    if trainer.is_world_process_zero():
        warnings.warn(message, UserWarning, stacklevel=3)
    return estimate
