"""Step time and peak memory: non-private TP vs DP-SGD on TP (this package) vs single-process
opacus, on the same Llama config and the same batch.

Run the driver with plain Python (not under torchrun), from the repository root::

    python bench/step_time.py                     # CPU: tiny Llama, tp=2 on 2 gloo processes
    python bench/step_time.py --no_opacus         # skip (c)
    python bench/step_time.py --secure_mode       # also (s): (b) in secure mode
    python bench/step_time.py --preset 1b --tp_size 2           # GPUs (NCCL), ~1.1B params, bf16
    python bench/step_time.py --preset 1b --tp_size 1 --batch 4  # one GPU

Presets (every size flag overrides its preset value; ``--bf16`` / ``--no-bf16``):

- ``tiny`` (CPU): hidden 128, 2 layers, 4 heads (kv heads = heads), MLP 4 * hidden, vocab 512,
  seq 64, batch 16 per DP rank, 20 timed steps after 3 warm-up steps, tp 2, dp 1, fp32.
- ``small`` (CPU, for the FSDP memory table): hidden 768, 2 layers, 8 heads, MLP 3072, vocab
  4096, seq 32, batch 4 per DP rank, 5 timed steps after 2, tp 2, dp 2, fp32 (~24M parameters;
  its MLP and vocabulary matrices have at least 2²⁰ elements per TP rank, so their clipped sums
  are streamed under ``--fsdp``).
- ``1b`` (GPUs): hidden 2048, 16 layers, 32 heads, 8 kv heads, MLP 8192 (4 * hidden), vocab
  32000, seq 512, batch 8 per DP rank, 10 timed steps after 3, tp 2, dp 1, bf16 (~1.10B
  parameters, untied embeddings).

The driver runs every configuration in its own fresh processes, one after the other, so that each
peak memory is that configuration's own (on CPU ``ru_maxrss`` is a lifetime high-water mark):

- (a) ``python -m torch.distributed.run --standalone --nproc-per-node <tp*dp> bench/step_time.py
  --worker a``: ordinary training of the TP model (``apply_tp_plan(..., "auto")``), AdamW
  (foreach), plus a plain all-reduce of the gradients over the DP group when dp > 1;
- (b) the same launch with ``--worker b``: DP-SGD with this package (``GradSampleControllerTP`` +
  ``DPOptimizerTP`` around the same AdamW; per-sample grads, clipping, noise, DP all-reduce);
- (g) the same launch with ``--worker g`` (skipped with ``--no_ghost``): (b) with
  ``grad_sample_mode="ghost"`` (ghost norms and book-keeping clipped sums, hf_dp_tp.ghost; in
  its breakdown ``backward_with_per_sample_hooks`` is the backward that stores the factors and
  ``clip_and_norms`` computes the norms and the clipped sums from them);
- (c) ``python bench/step_time.py --worker c``: opacus ``GradSampleModule`` + ``DPOptimizer`` on
  the full (unsharded) model in one process, over the global batch (``batch * dp``);
- (s) with ``--secure_mode`` only: (b) again with ``DPOptimizerTP(secure_mode=True)`` (noise from
  an AES-256-CTR keystream under fresh ``os.urandom`` keys instead of a seeded generator).

Each worker writes its result (rank 0; memory is the max over ranks, by an all-reduce) to a
temporary JSON file that the driver reads; the driver prints ONE JSON object on stdout (progress
and worker logs go to stderr). Every configuration uses the same loss, the mean over samples of
each sample's token-mean next-token cross-entropy (``hf_dp_tp.losses.token_mean_per_sample``),
and AdamW (lr 1e-4, foreach). DP settings: noise multiplier 1, clip norm 1.

On a GPU machine the workers use one GPU per process (NCCL) when there are at least ``tp*dp``
GPUs, else they run on CPU (gloo); (c) uses ``cuda:0``. The 1b preset is meant for GPUs; building
it on CPU works but is slow. Threads: each of the ``tp*dp`` workers gets ``OMP_NUM_THREADS=1``
(what torchrun does; all cores when there is a single worker) unless ``OMP_NUM_THREADS`` is set
in the environment; (c) gets the same total budget (``per-worker threads * tp*dp``).

Output fields:

- ``preset``, ``config``: the resolved sizes (``batch`` is per DP rank, ``global_batch`` =
  ``batch * dp_size``, ``nproc`` = ``tp_size * dp_size``, ``n_params`` of the full model).
- ``machine``: CPU model (``/proc/cpuinfo``), core counts, torch / transformers / opacus / Python
  versions, ``device`` (``"cpu"`` or the CUDA device name the workers ran on), backend, and the
  1-minute load average before and after, and ``other_processes_cpu_cores``: per configuration,
  the CPU time the rest of the machine used while it ran (``/proc/stat`` busy time minus the
  workers' own), in cores — well above 0 means other work skewed that configuration's timings.
- ``threads``: per-worker ``OMP_NUM_THREADS``, where it came from, the opacus process's thread
  budget, and ``torch.get_num_threads()`` as seen inside each worker.
- ``non_private_tp_s``, ``dp_tp_s``, ``opacus_single_process_s``: median seconds per optimizer
  step over ``--steps`` timed steps (after ``--warmup``), uninstrumented; ``step_times_s`` lists
  every timed step.
- ``ratio_dp_tp_over_non_private`` = ``dp_tp_s / non_private_tp_s``; ``ratio_dp_tp_over_opacus``
  = ``dp_tp_s / opacus_single_process_s`` (null without (c)).
- ``dp_tp_secure_s``, ``ratio_secure_over_seeded`` (= ``dp_tp_secure_s / dp_tp_s``) and
  ``dp_tp_secure_breakdown_s`` (the stages of (b)): (s), null without ``--secure_mode``; its
  memory fields are ``dp_tp_secure_*_mb``.
- ``*_peak_mb``: peak memory of that configuration in MiB (max over ranks). CPU: the process's
  ``ru_maxrss`` (lifetime high-water mark, so it includes the Python/torch/transformers baseline
  of a few hundred MiB). CUDA: ``torch.cuda.max_memory_allocated`` since the model was built.
  ``*_after_build_mb``: the same measure right after the model was built (and sharded) — current
  RSS on CPU, ``memory_allocated`` on CUDA; ``*_increase_mb``: peak minus after-build (per rank,
  then max over ranks), i.e. what training adds (optimizer state, grads, per-sample grads,
  activations). ``memory_metric`` says which measure was used.
- ``dp_tp_ghost_s``, ``ratio_ghost_over_non_private``, ``dp_tp_ghost_*_mb``,
  ``dp_tp_ghost_breakdown_s``, ``ghost_overhead_note``: (g), null with ``--no_ghost``.
  ``increase_ratio_dp_tp_over_non_private`` / ``increase_ratio_ghost_over_non_private``: the memory
  training adds (``*_increase_mb``) of (b) / (g) over that of (a).
- ``*_param_mb_per_rank`` / ``*_optimizer_state_mb_per_rank``: what one rank holds of the
  parameters and of the AdamW state (local shards; max over ranks) — with ``--fsdp`` they fall by
  the DP size. ``*_grad_mb_per_rank``: the most gradient memory one rank holds at a time (max
  over ranks and steps): (a) its ``.grad`` after the backward (FSDP: its shards); (b), (g) the
  larger of its clipped sums held after the micro-batch (whole TP-local sums, or under
  ``--fsdp`` the shards of those streamed by ``clip_and_accumulate(scatter=True)``, as
  ``DPTrainer`` does) and the written ``.grad``. Per-sample gradients and ghost factors are
  transient (activation-like) and not counted here; they show in ``*_increase_mb``. (c) has none.
- ``dp_replicate_size`` (with ``--fsdp``): HSDP, that many replicas each sharded over
  ``dp_size / dp_replicate_size`` ranks.
- ``opacus_single_process_skipped``: null when (c) ran, else why not (``--no_opacus``, estimated
  not to fit in free memory, out of memory, failed); its fields are then null.
- ``non_private_breakdown_s`` ({forward, backward, grad_all_reduce (dp>1 only), optimizer_step,
  other}) and ``dp_tp_breakdown_s`` ({forward, backward_with_per_sample_hooks, clip_and_norms,
  noise_and_reduce, optimizer_step}): median seconds per stage over a second, instrumented pass of
  ``--steps`` steps (CUDA is synchronised at every stage boundary there, so these steps are a bit
  slower than the headline ones). ``forward`` includes the loss; ``clip_and_norms`` is
  ``DPOptimizerTP.clip_and_accumulate`` (per-sample norms with their TP all-reduce, clip factors,
  clipped sums); ``noise_and_reduce`` is ``DPOptimizerTP.add_noise_and_reduce`` (noise, DP
  all-reduce, TP broadcast of replicated grads, scaling, writing ``.grad``); ``optimizer_step``
  is the wrapped AdamW's ``step``. ``dp_tp_breakdown_extra_s`` adds the time spent inside the
  per-sample-gradient hooks (part of the backward), ``other`` (``zero_grad`` and the rest) and
  the instrumented step's total.
- ``overhead_note``: one line computed from the breakdowns: which stage takes most of the DP-TP
  step, and which stage accounts for most of the extra time over non-private training.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
MIB = 2**20

# None means "derived": kv_heads = heads, intermediate = 4 * hidden.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden=128,
        layers=2,
        heads=4,
        kv_heads=None,
        intermediate=None,
        vocab=512,
        seq=64,
        batch=16,
        steps=20,
        warmup=3,
        tp_size=2,
        dp_size=1,
        bf16=False,
    ),
    "small": dict(  # CPU, with weights large enough (TP-local >= 2**20) to stream under FSDP
        hidden=768,
        layers=2,
        heads=8,
        kv_heads=None,
        intermediate=None,  # 4 * hidden = 3072
        vocab=4096,
        seq=32,
        batch=4,
        steps=5,
        warmup=2,
        tp_size=2,
        dp_size=2,
        bf16=False,
    ),
    "1b": dict(  # ~1.1B parameters (untied embeddings): meant for GPUs
        hidden=2048,
        layers=16,
        heads=32,
        kv_heads=8,
        intermediate=None,  # 4 * hidden = 8192
        vocab=32000,
        seq=512,
        batch=8,
        steps=10,
        warmup=3,
        tp_size=2,
        dp_size=1,
        bf16=True,
    ),
}
CONFIGS = {
    "a": "non_private_tp",
    "b": "dp_tp",
    "g": "dp_tp_ghost",
    "s": "dp_tp_secure",
    "c": "opacus_single_process",
}
DP_STAGES = (
    "forward",
    "backward_with_per_sample_hooks",
    "clip_and_norms",
    "noise_and_reduce",
    "optimizer_step",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Step time and peak memory of non-private TP, DP-TP and opacus (see the "
        "module docstring for the output fields).",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    for name, kind, what in [
        ("hidden", int, "hidden size"),
        ("layers", int, "decoder layers"),
        ("heads", int, "attention heads"),
        ("kv_heads", int, "key/value heads (tiny: = heads)"),
        ("intermediate", int, "MLP size (default 4 * hidden)"),
        ("vocab", int, "vocabulary size"),
        ("seq", int, "tokens per sample"),
        ("batch", int, "samples per step per DP rank"),
        ("steps", int, "timed steps"),
        ("warmup", int, "untimed steps first"),
        ("tp_size", int, "tensor-parallel size"),
        ("dp_size", int, "data-parallel size (processes = tp_size * dp_size)"),
    ]:
        p.add_argument(f"--{name}", type=kind, default=None, help=f"{what}; overrides the preset")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--no_opacus", action="store_true", help="skip (c), single-process opacus")
    p.add_argument("--no_ghost", action="store_true", help="skip (g), DP-TP with ghost clipping")
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="(a), (b), (g): FSDP2 over the DP dim on top of TP (fully_shard per decoder layer "
        "and the root over mesh['dp']); needs dp_size > 1 to shard anything",
    )
    p.add_argument(
        "--dp_replicate_size",
        type=int,
        default=1,
        help="with --fsdp: HSDP, this many replicas each sharded over dp_size / dp_replicate_size",
    )
    p.add_argument(
        "--secure_mode",
        action="store_true",
        help="also run (s): DP-TP with secure_mode=True, and report its ratio to seeded (b)",
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per worker run")
    # internal: one configuration, launched by the driver
    p.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--config_file", help=argparse.SUPPRESS)
    p.add_argument("--result_file", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = dict(PRESETS[args.preset])
    for key in cfg:
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    cfg["kv_heads"] = cfg["kv_heads"] or cfg["heads"]
    cfg["intermediate"] = cfg["intermediate"] or 4 * cfg["hidden"]
    for key in ("tp_size", "dp_size", "batch", "steps", "seq", "heads", "kv_heads"):
        if cfg[key] < 1:
            raise SystemExit(f"--{key} must be >= 1, got {cfg[key]}")
    if cfg["warmup"] < 0:
        raise SystemExit(f"--warmup must be >= 0, got {cfg['warmup']}")
    cfg["nproc"] = cfg["tp_size"] * cfg["dp_size"]
    cfg["fsdp"] = bool(getattr(args, "fsdp", False))
    cfg["dp_replicate_size"] = int(getattr(args, "dp_replicate_size", 1) or 1)
    if cfg["dp_replicate_size"] > 1 and not cfg["fsdp"]:
        raise SystemExit("--dp_replicate_size needs --fsdp (HSDP replicates sharded groups)")
    if cfg["dp_size"] % cfg["dp_replicate_size"] != 0:
        raise SystemExit("--dp_replicate_size must divide --dp_size")
    cfg["global_batch"] = cfg["batch"] * cfg["dp_size"]
    cfg["dtype"] = "bfloat16" if cfg["bf16"] else "float32"
    return cfg


# ---------------------------------------------------------------------------- shared helpers
def llama_config(cfg: dict[str, Any]):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"],
        max_position_embeddings=cfg["seq"],
    )


def build_model(cfg: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The same weights in every process: seeded init, directly on ``device``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(cfg))
    if cfg["bf16"]:
        model = model.to(torch.bfloat16)
    return model.train()


def count_params(cfg: dict[str, Any]) -> int:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(cfg))
    return sum(p.numel() for p in model.parameters())


def global_batch(cfg: dict[str, Any], device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = (cfg["global_batch"], cfg["seq"])
    return torch.randint(0, cfg["vocab"], shape, generator=g).to(device)


def loss_fn(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean over samples of each sample's token-mean loss (the loss DP-SGD needs)."""
    from hf_dp_tp.losses import token_mean_per_sample

    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    logits = model(input_ids=ids, position_ids=positions).logits
    return token_mean_per_sample(logits, ids).mean()


