"""DP-SGD on a tensor-parallel toy network, with the engine-level API of ``hf_dp_tp``.

What this example demonstrates:

- a small classifier (three ``nn.Linear`` layers and a ``nn.LayerNorm``) sharded over the TP
  ranks with a torch ``parallelize_module``-style plan applied by ``hf_dp_tp.parallel.apply_tp_plan``:
  ``fc1`` column-wise, ``fc2`` row-wise, the norm replicated, ``head`` column-wise with a
  gathered output;
- ``PrivacyEngineGradSampleController(accountant="prv").make_private(...)`` with
  ``grad_sample_mode="tp"``, Poisson sampling and the 2-D ``("dp", "tp")`` mesh from
  ``init_dp_tp_mesh``: per-sample gradients on local shards, norms reduced over the TP group,
  Gaussian noise once per step, DP all-reduce, division by the expected global batch;
- a per-sample loss reduced by a mean over the samples of the (possibly empty) Poisson batch:
  an empty batch still runs forward, backward and ``optimizer.step()`` (the collectives must
  match on every rank), with a loss of ``0`` (a sum) instead of the ``NaN`` of an empty mean;
- ε reported after every step by the PRV accountant, and evaluation on held-out records with the
  per-sample hooks switched off (``controller.hooks_disabled()``);
- what a DP run may print: ε and metrics on held-out data, never the realised (Poisson) batch
  sizes or metrics on the training records, which the guarantee does not cover.

The Poisson batches and the noise come from fresh secrets that all ranks agree on (the library's
default): ``--seed`` only fixes the model initialisation and the synthetic data. ``--dp_seed N``
fixes them too, for reproducibility tests only: it makes every batch and the noise public.

Run (2 processes: dp=1 × tp=2; 4 processes: dp=2 × tp=2)::

    torchrun --nproc-per-node 2 examples/tensor_parallelism_toy_controller.py
    torchrun --nproc-per-node 4 examples/tensor_parallelism_toy_controller.py --tp_size 2

gloo on CPU; NCCL with one GPU per process when there are at least as many GPUs as processes.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.utils.data import DataLoader, TensorDataset

from hf_dp_tp import GradSampleControllerTP, PrivacyEngineGradSampleController, init_dp_tp_mesh
from hf_dp_tp.parallel import apply_tp_plan, destroy_process_groups, init_distributed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp_size", type=int, default=2, help="tensor-parallel degree")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sigma", type=float, default=1.0, help="noise multiplier σ")
    parser.add_argument("--clip", type=float, default=1.0, help="per-sample clip norm C")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument(
        "--batch_size", type=int, default=64, help="expected logical batch per DP rank"
    )
    parser.add_argument("--num_samples", type=int, default=2048, help="training records")
    parser.add_argument("--num_eval", type=int, default=512, help="held-out records")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument(
        "--seed", type=int, default=0, help="model initialisation and synthetic data (public)"
    )
    parser.add_argument(
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
    if rank == 0:
        warnings.warn(
            f"--dp_seed {args.dp_seed}: the Poisson batches and the noise of this run are PUBLIC "
            "(anyone who knows the seed rebuilds every batch and subtracts the noise). Use it "
            "for reproducibility tests only, never on private data.",
            stacklevel=2,
        )
    return {"sampling_seed": args.dp_seed, "noise_seed": args.dp_seed}


class ToyNet(nn.Module):
    def __init__(self, in_dim: int = 16, hidden: int = 64, classes: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))  # local columns of the hidden layer
        h = self.norm(F.relu(self.fc2(h)))  # fc2 all-reduces: the norm sees full rows
        return self.head(h)  # column-wise, gathered: every TP rank gets full logits


# Module name -> torch ParallelStyle (HF style names such as "colwise" work too).
TP_PLAN = {
    "fc1": ColwiseParallel(),
    "fc2": RowwiseParallel(),
    "head": ColwiseParallel(output_layouts=Replicate()),
}


def synthetic_datasets(
    num_samples: int, num_eval: int, seed: int, in_dim: int = 16, classes: int = 4
) -> tuple[TensorDataset, TensorDataset]:
    """Training and held-out records: Gaussian inputs labelled by a random linear teacher;
    identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples + num_eval, in_dim, generator=gen)
    teacher = torch.randn(in_dim, classes, generator=gen)
    y = (x @ teacher).argmax(dim=1)
    return TensorDataset(x[:num_samples], y[:num_samples]), TensorDataset(
        x[num_samples:], y[num_samples:]
    )


