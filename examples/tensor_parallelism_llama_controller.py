"""DP-SGD fine-tuning of a tensor-parallel Llama with the engine-level API of ``hf_dp_tp``.

What this example demonstrates:

- the ``from_pretrained`` path users take: by default a small Llama is built from a
  ``LlamaConfig`` (sizes from the flags), saved with ``save_pretrained`` to a temporary
  directory and loaded back; ``--model_name_or_path`` loads a local checkpoint instead;
- sharding with ``hf_dp_tp.parallel.apply_tp_plan(model, mesh["tp"], plan)``: ``--plan auto``
  uses the model's own HF ``tp_plan`` (vocab-parallel embedding, column/row-wise attention and
  MLP, gathered ``lm_head``, replicated norms); ``--plan sequence_parallel`` uses
  ``hf_dp_tp.llama_sequence_parallel_plan()``, a torchtitan-style plan of torch ``ParallelStyle``
  objects with sequence-parallel RMSNorms;
- ``--fsdp``: FSDP2 (``fully_shard`` over ``mesh["dp"]``, per decoder layer and the root) on
  top of TP, so parameters, gradients and optimizer state are sharded over DP as well;
  ``--dp_replicate_size r`` with it: HSDP, r replicas each sharded over ``dp / r`` ranks;
- ``PrivacyEngineGradSampleController.make_private`` (or ``make_private_with_epsilon`` with
  ``--target_epsilon``) with ``grad_sample_mode="tp"`` or ``"ghost"``, Poisson sampling and the
  ``("dp", "tp")`` mesh;
- the loss contract: each sample's loss is its mean next-token cross-entropy and the batch loss
  is the mean of those over samples (never the token mean over the whole batch, which mixes
  samples and breaks the per-sample sensitivity); an empty Poisson batch still takes a step;
- ``model.train()`` after ``from_pretrained`` (which returns the model in eval mode, where the
  per-sample hooks do not fire), explicit batch-shaped ``position_ids``, and ε per step.

The data are token sequences drawn from a fixed random Markov chain (each token has a few
allowed successors) by an explicit ``torch.Generator``: learnable, so the loss visibly drops.

Run::

    torchrun --nproc-per-node 2 examples/tensor_parallelism_llama_controller.py
    torchrun --nproc-per-node 2 examples/tensor_parallelism_llama_controller.py \\
        --plan sequence_parallel --target_epsilon 3
    torchrun --nproc-per-node 4 examples/tensor_parallelism_llama_controller.py --tp_size 2
    torchrun --nproc-per-node 4 examples/tensor_parallelism_llama_controller.py --tp_size 2 \
        --fsdp --grad_sample_mode ghost              # FSDP2 over dp × TP, ghost clipping

Two nodes (TP inside a node, DP/FSDP across nodes), run on each node with its rank::

    torchrun --nnodes 2 --node-rank <0|1> --nproc-per-node 2 --rdzv-backend c10d \
        --rdzv-endpoint <node0-host>:29500 examples/tensor_parallelism_llama_controller.py \
        --tp_size 2 --fsdp --grad_sample_mode ghost --model_name_or_path <shared checkpoint>

gloo on CPU; NCCL with one GPU per process when there are at least as many GPUs as processes
(add ``--bf16`` there). The built-in model is written to a temporary directory by rank 0, so
with several nodes pass ``--model_name_or_path`` to a checkpoint every node can read.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from hf_dp_tp import PrivacyEngineGradSampleController, init_dp_tp_mesh
from hf_dp_tp.parallel import (
    apply_tp_plan,
    destroy_process_groups,
    dim_mesh,
    fully_shard_over_dp,
    init_distributed,
    llama_sequence_parallel_plan,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_name_or_path", default=None, help="a local checkpoint (default: build one)"
    )
    model.add_argument("--hidden_size", type=int, default=64)
    model.add_argument("--num_layers", type=int, default=2)
    model.add_argument("--num_heads", type=int, default=4)
    model.add_argument("--num_kv_heads", type=int, default=2)
    model.add_argument("--intermediate_size", type=int, default=128)
    model.add_argument("--vocab_size", type=int, default=128)
    model.add_argument("--tie_embeddings", action="store_true")
    model.add_argument("--bf16", action="store_true", help="bfloat16 weights (meant for GPUs)")
    parallel = parser.add_argument_group("parallelism")
    parallel.add_argument("--tp_size", type=int, default=2, help="tensor-parallel degree")
    parallel.add_argument("--plan", choices=["auto", "sequence_parallel"], default="auto")
    parallel.add_argument(
        "--fsdp",
        action="store_true",
        help="shard parameters, gradients and optimizer state over the DP dim too (FSDP2 "
        "fully_shard per decoder layer and the root, over mesh['dp'])",
    )
    parallel.add_argument(
        "--dp_replicate_size",
        type=int,
        default=1,
        help="with --fsdp: HSDP with this many replicas (e.g. the number of nodes), each FSDP-"
        "sharded over dp / dp_replicate_size ranks",
    )
    parallel.add_argument(
        "--grad_sample_mode",
        choices=["tp", "ghost"],
        default="tp",
        help="per-sample gradients ('tp') or ghost clipping ('ghost')",
    )
    data = parser.add_argument_group("data and training")
    data.add_argument("--num_samples", type=int, default=4096, help="synthetic dataset size")
    data.add_argument("--seq_len", type=int, default=32)
    data.add_argument("--batch_size", type=int, default=128, help="expected batch per DP rank")
    data.add_argument("--epochs", type=int, default=1)
    data.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides epochs)")
    data.add_argument("--lr", type=float, default=1e-2)
    data.add_argument("--seed", type=int, default=0)
    privacy = parser.add_argument_group("privacy")
    privacy.add_argument("--sigma", type=float, default=0.8, help="noise multiplier σ")
    privacy.add_argument("--clip", type=float, default=1.0, help="per-sample clip norm C")
    privacy.add_argument("--delta", type=float, default=1e-5)
    privacy.add_argument(
        "--target_epsilon", type=float, default=None, help="calibrate σ to spend this ε"
    )
    privacy.add_argument(
        "--secure_mode", action="store_true", help="OS-CSPRNG noise and keyed Poisson masks"
    )
    return parser.parse_args()


def build_llama(args: argparse.Namespace, path: str) -> None:
    """Save a randomly initialised Llama of the requested size to ``path``."""
    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=max(args.seq_len, 64),
        tie_word_embeddings=args.tie_embeddings,
    )
    torch.manual_seed(args.seed)
    LlamaForCausalLM(config).save_pretrained(path)


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    """``from_pretrained`` on every rank: the same full weights everywhere, sharded later.

    Without ``--model_name_or_path``, rank 0 builds the model into a temporary directory that
    the other ranks read (one node, or a temporary directory every node shares).
    """
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.model_name_or_path is not None:
        return AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype)
    is_rank0 = dist.get_rank() == 0
    with tempfile.TemporaryDirectory() if is_rank0 else nullcontext() as tmp:
        path = [tmp]
        dist.broadcast_object_list(path, src=0)
        if is_rank0:
            build_llama(args, tmp)
        dist.barrier()
        model = AutoModelForCausalLM.from_pretrained(path[0], dtype=dtype)
        dist.barrier()  # every rank has read the files before rank 0 deletes them
    return model


def markov_dataset(args: argparse.Namespace, vocab_size: int) -> TensorDataset:
    """``num_samples`` sequences of a random Markov chain with 4 successors per token."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    successors = torch.randint(0, vocab_size, (vocab_size, 4), generator=gen)
    tokens = torch.empty(args.num_samples, args.seq_len, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab_size, (args.num_samples,), generator=gen)
    for t in range(1, args.seq_len):
        choice = torch.randint(0, 4, (args.num_samples,), generator=gen)
        tokens[:, t] = successors[tokens[:, t - 1], choice]
    return TensorDataset(tokens)