def current_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MIB
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / MIB
    except (OSError, ValueError):
        return peak_memory_mb(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_metric(device_type: str) -> str:
    if device_type == "cuda":
        return "cuda: torch.cuda.max_memory_allocated since model build (after-build: allocated)"
    return "cpu: ru_maxrss, lifetime high-water mark per process (after-build: current RSS)"


class Stopwatch:
    """Per-step, per-stage wall time; inactive (free) until ``active`` is set. On CUDA every
    section boundary synchronises, so the stages do not bleed into each other."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.active = False
        self.steps: list[dict[str, float]] = []

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def new_step(self) -> None:
        self.steps.append({})

    @contextmanager
    def section(self, name: str):
        if not self.active:
            yield
            return
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            step = self.steps[-1]
            step[name] = step.get(name, 0.0) + time.perf_counter() - start

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed_call(*args, **kwargs):
            with self.section(name):
                return fn(*args, **kwargs)

        return timed_call

    def medians(self, names: list[str] | tuple[str, ...]) -> dict[str, float]:
        return {n: statistics.median(s.get(n, 0.0) for s in self.steps) for n in names}


def run_steps(
    step: Callable[[], None], count: int, device: torch.device, *, barrier: bool
) -> list[float]:
    import torch.distributed as dist

    times = []
    for _ in range(count):
        if device.type == "cuda":
            torch.cuda.synchronize()
        if barrier:
            dist.barrier()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def _local_bytes(t: Any) -> int:
    """Bytes this rank holds of a tensor (its local shard for a DTensor); 0 for non-tensors."""
    if not isinstance(t, torch.Tensor):
        return 0
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def write_json(path: str, obj: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- workers (a), (b)
def _dp_all_reduce_grads(params: list[torch.Tensor], group, dp_size: int) -> None:
    """What DDP does for (a) when dp > 1 (one flat bucket, no overlap with the backward)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        grads = [
            p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            for p in params
            if p.grad is not None
        ]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat.div_(dp_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def tp_worker(kind: str, cfg: dict[str, Any], result_file: str) -> None:
    import torch.distributed as dist

    from hf_dp_tp import DPOptimizerTP, GradSampleControllerTP
    from hf_dp_tp.optimizer import split_mixed_param_groups
    from hf_dp_tp.parallel import ParallelDims, destroy_process_groups, dim_mesh
    from hf_dp_tp.parallelize import parallelize

    warnings.filterwarnings("ignore")
    world = int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    dims = ParallelDims.for_world(
        world,
        cfg["tp_size"],
        fsdp=bool(cfg.get("fsdp")),
        replicas=cfg.get("dp_replicate_size", 1),
    )
    mesh = dims.build_mesh(device.type)
    dp_mesh = dim_mesh(mesh, "dp")
    dp_rank, dp_size = dp_mesh.get_local_rank(), dp_mesh.size()
    ids = global_batch(cfg, device)[dp_rank * cfg["batch"] : (dp_rank + 1) * cfg["batch"]]

    model = build_model(cfg, device)
    parallelize(model, dims, mesh, "auto")  # TP, then FSDP per decoder layer, then the root
    after_build = current_memory_mb(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    sw = Stopwatch(device)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    held = [0]  # the most gradient bytes this rank held at once (see *_grad_mb_per_rank)
    params = [p for p in model.parameters() if p.requires_grad]

    if kind == "a":
        split_mixed_param_groups(inner)  # foreach kernels cannot mix DTensor and plain params
        opt, controller, hook = inner, None, None
        stages = ["forward", "backward", "optimizer_step", "other"]
        fsdp_reduces = dims.fsdp_enabled  # FSDP reduce-scatters in backward itself
        if dp_size > 1 and not fsdp_reduces:
            stages.insert(2, "grad_all_reduce")

        def step() -> None:
            with sw.section("forward"):
                loss = loss_fn(model, ids)
            with sw.section("backward"):
                loss.backward()
            held[0] = max(held[0], sum(_local_bytes(p.grad) for p in params))
            if dp_size > 1 and not fsdp_reduces:
                with sw.section("grad_all_reduce"):
                    _dp_all_reduce_grads(params, dp_mesh.get_group(), dp_size)
            opt.step()
            opt.zero_grad()

        def instrument() -> None:
            opt.step = sw.wrap("optimizer_step", opt.step)

    else:
        mode = "ghost" if kind == "g" else "tp"
        controller = GradSampleControllerTP(model, device_mesh=mesh, grad_sample_mode=mode)
        opt = DPOptimizerTP(
            inner,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=cfg["global_batch"],
            mesh=controller.mesh,
            secure_mode=kind == "s",
        )
        stages = list(DP_STAGES)
        hook = getattr(controller, "_on_output_grad", None)  # private: timed as a detail only

        stream = dims.fsdp_enabled  # as DPTrainer: FSDP sums reduce-scattered at once

        def step() -> None:
            with sw.section("forward"):
                loss = loss_fn(model, ids)
            with sw.section("backward_with_per_sample_hooks"):
                loss.backward()
            opt.clip_and_accumulate(scatter=stream)
            sums = [*opt._clipped_sums.values(), *opt._scattered_sums.values()]  # private: bench
            held[0] = max(held[0], sum(_local_bytes(t) for t in sums))
            opt.step()  # (nothing left to clip), add_noise_and_reduce, inner AdamW step
            held[0] = max(held[0], sum(_local_bytes(p.grad) for p in params))
            opt.zero_grad()

        def instrument() -> None:
            # instance attributes shadow the methods DPOptimizerTP.pre_step/step call
            opt.clip_and_accumulate = sw.wrap("clip_and_norms", opt.clip_and_accumulate)
            opt.add_noise_and_reduce = sw.wrap("noise_and_reduce", opt.add_noise_and_reduce)
            inner.step = sw.wrap("optimizer_step", inner.step)
            if hook is not None:
                controller._on_output_grad = sw.wrap("per_sample_hooks", hook)

    times = run_steps(step, cfg["warmup"] + cfg["steps"], device, barrier=True)[cfg["warmup"] :]

    instrument()
    sw.active = True

    def instrumented_step() -> None:
        sw.new_step()
        with sw.section("total"):
            step()

    run_steps(instrumented_step, cfg["steps"], device, barrier=True)
    medians = sw.medians([s for s in stages if s != "other"] + ["total", "per_sample_hooks"])
    named = sum(v for k, v in medians.items() if k not in ("total", "per_sample_hooks"))
    medians["other"] = max(0.0, medians["total"] - named)

    peak = peak_memory_mb(device)
    state_bytes = [
        sum(_local_bytes(p) for p in model.parameters()),
        sum(_local_bytes(t) for s in inner.state.values() for t in s.values()),
    ]
    mem = torch.tensor(
        [after_build, peak, peak - after_build, *state_bytes, held[0]],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    if controller is not None:
        controller.cleanup()
    if dist.get_rank() == 0:
        result: dict[str, Any] = {
            "median_s": statistics.median(times),
            "step_times_s": times,
            "after_build_mb": mem[0].item(),
            "peak_mb": mem[1].item(),
            "increase_mb": mem[2].item(),
            "param_mb_per_rank": mem[3].item() / MIB,
            "optimizer_state_mb_per_rank": mem[4].item() / MIB,
            "grad_mb_per_rank": mem[5].item() / MIB,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "device_type": device.type,
            "backend": dist.get_backend(),
            "torch_num_threads": torch.get_num_threads(),
            "n_params": sum(p.numel() for p in model.parameters()),  # DTensor numel is global
        }
        if kind == "a":
            result["breakdown_s"] = {s: medians[s] for s in stages}
        else:
            result["breakdown_s"] = {s: medians[s] for s in DP_STAGES}
            result["breakdown_extra_s"] = {
                "per_sample_hooks_within_backward": medians["per_sample_hooks"]
                if hook is not None
                else None,
                "other": medians["other"],
                "instrumented_step": medians["total"],
            }
        write_json(result_file, result)
    destroy_process_groups()


# ---------------------------------------------------------------------------- worker (c)
def opacus_memory_estimate_mb(cfg: dict[str, Any], n_params: int) -> float:
    """Rough need of (c): weights, grads, 2 AdamW states and one per-sample grad per sample of the
    global batch, all in the model dtype, plus fp32 activations and logits; 25% slack."""
    elem = 2 if cfg["bf16"] else 4
    weights = n_params * elem * (4 + cfg["global_batch"])
    tokens = cfg["global_batch"] * cfg["seq"]
    per_token = cfg["layers"] * (12 * cfg["hidden"] + 4 * cfg["intermediate"]) + 4 * cfg["vocab"]
    return 1.25 * (weights + tokens * per_token * 4) / MIB


def available_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / MIB
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def opacus_worker(cfg: dict[str, Any], result_file: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(cfg["threads"]["opacus_single_process_threads"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "device_type": device.type,
        "torch_num_threads": torch.get_num_threads(),
    }
    need = opacus_memory_estimate_mb(cfg, count_params(cfg))
    free = available_memory_mb(device)
    if free is not None and need > free:
        result["skipped"] = (
            f"estimated to need {need:.0f} MiB (full model, {cfg['global_batch']} per-sample "
            f"grads, AdamW state, activations) but only {free:.0f} MiB is free on {device}"
        )
        write_json(result_file, result)
        return

    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    ids = global_batch(cfg, device)
    model = build_model(cfg, device)
    after_build = current_memory_mb(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    full = GradSampleModule(model)
    opt = DPOptimizer(
        torch.optim.AdamW(full.parameters(), lr=1e-4, foreach=True),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=cfg["global_batch"],
    )

    def step() -> None:
        loss_fn(full, ids).backward()
        opt.step()
        opt.zero_grad()

    try:
        times = run_steps(step, cfg["warmup"] + cfg["steps"], device, barrier=False)
    except torch.OutOfMemoryError as err:
        result["skipped"] = f"out of memory: {str(err).splitlines()[0]}"
        write_json(result_file, result)
        return
    times = times[cfg["warmup"] :]
    peak = peak_memory_mb(device)
    result.update(
        median_s=statistics.median(times),
        step_times_s=times,
        after_build_mb=after_build,
        peak_mb=peak,
        increase_mb=peak - after_build,
    )
    write_json(result_file, result)


# ---------------------------------------------------------------------------- driver
def thread_plan(cfg: dict[str, Any]) -> dict[str, Any]:
    env = os.environ.get("OMP_NUM_THREADS")
    if env:
        per_worker = int(env)
        source = "OMP_NUM_THREADS from the environment"
    elif cfg["nproc"] > 1:
        per_worker = 1
        source = "default: 1 thread per worker process (as torchrun)"
    else:
        per_worker = os.cpu_count() or 1
        source = "default: all cores for a single worker process"
    return {
        "omp_num_threads_per_worker": per_worker,
        "workers": cfg["nproc"],
        "opacus_single_process_threads": per_worker * cfg["nproc"],
        "source": source,
    }


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for package in ("transformers", "opacus"):
        try:
            versions[f"{package}_version"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[f"{package}_version"] = None
    return {
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "torch_version": torch.__version__,
        **versions,
        "python_version": platform.python_version(),
        "cuda_device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }


def busy_cpu_seconds() -> float | None:
    """CPU time the whole machine has spent busy (all processes), from ``/proc/stat``."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def log(message: str) -> None:
    print(f"[step_time] {message}", file=sys.stderr, flush=True)


def launch(
    kind: str, cfg: dict[str, Any], tmp: Path, env: dict[str, str], timeout: float
) -> tuple[dict[str, Any] | None, str | None]:
    """Run one configuration in fresh processes; (result, None) or (None, why it failed)."""
    result_file = tmp / f"{kind}.json"
    worker_args = [
        str(SCRIPT),
        "--worker",
        kind,
        "--config_file",
        str(tmp / "config.json"),
        "--result_file",
        str(result_file),
    ]
    if kind == "c":
        cmd = [sys.executable, *worker_args]
        env = {**env, "OMP_NUM_THREADS": str(cfg["threads"]["opacus_single_process_threads"])}
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(cfg["nproc"]),
            *worker_args,
        ]
    log(f"({kind}) {CONFIGS[kind]}: {' '.join(cmd[1:4] if kind != 'c' else cmd[1:2])} ...")
    start, busy, ours = time.perf_counter(), busy_cpu_seconds(), children_cpu_seconds()
    try:
        done = subprocess.run(
            cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    wall = time.perf_counter() - start
    foreign = None
    if busy is not None and (busy_now := busy_cpu_seconds()) is not None:
        # busy CPU time of the machine minus our own workers', in cores over the run
        foreign = max(0.0, (busy_now - busy) - (children_cpu_seconds() - ours)) / wall
    log(f"({kind}) done in {wall:.1f} s, exit code {done.returncode}")
    if foreign is not None and foreign > 0.25:
        log(f"({kind}) other processes used {foreign:.2f} cores meanwhile: timings are skewed")
    if result_file.exists():
        if done.returncode != 0:
            log(f"({kind}) result written but exit code {done.returncode}:\n{done.stderr[-2000:]}")
        result = json.loads(result_file.read_text())
        result["foreign_cpu_cores"] = foreign
        return result, None
    sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
    if done.returncode in (-9, 137):
        return None, "killed (SIGKILL, most likely out of memory)"
    tail = [line for line in done.stderr.splitlines() if line.strip()]
    return None, f"exit code {done.returncode}: {tail[-1] if tail else 'no output'}"


def overhead_note(a: dict[str, Any], b: dict[str, Any]) -> str:
    ta, tb = a["median_s"], b["median_s"]
    bd, nd = b["breakdown_s"], a["breakdown_s"]
    extra = {
        "forward": bd["forward"] - nd["forward"],
        "backward_with_per_sample_hooks": bd["backward_with_per_sample_hooks"] - nd["backward"],
        "clip_and_norms": bd["clip_and_norms"],
        "noise_and_reduce": bd["noise_and_reduce"] - nd.get("grad_all_reduce", 0.0),
        "optimizer_step": bd["optimizer_step"] - nd["optimizer_step"],
    }
    biggest = max(bd, key=bd.get)
    step_total = sum(bd.values()) or 1.0
    positive = {k: v for k, v in extra.items() if v > 0}
    total_extra = sum(positive.values())
    note = (
        f"DP-TP {tb * 1e3:.1f} ms vs non-private {ta * 1e3:.1f} ms per step (x{tb / ta:.2f}); "
        f"largest DP-TP stage: {biggest} ({bd[biggest] * 1e3:.1f} ms, "
        f"{100 * bd[biggest] / step_total:.0f}% of the staged step)"
    )
    if total_extra <= 0:
        return note + "; no stage is slower than in non-private training"
    dominant = max(positive, key=positive.get)
    parts = ", ".join(
        f"{k} +{v * 1e3:.1f} ms ({100 * v / total_extra:.0f}%)"
        for k, v in sorted(positive.items(), key=lambda kv: -kv[1])
    )
    return note + f"; DP overhead dominated by {dominant}: {parts}"


def driver(args: argparse.Namespace) -> None:
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        raise SystemExit(
            "run the driver with plain python (python bench/step_time.py ...): it launches "
            "torchrun itself, once per configuration."
        )
    cfg = resolve_config(args)
    cfg["threads"] = thread_plan(cfg)
    if torch.cuda.is_available() and torch.cuda.device_count() < cfg["nproc"]:
        log(
            f"only {torch.cuda.device_count()} GPU(s) for {cfg['nproc']} processes: "
            "(a) and (b) run on CPU (gloo)"
        )
    load_at_start = os.getloadavg()[0]
    if load_at_start > 0.5 * (os.cpu_count() or 1):
        log(f"load average {load_at_start:.2f} before starting: other work shares the CPUs")
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(cfg["threads"]["omp_num_threads_per_worker"])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))

    results: dict[str, dict[str, Any] | None] = {}
    skipped = "skipped: --no_opacus" if args.no_opacus else None
    with tempfile.TemporaryDirectory(prefix="step_time_") as tmp_dir:
        tmp = Path(tmp_dir)
        write_json(str(tmp / "config.json"), cfg)
        kinds = ["a", "b"] + ([] if args.no_ghost else ["g"]) + (["s"] if args.secure_mode else [])
        for kind in kinds:
            results[kind], error = launch(kind, cfg, tmp, env, args.timeout)
            if error is not None:
                raise SystemExit(f"({kind}) {CONFIGS[kind]} failed: {error}")
        if skipped is None:
            results["c"], error = launch("c", cfg, tmp, env, args.timeout)
            skipped = error or (results["c"] or {}).get("skipped")
    a, b, secure, ghost = results["a"], results["b"], results.get("s"), results.get("g")
    c = None if skipped else results["c"]

    cfg["n_params"] = a["n_params"]
    threads = cfg.pop("threads")
    threads["torch_num_threads_seen"] = {
        CONFIGS[k]: r.get("torch_num_threads") for k, r in results.items() if r is not None
    }
    out: dict[str, Any] = {
        "preset": args.preset,
        "config": cfg,
        "machine": {
            **machine_info(),
            "device": a["device"],
            "backend": a["backend"],
            "load_average_1m": {"start": load_at_start, "end": os.getloadavg()[0]},
            "other_processes_cpu_cores": {
                CONFIGS[k]: r.get("foreign_cpu_cores") for k, r in results.items() if r
            },
        },
        "threads": threads,
        "memory_metric": memory_metric(a["device_type"]),
    }
    runs = (("a", a), ("b", b), ("g", ghost), ("c", c), ("s", secure))
    for kind, res in runs:
        out[f"{CONFIGS[kind]}_s"] = res["median_s"] if res else None
    out["ratio_dp_tp_over_non_private"] = b["median_s"] / a["median_s"]
    out["ratio_dp_tp_over_opacus"] = b["median_s"] / c["median_s"] if c else None
    out["ratio_secure_over_seeded"] = secure["median_s"] / b["median_s"] if secure else None
    out["ratio_ghost_over_non_private"] = ghost["median_s"] / a["median_s"] if ghost else None
    out["increase_ratio_dp_tp_over_non_private"] = b["increase_mb"] / a["increase_mb"]
    out["increase_ratio_ghost_over_non_private"] = (
        ghost["increase_mb"] / a["increase_mb"] if ghost else None
    )
    for field in (
        "peak_mb",
        "after_build_mb",
        "increase_mb",
        "param_mb_per_rank",
        "optimizer_state_mb_per_rank",
        "grad_mb_per_rank",
    ):
        for kind, res in runs:
            out[f"{CONFIGS[kind]}_{field}"] = res.get(field) if res else None
    out["opacus_single_process_skipped"] = skipped
    out["step_times_s"] = {CONFIGS[k]: r["step_times_s"] for k, r in runs if r}
    out["non_private_breakdown_s"] = a["breakdown_s"]
    out["dp_tp_breakdown_s"] = b["breakdown_s"]
    out["dp_tp_breakdown_extra_s"] = b["breakdown_extra_s"]
    out["dp_tp_secure_breakdown_s"] = secure["breakdown_s"] if secure else None
    out["dp_tp_ghost_breakdown_s"] = ghost["breakdown_s"] if ghost else None
    out["dp_tp_ghost_breakdown_extra_s"] = ghost["breakdown_extra_s"] if ghost else None
    out["overhead_note"] = overhead_note(a, b)
    out["ghost_overhead_note"] = (
        overhead_note(a, ghost).replace("DP-TP", "ghost") if ghost else None
    )
    print(json.dumps(out))


def main() -> None:
    args = parse_args()
    if args.worker is None:
        driver(args)
        return
    cfg = json.loads(Path(args.config_file).read_text())
    if args.worker == "c":
        opacus_worker(cfg, args.result_file)
    else:
        tp_worker(args.worker, cfg, args.result_file)


if __name__ == "__main__":
    main()
