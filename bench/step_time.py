"""Step time and peak memory: non-private TP vs DP-SGD on TP (this package), same model and batch.

Run with ``torchrun --nproc-per-node 2 bench/step_time.py`` (CPU/gloo or GPUs/NCCL). Prints one JSON
line on rank 0: median step time of (a) non-private TP training, (b) DP-TP training, their ratio,
and peak memory; ``--opacus`` adds (c) single-process opacus on the full model (rank 0, where it
fits). Sizes come from flags: tiny by default, e.g. ``--hidden 2048 --layers 16`` for ~1B on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hf_dp_tp import DPOptimizerTP, GradSampleControllerTP, init_dp_tp_mesh
from hf_dp_tp.losses import token_mean_per_sample
from hf_dp_tp.optimizer import split_mixed_param_groups
from hf_dp_tp.parallel import apply_tp_plan


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="samples per step per DP rank")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tp_size", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--opacus", action="store_true", help="also time single-process opacus")
    return p.parse_args()


def build_model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq,
    )
    model = LlamaForCausalLM(config).to(device)
    if args.bf16:
        model = model.to(torch.bfloat16)
    return model.train()


def loss_fn(model, ids):
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    logits = model(input_ids=ids, position_ids=positions).logits
    return token_mean_per_sample(logits, ids).mean()


def timed(step, args, device) -> list[float]:
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def time_non_private(args, mesh, ids, device) -> list[float]:
    """(a) the same TP model and batch, ordinary training: batch-mean loss, AdamW."""
    model = build_model(args, device)
    apply_tp_plan(model, mesh["tp"], "auto")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    split_mixed_param_groups(opt)  # foreach kernels cannot mix DTensor and plain params

    def step():
        loss_fn(model, ids).backward()
        opt.step()
        opt.zero_grad()

    return timed(step, args, device)


def time_dp_tp(args, mesh, ids, device) -> list[float]:
    """(b) DP-SGD with this package: per-sample grads, clipping, noise, DP all-reduce, AdamW."""
    model = build_model(args, device)
    apply_tp_plan(model, mesh["tp"], "auto")
    controller = GradSampleControllerTP(model, device_mesh=mesh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = DPOptimizerTP(
            torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=args.batch * mesh["dp"].size(),
            mesh=controller.mesh,
        )

    def step():
        loss_fn(model, ids).backward()
        opt.step()
        opt.zero_grad()

    times = timed(step, args, device)
    controller.cleanup()
    return times


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ["WORLD_SIZE"])
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    mesh = init_dp_tp_mesh(args.tp_size, device.type)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", **vars(args)}

    result["non_private_tp_s"] = statistics.median(time_non_private(args, mesh, ids, device))
    result["non_private_peak_mb"] = peak_memory_mb(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    result["dp_tp_s"] = statistics.median(time_dp_tp(args, mesh, ids, device))
    result["dp_tp_peak_mb"] = peak_memory_mb(device)
    result["ratio_dp_tp_over_non_private"] = result["dp_tp_s"] / result["non_private_tp_s"]

    if args.opacus and dist.get_rank() == 0:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        full = GradSampleModule(build_model(args, device))
        opacus_opt = DPOptimizer(
            torch.optim.AdamW(full.parameters(), lr=1e-4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=args.batch,
        )

        def opacus_step():
            positions = torch.arange(args.seq, device=device).expand_as(ids)
            logits = full(input_ids=ids, position_ids=positions).logits
            F.cross_entropy(
                logits[:, :-1].reshape(-1, args.vocab).float(), ids[:, 1:].reshape(-1)
            ).backward()
            opacus_opt.step()
            opacus_opt.zero_grad()

        times = []
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            opacus_step()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        result["opacus_single_process_s"] = statistics.median(times)
    dist.barrier()
    if dist.get_rank() == 0:
        print(json.dumps(result))
    dist.barrier()  # let every rank finish its last collective before gloo is torn down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
