"""``python -m hf_dp_tp.audit``: audit a DPTrainer configuration in one training run.

Launch it like the training it audits (one process per rank)::

    torchrun --nproc-per-node 4 -m hf_dp_tp.audit --model-config examples/data/tiny_llama \\
        --tp-size 2 --noise-multiplier 4 --sample-rate 1 --steps 4 --canaries 1000 \\
        --output-dir out/audit

It trains the model with DPTrainer on synthetic records plus ``--canaries`` canaries (each
included with probability 1/2), scores the canaries, and writes ``audit_report.json`` (claimed ε,
the lower bound at ``--confidence``, canaries, guesses, correct guesses, configuration,
diagnostics), ``canary_scores.csv`` and a plot of the scores in vs out to ``--output-dir``.
docs/audit.md explains what the bound does and does not prove.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..layout import GRAD_SAMPLE_MODES
from .canaries import CANARY_KINDS, DEFAULT_SUPPORT, random_token_canaries


@dataclass
class AuditConfig:
    """One audit run. Exactly one of ``noise_multiplier`` and ``target_epsilon``."""

    output_dir: str = "outputs/audit"
    model: str | None = None
    model_config: str | None = None
    dtype: str = "float32"
    tp_size: int = 1
    tp_plan: str | None = "auto"
    grad_sample_mode: str = "tp"
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    clip: float = 1.0
    sample_rate: float = 1.0
    steps: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 0.5
    accountant: str = "prv"
    allow_approximate_accountant: bool = False
    secure_mode: bool = False
    records: int = 16
    seq_len: int = 16
    canaries: int = 1000
    canary_kind: str = "gradient"
    canary_gradient_norm: float = 10.0
    canary_support: int = DEFAULT_SUPPORT
    confidence: float = 0.95
    guess_counts: list[int] | None = None
    audit_seed: int | None = None
    dp_seed: int | None = None
    write_files: bool = True
    extra_args: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of --noise-multiplier and --target-epsilon")
        if (self.model is None) == (self.model_config is None):
            raise ValueError("give exactly one of --model and --model-config")
        if self.canary_kind not in CANARY_KINDS:
            raise ValueError(f"--canary-kind must be one of {CANARY_KINDS}")
        if self.canaries < 2:
            raise ValueError("an audit needs at least 2 canaries")
        if not 0 < self.sample_rate <= 1:
            raise ValueError("--sample-rate must be in (0, 1]")
        if self.records < 1 or self.steps < 1:
            raise ValueError("--records and --steps must be >= 1")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def synthetic_records(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict[str, list]]:
    """``n`` causal-LM records from a random Markov chain with two successors per token (a model
    learns them quickly; canaries of random tokens are outliers among them). The same on every
    rank. The audit's claim is about every dataset, so any data will do."""
    generator = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 2), generator=generator)
    ids = torch.empty(n, seq_len, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (n,), generator=generator)
    for t in range(1, seq_len):
        pick = torch.randint(0, 2, (n,), generator=generator)
        ids[:, t] = successors[ids[:, t - 1], pick]
    return [{"input_ids": row, "labels": row} for row in ids.tolist()]


def load_model(config: AuditConfig):
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, config.dtype)
    if config.model is not None:
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype)
    else:
        model_config = AutoConfig.from_pretrained(config.model_config)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)  # the same initial weights on every rank
        try:
            model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
        finally:
            torch.random.set_rng_state(generator_state)
    model.config.use_cache = False
    return model


