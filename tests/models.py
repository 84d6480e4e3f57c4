"""Small models, TP plans and the single-process per-sample DP-SGD reference used by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
)


# --------------------------------------------------------------------------- toy MLP
class ToyMLP(nn.Module):
    """Column-wise (with bias) → row-wise (with bias) → column-wise without bias, gathered →
    replicated head; inputs ``[B, T, 8]``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 12)
        self.fc3 = nn.Linear(12, 10, bias=False)
        self.head = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc3(torch.tanh(self.fc2(torch.relu(self.fc1(x)))))))


def toy_mlp_plan() -> dict:
    return {
        "fc1": ColwiseParallel(),
        "fc2": RowwiseParallel(),
        "fc3": ColwiseParallel(output_layouts=Replicate()),
    }


def toy_mlp_batch(n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 3, 8, generator=g), "y": torch.randn(n, 3, 4, generator=g)}


def toy_mlp_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(batch["x"])
    return ((out - batch["y"]) ** 2).flatten(1).sum(1)


# --------------------------------------------------------------------------- embeddings + norms
class EmbedNormNet(nn.Module):
    """Vocab-parallel token embedding, dim-sharded position embedding, sequence-parallel
    LayerNorm and RMSNorm, an MLP and a vocab head; inputs ``ids [B, T]`` (T even)."""

    def __init__(self, vocab: int = 24, dim: int = 16, seq: int = 6) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.norm2 = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
        h = self.tok(ids) + self.pos(positions)
        h = h + self.down(torch.relu(self.up(self.norm1(h))))
        return self.head(self.norm2(h))


def embed_norm_plan() -> dict:
    seq = Shard(1)
    return {
        "tok": RowwiseParallel(
            input_layouts=Replicate(), output_layouts=seq, use_local_output=False
        ),
        "pos": ColwiseParallel(
            input_layouts=Replicate(), output_layouts=seq, use_local_output=False
        ),
        "norm1": SequenceParallel(),
        "up": ColwiseParallel(input_layouts=seq),
        "down": RowwiseParallel(output_layouts=seq, use_local_output=False),
        "norm2": SequenceParallel(),
        "head": ColwiseParallel(input_layouts=seq, output_layouts=Replicate()),
    }


def lm_batch(n: int, vocab: int, seq: int, seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (n, seq), generator=g)}


def token_mean_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each sample's mean next-token cross-entropy (a fixed per-sample reduction)."""
    logits = logits[:, :-1]
    target = ids[:, 1:]
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
    )
    return per_token.view(target.shape).mean(1)


def embed_norm_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return token_mean_losses(model(batch["input_ids"]), batch["input_ids"])


# --------------------------------------------------------------------------- tiny Llama
# the attention and MLP projections of a Llama decoder layer (the LoRA targets in the tests)
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY_LM = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=32,
)


def tiny_llama_config(tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(**TINY_LM, tie_word_embeddings=tie)


def tiny_causal_lm(arch: str = "llama", tie: bool = False, seed: int = 0):
    """A tiny randomly initialised causal LM: ``llama``, ``qwen2`` (q/k/v biases) or ``qwen3``
    (per-head q/k norms, TP style ``replicated_with_grad_allreduce``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    torch.manual_seed(seed)
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    return AutoModelForCausalLM.from_config(config_cls(**TINY_LM, tie_word_embeddings=tie))


def save_tiny_llama(path: str, tie: bool = False, seed: int = 0, arch: str = "llama") -> str:
    tiny_causal_lm(arch, tie, seed).save_pretrained(path)
    return path


def load_tiny_llama(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    return model.train()


def llama_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ids = batch["input_ids"]
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    logits = model(input_ids=ids, position_ids=positions).logits
    if isinstance(logits, DTensor):
        logits = logits.full_tensor()
    return token_mean_losses(logits, ids)


# --------------------------------------------------------------------------- reference
def reference_per_sample_grads(
    model: nn.Module, loss_fn, batch: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-sample grads on the full single-process model, one sample at a time (independent of
    any hook or grad sampler), and their per-sample norms (float64)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    n = next(iter(batch.values())).shape[0]
    per_sample = {name: [] for name in names}
    for i in range(n):
        sample = {k: v[i : i + 1] for k, v in batch.items()}
        loss = loss_fn(model, sample).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for name, p, g in zip(names, params, grads, strict=True):
            per_sample[name].append(torch.zeros_like(p) if g is None else g.detach())
    stacked = {k: torch.stack(v) for k, v in per_sample.items()}
    norms = torch.sqrt(sum(g.double().pow(2).flatten(1).sum(1) for g in stacked.values()))
    return stacked, norms


def reference_dp_update(
    grads: dict[str, torch.Tensor], norms: torch.Tensor, clip: float, expected_batch: float
) -> dict[str, torch.Tensor]:
    """Single-process DP-SGD gradient with σ = 0: Σ_i min(1, C/(n_i+1e-6)) g_i / B̄."""
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {
        k: torch.einsum("n,n...->...", factors, g.double()) / expected_batch
        for k, g in grads.items()
    }


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered to a full plain tensor (a collective for DTensors)."""
    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
    }


def markov_records(n: int, seq: int, vocab: int, seed: int = 0) -> dict[str, list]:
    """Token sequences from a peaked random Markov chain (the audit's synthetic records, as
    columns): a causal LM learns them quickly."""
    from hf_dp_tp.audit.run import synthetic_records

    ids = [record["input_ids"] for record in synthetic_records(n, seq, vocab, seed)]
    return {"input_ids": ids, "labels": [list(row) for row in ids]}


def dp_optimizer(
    optimizer, mesh, *, clip: float, expected_batch: float, sigma: float = 0.0, **kwargs
):
    """``DPOptimizerTP`` for tests, without the σ = 0 "not private" warning."""
    import warnings

    from hf_dp_tp import DPOptimizerTP

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPOptimizerTP(
            optimizer,
            noise_multiplier=sigma,
            max_grad_norm=clip,
            expected_batch_size=expected_batch,
            mesh=mesh,
            **kwargs,
        )


def unit_sgd_dp_optimizer(model, mesh, *, clip: float, expected_batch: float):
    """SGD(lr=1) wrapped by ``DPOptimizerTP`` with σ = 0: the applied update is the DP gradient."""
    return dp_optimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), mesh, clip=clip, expected_batch=expected_batch
    )
