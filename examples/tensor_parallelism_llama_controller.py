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
  per-sample hooks do not fire), explicit batch-shaped ``position_ids``, and ε per step;
- what a DP run may print: ε and the loss on held-out sequences, never the realised (Poisson)
  batch sizes or the loss on the training batches, which the guarantee does not cover.

The Poisson batches and the noise come from fresh secrets that all ranks agree on at start-up
(the library's default; ``--secure_mode`` for OS-CSPRNG noise and keyed masks): ``--seed`` only
fixes the built model's initialisation and the synthetic data. ``--dp_seed N`` fixes them too,
for reproducibility tests only: it makes every batch and the noise public.

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
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from hf_dp_tp import GradSampleControllerTP, PrivacyEngineGradSampleController
from hf_dp_tp.parallel import (
    ParallelDims,
    destroy_process_groups,
    dim_mesh,
    init_distributed,
    llama_sequence_parallel_plan,
)
from hf_dp_tp.parallelize import parallelize
from hf_dp_tp.sampling import stand_in_batch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    data.add_argument("--num_samples", type=int, default=4096, help="training sequences")
    data.add_argument("--num_eval", type=int, default=256, help="held-out sequences")
    data.add_argument(
        "--eval_steps",
        type=int,
        default=20,
        help="held-out loss every this many steps (0: at the end)",
    )
    data.add_argument("--seq_len", type=int, default=32)
    data.add_argument("--batch_size", type=int, default=128, help="expected batch per DP rank")
    data.add_argument("--epochs", type=int, default=1)
    data.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides epochs)")
    data.add_argument("--lr", type=float, default=1e-2)
    data.add_argument(
        "--seed",
        type=int,
        default=0,
        help="built model's initialisation and synthetic data (public)",
    )
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
    privacy.add_argument(
        "--dp_seed",
        type=int,
        default=None,
        help="fix the seed of the Poisson batches and the noise, for reproducibility tests only: "
        "whoever knows it rebuilds every batch and subtracts the noise. Default: fresh secrets "
        "from os.urandom, agreed by all ranks",
    )
    return parser.parse_args(argv)


def dp_randomness(args: argparse.Namespace, rank: int) -> dict[str, int]:
    """The seeds ``make_private`` gets: none by default (fresh secrets, the library's default);
    ``--dp_seed`` only behind a loud warning. ``--seed`` never reaches the sampler or the noise."""
    if args.dp_seed is None:
        return {}
    if args.secure_mode:
        raise SystemExit("--secure_mode draws its randomness from the OS: drop --dp_seed")
    if rank == 0:
        warnings.warn(
            f"--dp_seed {args.dp_seed}: the Poisson batches and the noise of this run are PUBLIC "
            "(anyone who knows the seed rebuilds every batch and subtracts the noise). Use it "
            "for reproducibility tests only, never on private data.",
            stacklevel=2,
        )
    return {"sampling_seed": args.dp_seed, "noise_seed": args.dp_seed}


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