def batch_settings(config: AuditConfig, dp_size: int) -> tuple[int, float]:
    """``per_device_train_batch_size`` for the requested q over ``records + canaries`` indices,
    and the q it gives (``B̄ = per-device × accumulation × dp`` must be a whole number, and at
    most the number of indices: q ≤ 1)."""
    total = config.records + config.canaries
    per_step = dp_size * config.gradient_accumulation_steps
    nearest = round(config.sample_rate * total / per_step)
    per_device = max(1, min(nearest, total // per_step))
    return per_device, per_device * per_step / total


def build_trainer(config: AuditConfig):
    """The :class:`~hf_dp_tp.audit.trainer.AuditTrainer` of ``config`` (on every rank)."""
    from ..arguments import DPTrainingArguments
    from .trainer import AuditTrainer

    config.check()
    _, world = _world()
    dp_size = world // config.tp_size if world % config.tp_size == 0 else 1
    per_device, _ = batch_settings(config, dp_size)
    model = load_model(config)
    vocab = model.config.vocab_size
    records = synthetic_records(config.records, config.seq_len, vocab)
    canary_records = None
    if config.canary_kind == "input":
        seed_for_records = config.audit_seed
        if seed_for_records is None:
            from ..randomness import share_seed

            seed_for_records = share_seed(None)
            config = _with(config, audit_seed=seed_for_records)
        canary_records = random_token_canaries(
            config.canaries, config.seq_len, vocab, seed_for_records
        )
    arguments = dict(
        output_dir=config.output_dir,
        tp_size=config.tp_size,
        tp_plan=config.tp_plan,
        grad_sample_mode=config.grad_sample_mode,
        noise_multiplier=config.noise_multiplier,
        target_epsilon=config.target_epsilon,
        target_delta=config.delta,
        per_sample_max_grad_norm=config.clip,
        accountant=config.accountant,
        allow_approximate_accountant=config.allow_approximate_accountant,
        secure_mode=config.secure_mode,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_steps=config.steps,
        optim="sgd",
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        save_strategy="no",
        report_to=[],
        logging_steps=max(1, config.steps),
        log_level="warning",
        disable_tqdm=True,
        dp_seed=config.dp_seed,
        bf16=config.dtype == "bfloat16",
        **config.extra_args,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DPTrainingArguments(**arguments)
        trainer = AuditTrainer(
            model=model,
            args=args,
            train_dataset=records,
            num_canaries=config.canaries,
            canary_kind=config.canary_kind,
            canary_records=canary_records,
            canary_gradient_norm=config.canary_gradient_norm,
            canary_support=config.canary_support,
            audit_seed=config.audit_seed,
        )
    return trainer


def _with(config: AuditConfig, **changes: Any) -> AuditConfig:
    values = asdict(config)
    values.update(changes)
    return AuditConfig(**values)


def _configuration(config: AuditConfig) -> dict[str, Any]:
    """The run's settings for the report, without the seeds (they are secrets of the audit)."""
    values = asdict(config)
    for key in ("audit_seed", "dp_seed", "write_files", "extra_args"):
        values.pop(key)
    values["seeds_fixed"] = config.audit_seed is not None or config.dp_seed is not None
    return values


def run_audit(config: AuditConfig) -> dict[str, Any]:
    """Train ``config`` with canaries, score them, and return the report (every rank); global
    rank 0 writes it to ``config.output_dir``. Needs torch.distributed initialised when the world
    has more than one process."""
    from .report import build_report, write_report

    trainer = build_trainer(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    record = trainer.audit_record()
    report, _ = build_report(
        record,
        confidence=config.confidence,
        guess_counts=config.guess_counts,
        configuration=_configuration(config),
    )
    rank, _ = _world()
    if rank == 0 and config.write_files:
        report["files"] = write_report(
            config.output_dir, report, record["scores"], record["included"]
        )
    return report


def summary_line(report: dict[str, Any]) -> str:
    verdict = "VIOLATION" if report["violation"] else "no violation detected"
    line = (
        f"audit ({report['canary_kind']} canaries): claimed ε = {report['claimed_epsilon']:.3f} "
        f"(δ = {report['delta']:g}); ε lower bound at {100 * report['confidence']:g}% = "
        f"{report['epsilon_lower_bound']:.3f}; {report['correct']}/{report['guesses']} guesses "
        f"correct on {report['canaries']} canaries: {verdict}"
    )
    check = report["diagnostics"].get("noise_check")
    if check is not None:
        ratio = report["diagnostics"]["noise_std_ratio"]
        line += f"; noise check: {check} (measured/expected noise std {ratio:.2f})"
    return line


def parse_args(argv: list[str] | None = None) -> AuditConfig:
    parser = argparse.ArgumentParser(
        prog="python -m hf_dp_tp.audit",
        description="One-run empirical privacy audit (Steinke, Nasr & Jagielski 2023) of a "
        "DPTrainer configuration: an ε lower bound from canaries. Launch with torchrun, one "
        "process per rank. Fixed seeds are for tests only.",
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="from_pretrained path or hub id of a causal LM")
    model.add_argument(
        "--model-config", help="config path or hub id: a randomly initialised causal LM"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    parser.add_argument("--tp-size", type=int, default=1, help="TP degree (dp = world / tp)")
    parser.add_argument("--tp-plan", default="auto", help="'auto' or 'none'")
    parser.add_argument(
        "--grad-sample-mode",
        default="tp",
        choices=list(GRAD_SAMPLE_MODES),
        help="'tp' (tensor-parallel model) or 'hooks' (no TP): both per-sample hooks",
    )
    noise = parser.add_mutually_exclusive_group(required=True)
    noise.add_argument("--noise-multiplier", type=float, help="σ")
    noise.add_argument("--target-epsilon", type=float, help="ε to calibrate σ for")
    parser.add_argument("--delta", type=float, default=1e-5, help="δ (default 1e-5)")
    parser.add_argument("--clip", type=float, default=1.0, help="per-sample clip norm C")
    parser.add_argument(
        "--sample-rate", type=float, default=1.0, help="Poisson rate q over records + canaries"
    )
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps T")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=0.5, help="SGD learning rate")
    parser.add_argument("--accountant", default="prv", choices=["prv", "rdp", "gdp"])
    parser.add_argument(
        "--allow-approximate-accountant",
        action="store_true",
        help="accept --accountant gdp, whose ε may be below the true privacy loss",
    )
    parser.add_argument(
        "--secure-mode", action="store_true", help="OS CSPRNG noise and keyed Poisson masks"
    )
    parser.add_argument("--records", type=int, default=16, help="ordinary (synthetic) records")
    parser.add_argument("--seq-len", type=int, default=16, help="tokens per record and canary")
    parser.add_argument("--canaries", type=int, default=1000, help="m")
    parser.add_argument("--canary-kind", default="gradient", choices=list(CANARY_KINDS))
    parser.add_argument(
        "--canary-gradient-norm",
        type=float,
        default=10.0,
        help="gradient canaries' norm before clipping, in multiples of C",
    )
    parser.add_argument(
        "--canary-support",
        type=int,
        default=DEFAULT_SUPPORT,
        help="parameter elements each gradient canary is spread over (at most)",
    )
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument(
        "--guess-counts",
        type=int,
        nargs="+",
        help="total guess counts to try (β is split over them); default 5/10/20/40 %% of m",
    )
    parser.add_argument("--output-dir", default="outputs/audit")
    parser.add_argument("--audit-seed", type=int, help="canary seed (tests only)")
    parser.add_argument("--dp-seed", type=int, help="noise/sampling seed (tests only)")
    ns = parser.parse_args(argv)
    tp_plan = None if ns.tp_plan.lower() in ("none", "") else ns.tp_plan
    return AuditConfig(
        output_dir=ns.output_dir,
        model=ns.model,
        model_config=ns.model_config,
        dtype=ns.dtype,
        tp_size=ns.tp_size,
        tp_plan=tp_plan,
        grad_sample_mode=ns.grad_sample_mode,
        noise_multiplier=ns.noise_multiplier,
        target_epsilon=ns.target_epsilon,
        delta=ns.delta,
        clip=ns.clip,
        sample_rate=ns.sample_rate,
        steps=ns.steps,
        gradient_accumulation_steps=ns.gradient_accumulation_steps,
        learning_rate=ns.learning_rate,
        accountant=ns.accountant,
        allow_approximate_accountant=ns.allow_approximate_accountant,
        secure_mode=ns.secure_mode,
        records=ns.records,
        seq_len=ns.seq_len,
        canaries=ns.canaries,
        canary_kind=ns.canary_kind,
        canary_gradient_norm=ns.canary_gradient_norm,
        canary_support=ns.canary_support,
        confidence=ns.confidence,
        guess_counts=ns.guess_counts,
        audit_seed=ns.audit_seed,
        dp_seed=ns.dp_seed,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from ..parallel import destroy_process_groups, init_distributed

    config = parse_args(argv)
    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        init_distributed()
        started = True
    rank = _world()[0]
    try:
        report = run_audit(config)
    finally:
        if started:
            destroy_process_groups()
    if rank == 0:
        print(summary_line(report))
        print(json.dumps({k: report[k] for k in ("epsilon_lower_bound", "claimed_epsilon")}))
    return report