def evaluate(
    model: nn.Module,
    controller: GradSampleControllerTP,
    dataset: TensorDataset,
    device: torch.device,
) -> tuple[float, float]:
    """(loss, accuracy) on ``dataset``: no per-sample gradients, no noise; every rank runs it (the
    TP collectives)."""
    model.eval()
    with controller.hooks_disabled(), torch.no_grad():
        x, y = (t.to(device) for t in dataset.tensors)
        logits = model(x)
        loss = F.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(1) == y).float().mean().item()
    model.train()
    return loss, accuracy


def main() -> None:
    args = parse_args()
    device = init_distributed()
    rank = dist.get_rank()
    mesh = init_dp_tp_mesh(args.tp_size)

    # Every rank builds the same full model (same seed), then keeps its own shards.
    torch.manual_seed(args.seed)
    model = ToyNet().to(device)
    apply_tp_plan(model, mesh["tp"], TP_PLAN)
    model.train()

    dataset, held_out = synthetic_datasets(args.num_samples, args.num_eval, seed=args.seed + 1)
    engine = PrivacyEngineGradSampleController(accountant="prv")
    controller, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=args.lr),
        data_loader=DataLoader(dataset, batch_size=args.batch_size),
        noise_multiplier=args.sigma,
        max_grad_norm=args.clip,
        grad_sample_mode="tp",
        poisson_sampling=True,
        device_mesh=mesh,
        **dp_randomness(args, rank),
    )
    if rank == 0:
        dp_size, tp_size = mesh["dp"].size(), mesh["tp"].size()
        print(
            f"dp={dp_size} tp={tp_size} device={device} N={len(dataset)} held-out={len(held_out)} "
            f"q={engine.sample_rate:.4f} steps/epoch={len(loader)} σ={args.sigma} C={args.clip}"
        )

    eval_loss, accuracy = evaluate(model, controller, held_out, device)
    if rank == 0:
        print(f"before training | held-out loss {eval_loss:.4f}, accuracy {accuracy:.3f}")
    start, step = time.perf_counter(), 0
    for epoch in range(args.epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            losses = F.cross_entropy(model(x), y, reduction="none")  # one loss per sample
            # The mean over samples the engine expects (loss_reduction="mean"); an empty
            # Poisson batch gives a 0 loss with a graph, so backward and step still run.
            loss = losses.mean() if len(losses) > 0 else losses.sum()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            # ε only: the realised batch size and the loss on it are private (not covered by ε)
            epsilon = engine.get_epsilon(args.delta)
            if rank == 0:
                print(f"epoch {epoch} step {step:3d} | ε {epsilon:.3f} (δ={args.delta:g})")
        eval_loss, accuracy = evaluate(model, controller, held_out, device)
        if rank == 0:
            print(f"epoch {epoch} | held-out loss {eval_loss:.4f}, accuracy {accuracy:.3f}")

    if rank == 0:
        print(
            f"done: {step} steps in {time.perf_counter() - start:.1f}s, "
            f"held-out accuracy {accuracy:.3f}, ε = {engine.get_epsilon(args.delta):.3f} "
            f"at δ = {args.delta:g}"
        )
    controller.cleanup()
    destroy_process_groups()


if __name__ == "__main__":
    main()