def per_sample_losses(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Each sample's mean next-token cross-entropy, shape ``[B]``."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    # Explicit (the sequence-parallel plan needs them) and batch-shaped ([B, T]).
    positions = positions.unsqueeze(0).expand_as(input_ids)
    logits = model(input_ids=input_ids, position_ids=positions).logits
    if isinstance(logits, DTensor):
        logits = logits.full_tensor()
    logits, targets = logits[:, :-1].float(), input_ids[:, 1:]
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return per_token.view(targets.shape).mean(dim=1)


def main() -> None:
    args = parse_args()
    device = init_distributed()
    rank = dist.get_rank()
    hf_logging.disable_progress_bar()
    if args.bf16 and device.type != "cuda" and rank == 0:
        print("warning: --bf16 on CPU is slow; it is meant for GPUs")
    if args.plan == "sequence_parallel" and args.seq_len % args.tp_size != 0:
        raise SystemExit(f"--plan sequence_parallel needs seq_len divisible by {args.tp_size}")
    if args.dp_replicate_size > 1 and not args.fsdp:
        raise SystemExit("--dp_replicate_size needs --fsdp (HSDP replicates sharded groups)")
    mesh = init_dp_tp_mesh(args.tp_size, dp_replicate_size=args.dp_replicate_size)
    dp_mesh = dim_mesh(mesh, "dp")  # every rank that draws its own part of the batch
    dp_group = dp_mesh.get_group()

    model = load_model(args)
    model.config.use_cache = False
    model.to(device)
    plan = "auto" if args.plan == "auto" else llama_sequence_parallel_plan()
    apply_tp_plan(model, mesh["tp"], plan)
    if args.fsdp:  # after TP, as torchtitan does: fully_shard each decoder layer, then the root
        fully_shard_over_dp(model, mesh)
    model.train()  # from_pretrained returns eval mode, where the per-sample hooks stay silent

    dataset = markov_dataset(args, model.config.vocab_size)

    engine = PrivacyEngineGradSampleController(accountant="prv", secure_mode=args.secure_mode)
    seeds = (
        {} if args.secure_mode else {"sampling_seed": args.seed + 2, "noise_seed": args.seed + 3}
    )
    common = dict(
        module=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0),
        data_loader=DataLoader(dataset, batch_size=args.batch_size),
        max_grad_norm=args.clip,
        grad_sample_mode=args.grad_sample_mode,
        poisson_sampling=True,
        device_mesh=mesh,
        **seeds,
    )
    if args.target_epsilon is None:
        controller, optimizer, loader = engine.make_private(noise_multiplier=args.sigma, **common)
    else:  # σ calibrated so that the planned steps (or epochs) spend exactly target_epsilon
        budget = {"steps": args.steps} if args.steps else {"epochs": args.epochs}
        controller, optimizer, loader = engine.make_private_with_epsilon(
            target_epsilon=args.target_epsilon, target_delta=args.delta, **budget, **common
        )
    total_steps = args.steps or args.epochs * len(loader)  # len(loader): steps per epoch
    if rank == 0:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"dp={dp_mesh.size()}{' (FSDP)' if args.fsdp else ''} tp={mesh['tp'].size()} "
            f"{f'replicas={args.dp_replicate_size} ' if args.dp_replicate_size > 1 else ''}"
            f"plan={args.plan} mode={args.grad_sample_mode} device={device} "
            f"dtype={next(model.parameters()).dtype} "
            f"params={trainable} N={len(dataset)} q={engine.sample_rate:.4f} "
            f"steps={total_steps} σ={optimizer.noise_multiplier:.3f} C={args.clip}"
        )

    start, step = time.perf_counter(), 0
    for _ in range(math.ceil(total_steps / len(loader))):
        for (input_ids,) in loader:
            if len(input_ids) > 0:
                losses = per_sample_losses(model, input_ids.to(device))
                losses.mean().backward()  # the mean over samples (loss_reduction="mean")
            else:
                # An empty Poisson batch. HF Llama cannot run a batch of 0 (its attention
                # reshapes with -1), but every TP peer received the same empty batch, so they
                # all skip forward/backward together and no TP collective is left unmatched.
                # The step itself must still run on every rank: noise on a zero sum, the DP
                # all-reduce and one accountant step.
                losses = torch.zeros(0, device=device)
                if args.fsdp:
                    # FSDP's all-gathers are DP collectives: run a stand-in record's forward
                    # and backward and discard everything (zero loss, per-sample grads dropped)
                    stand_in = dataset[0][0].unsqueeze(0).to(device)
                    (per_sample_losses(model, stand_in) * 0.0).sum().backward()
                    controller.zero_grad_sample()
            optimizer.step()
            optimizer.zero_grad()
            step += 1

            stats = torch.stack([losses.detach().sum(), losses.new_tensor(float(len(losses)))])
            dist.all_reduce(stats, group=dp_group)  # the whole logical batch, for the log
            epsilon = engine.get_epsilon(args.delta)
            if rank == 0:
                count = int(stats[1])
                shown = f"{(stats[0] / count).item():.4f}" if count else "(empty)"
                print(
                    f"step {step:3d}/{total_steps} | batch {count:3d} | loss {shown} | "
                    f"ε {epsilon:.3f} (δ={args.delta:g})"
                )
            if step == total_steps:
                break

    if rank == 0:
        print(
            f"done: {step} steps in {time.perf_counter() - start:.1f}s, "
            f"ε = {engine.get_epsilon(args.delta):.3f} at δ = {args.delta:g} "
            f"(uniform-guess loss {math.log(model.config.vocab_size):.3f}, best {math.log(4):.3f})"
        )
    controller.cleanup()
    destroy_process_groups()


if __name__ == "__main__":
    main()