def markov_datasets(
    args: argparse.Namespace, vocab_size: int
) -> tuple[TensorDataset, torch.Tensor]:
    """``num_samples`` training and ``num_eval`` held-out sequences of a random Markov chain with
    4 successors per token."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    successors = torch.randint(0, vocab_size, (vocab_size, 4), generator=gen)
    total = args.num_samples + args.num_eval
    tokens = torch.empty(total, args.seq_len, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab_size, (total,), generator=gen)
    for t in range(1, args.seq_len):
        choice = torch.randint(0, 4, (total,), generator=gen)
        tokens[:, t] = successors[tokens[:, t - 1], choice]
    return TensorDataset(tokens[: args.num_samples]), tokens[args.num_samples :]


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


def held_out_loss(
    model: torch.nn.Module,
    controller: GradSampleControllerTP,
    held_out: torch.Tensor,
    device: torch.device,
    batch_size: int = 64,
) -> float:
    """Mean loss on the held-out sequences: no per-sample gradients, no noise. Every rank runs it
    on the same sequences (the TP and FSDP collectives)."""
    model.eval()
    total = 0.0
    with controller.hooks_disabled(), torch.no_grad():
        for chunk in held_out.split(batch_size):
            total += per_sample_losses(model, chunk.to(device)).sum().item()
    model.train()
    return total / max(1, len(held_out))


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
    dims = ParallelDims.for_world(
        dist.get_world_size(), args.tp_size, fsdp=args.fsdp, replicas=args.dp_replicate_size
    )
    mesh = dims.build_mesh()
    dp_mesh = dim_mesh(mesh, "dp")  # every rank that draws its own part of the batch

    model = load_model(args)
    model.config.use_cache = False
    model.to(device)
    plan = "auto" if args.plan == "auto" else llama_sequence_parallel_plan()
    parallelize(model, dims, mesh, plan)  # TP, then FSDP (each decoder layer, then the root)
    model.train()  # from_pretrained returns eval mode, where the per-sample hooks stay silent

    dataset, held_out = markov_datasets(args, model.config.vocab_size)

    engine = PrivacyEngineGradSampleController(accountant="prv", secure_mode=args.secure_mode)
    common = dict(
        module=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0),
        data_loader=DataLoader(dataset, batch_size=args.batch_size),
        max_grad_norm=args.clip,
        grad_sample_mode=args.grad_sample_mode,
        poisson_sampling=True,
        device_mesh=mesh,
        **dp_randomness(args, rank),
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
            f"dp={dp_mesh.size()}{' (FSDP)' if dims.fsdp_enabled else ''} tp={mesh['tp'].size()} "
            f"{f'replicas={args.dp_replicate_size} ' if args.dp_replicate_size > 1 else ''}"
            f"plan={args.plan} mode={args.grad_sample_mode} device={device} "
            f"dtype={next(model.parameters()).dtype} "
            f"params={trainable} N={len(dataset)} held-out={len(held_out)} "
            f"q={engine.sample_rate:.4f} "
            f"steps={total_steps} σ={optimizer.noise_multiplier:.3f} C={args.clip}"
        )

    def report_held_out(when: str) -> float:
        loss = held_out_loss(model, controller, held_out, device)
        if rank == 0:
            print(f"{when} | held-out loss {loss:.4f}")
        return loss

    report_held_out("before training")
    start, step = time.perf_counter(), 0
    for _ in range(math.ceil(total_steps / len(loader))):
        for (input_ids,) in loader:
            if len(input_ids) > 0:
                losses = per_sample_losses(model, input_ids.to(device))
                losses.mean().backward()  # the mean over samples (loss_reduction="mean")
            # Otherwise an empty Poisson batch. HF Llama cannot run a batch of 0 (its attention
            # reshapes with -1), but every TP peer received the same empty batch, so they all
            # skip forward/backward together and no TP collective is left unmatched. The step
            # itself must still run on every rank: noise on a zero sum, the DP all-reduce and
            # one accountant step.
            elif dims.fsdp_enabled:
                # FSDP's all-gathers are DP collectives: run a forward and backward on a
                # synthetic stand-in that carries no record (a record's shape, constant ids)
                # and discard everything (zero loss, per-sample grads dropped)
                stand_in = stand_in_batch(dataset[0][0].unsqueeze(0)).to(device)
                (per_sample_losses(model, stand_in) * 0.0).sum().backward()
                controller.zero_grad_sample()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            # ε only: the realised batch size and the loss on it are private (not covered by ε)
            epsilon = engine.get_epsilon(args.delta)
            if rank == 0:
                print(f"step {step:3d}/{total_steps} | ε {epsilon:.3f} (δ={args.delta:g})")
            if args.eval_steps and step % args.eval_steps == 0 and step < total_steps:
                report_held_out(f"step {step:3d}/{total_steps}")
            if step == total_steps:
                break

    final = report_held_out("after training")
    if rank == 0:
        print(
            f"done: {step} steps in {time.perf_counter() - start:.1f}s, "
            f"ε = {engine.get_epsilon(args.delta):.3f} at δ = {args.delta:g}, held-out loss "
            f"{final:.4f} (uniform-guess loss {math.log(model.config.vocab_size):.3f}, best "
            f"{math.log(4):.3f})"
        )
    controller.cleanup()
    destroy_process_groups()


if __name__ == "__main__":
    main()
