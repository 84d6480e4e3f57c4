"""``DPTrainingArguments``: ``TrainingArguments`` plus the privacy and tensor-parallel settings.

Every field has ``metadata={"help": ...}``, so ``HfArgumentParser`` exposes it on the command line.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from .accounting import ACCOUNTANTS, check_accountant
from .layout import GRAD_SAMPLE_MODES, PLAIN, check_grad_sample_mode, declared_layout
from .memory import MEMORY_CHECKS
from .parallel.dims import sharding_request


def _is_library_frame(code) -> bool:
    """Frames of this package, transformers, dataclasses and dataclass-generated ``__init__``s
    (``<string>``): a warning about an argument belongs to the user line that set it."""
    import transformers

    if code.co_filename == "<string>":
        return code.co_name == "__init__"
    prefixes = (
        os.path.dirname(os.path.abspath(__file__)),
        os.path.dirname(os.path.abspath(transformers.__file__)),
        os.path.abspath(dataclasses.__file__),
    )
    return os.path.abspath(code.co_filename).startswith(prefixes)


def warn_at_caller(message: str) -> None:
    """``warnings.warn`` attributed to the first frame outside this package, transformers and
    dataclasses: the user's ``DPTrainingArguments(...)`` or ``parse_args`` line, not
    ``<string>:128``. Rank 0 only (every rank parses the same arguments); Python's default
    filter then shows it once per line."""
    if os.environ.get("RANK", "0") != "0":
        return
    frame, level = sys._getframe(1), 2
    while frame is not None and _is_library_frame(frame.f_code):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


#: Marks a pickled state whose user-fixed ``dp_seed`` was withheld (see ``__getstate__``).
_SEED_WITHHELD = "_dp_seed_withheld"

#: Trainer settings of the training loader that DPTrainer's Poisson loader replaces, with why.
IGNORED_LOADER_SETTINGS = {
    "dataloader_drop_last": (
        lambda v: bool(v),
        "no Poisson batch is ever dropped: each record joins each logical batch independently "
        "with probability q (what the accountant assumes), and evaluation sees every record",
    ),
    "train_sampling_strategy": (
        lambda v: v not in (None, "random"),
        "Poisson sampling decides the training batches (each record independently with "
        "probability q); grouping, ordering or rebalancing them would void the accounting",
    ),
    "data_seed": (
        lambda v: v is not None,
        "Poisson sampling decides the training batches, from dp_seed or a fresh secret seed "
        "agreed by all ranks; data_seed and seed are public, and the batches must not be",
    ),
}


@dataclass
class DPTrainingArguments(TrainingArguments):
    """Training arguments for :class:`~hf_dp_tp.DPTrainer`.

    Exactly one of ``target_epsilon`` (σ is calibrated for the planned number of steps) and
    ``noise_multiplier`` must be set. ``target_delta`` defaults to ``min(1e-5, 1 / (10 N))`` for
    N training records.
    The expected global logical batch is ``per_device_train_batch_size ×
    gradient_accumulation_steps × dp_size`` with ``dp_size = world_size // tp_size``; the Poisson
    sampling rate is that divided by the dataset size. Trainer's own ``max_grad_norm`` does not
    apply: clipping is per sample, at ``per_sample_max_grad_norm``. Nor do the training-loader
    settings ``dataloader_drop_last``, ``train_sampling_strategy`` and ``data_seed``: Poisson
    sampling decides the batches (each is warned about once when set). ``ddp_timeout`` bounds
    every collective of the run, DPTrainer's own included: a rank that stops responding makes
    the others fail after that many seconds.
    """

    tp_size: int = field(
        default=1,
        metadata={
            "help": "Tensor-parallel degree. The data-parallel degree is world_size // tp_size; "
            "tp_size must divide the world size and the model's attention heads."
        },
    )
    # Typed as a string for the command line; in Python a dict plan is accepted too.
    tp_plan: str | None = field(
        default="auto",
        metadata={
            "help": "'auto': shard with the model's own HF tp_plan; in Python also a dict {module "
            "pattern: style} with HF style names ('colwise', 'rowwise', 'sequence_parallel', ...) "
            "or torch ParallelStyle objects; None: use the model as given (already parallelized, "
            "or no TP)."
        },
    )
    target_epsilon: float | None = field(
        default=None,
        metadata={
            "help": "Privacy budget ε to spend over the planned steps (max_steps or epochs); σ is "
            "calibrated for it. Exactly one of target_epsilon and noise_multiplier."
        },
    )
    noise_multiplier: float | None = field(
        default=None,
        metadata={
            "help": "Noise multiplier σ (noise std σ·C on the summed clipped gradients). 0 is "
            "allowed for debugging only: ε is then infinite. Exactly one of target_epsilon and "
            "noise_multiplier."
        },
    )
    target_delta: float | None = field(
        default=None,
        metadata={
            "help": "δ of the (ε, δ) guarantee. Default min(1e-5, 1/(10 N)) for N training records: "
            "δ must be well below 1/N (publishing one random record outright is (0, 1/N)-DP)."
        },
    )
    per_sample_max_grad_norm: float = field(
        default=1.0, metadata={"help": "Per-sample clip norm C (L2 norm of the whole gradient)."}
    )
    accountant: str = field(
        default="prv",
        metadata={
            "help": "Privacy accountant: 'prv' (default, tight) or 'rdp' (conservative), both "
            "upper bounds on ε; 'gdp' (a central-limit approximation that can understate ε) is "
            "refused unless allow_approximate_accountant is set too.",
            "choices": list(ACCOUNTANTS),
        },
    )
    allow_approximate_accountant: bool = field(
        default=False,
        metadata={
            "help": "Accept accountant='gdp', whose ε may be below the true privacy loss (for "
            "comparisons, never for a stated guarantee): its ε is then marked approximate in the "
            "logs (epsilon_is_upper_bound=0), the ledger and the privacy report."
        },
    )
    poisson_sampling: bool = field(
        default=True,
        metadata={
            "help": "Poisson-sample every logical batch (what the accountant assumes). Turning it "
            "off is refused: fixed-size batches void the stated guarantee."
        },
    )
    grad_sample_mode: str = field(
        default="tp",
        metadata={
            "help": "Clipping method, chosen explicitly: 'tp' (per-sample gradients materialised "
            "by hooks on a tensor-parallel model), 'hooks' (the same without tensor parallelism), "
            "'ghost' (either kind of model: ghost norms and book-keeping clipped sums, no "
            "per-sample gradient of a matrix weight is built; see docs/guide.md).",
            "choices": list(GRAD_SAMPLE_MODES),
        },
    )
    secure_mode: bool = field(
        default=False,
        metadata={
            "help": "Draw noise from stream-cipher keystreams (AES-256-CTR on the CPU, ChaCha20 on "
            "CUDA devices) under fresh os.urandom keys and Poisson "
            "masks from a keyed PRF with a secret key (for runs whose guarantee must not rest on "
            "a seeded PRNG; its cost is in the guide's Secure mode section)."
        },
    )
    dp_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the Poisson masks and the noise. Default: a fresh random seed agreed "
            "by all ranks, never written to disk (a resumed run draws a fresh one). Set it only for "
            "reproducibility tests: anyone who knows it can subtract the noise."
        },
    )
    dp_secrets_file: str | None = field(
        default=None,
        metadata={
            "help": "Opt-in bit-for-bit replay: a file OUTSIDE output_dir where the drawn seed (or, "
            "in secure mode, key) is written with mode 0600 and read back on resume. Whoever "
            "reads it and two checkpoints can subtract the noise: keep it private."
        },
    )
    max_grad_norm: float = field(
        default=0.0,
        metadata={
            "help": "Not used by DPTrainer: clipping is per sample (per_sample_max_grad_norm); "
            "Trainer's batch-gradient clipping would act on non-private gradients."
        },
    )
    check_sample_independence: bool = field(
        default=True,
        metadata={
            "help": "Before the first training step, check on a synthetic probe batch that "
            "replacing one record changes no other sample's per-sample loss or gradient "
            "(docs/usage.md, 'Samples must not mix'); refuse to train otherwise. Costs two "
            "forward/backward passes on 4 samples, once. Turning it off voids the guarantee for "
            "any model or per_sample_loss that mixes samples (warned about)."
        },
    )
    memory_check: str = field(
        default="error",
        metadata={
            "help": "Preflight memory estimate at the start of train() (hf_dp_tp.memory, logged "
            "on rank 0): 'error' (default) refuses a run whose estimate exceeds 1.1x the free "
            "memory per rank and warns above 0.9x; 'warn' only warns; 'off' skips it.",
            "choices": list(MEMORY_CHECKS),
        },
    )
    average_tokens_across_devices: bool = field(
        default=False,
        metadata={
            "help": "Not used by DPTrainer: the loss is a fixed per-sample reduction, never a "
            "cross-sample token count."
        },
    )

    def __post_init__(self) -> None:
        if self.include_num_input_tokens_seen not in ("no", False, None):
            raise ValueError(
                "include_num_input_tokens_seen counts the tokens of the sampled batches, which "
                "reveals the realised (private) Poisson batch sizes: DPTrainer does not support it."
            )
        if self.auto_find_batch_size:
            raise ValueError(
                "auto_find_batch_size=True is not supported by DPTrainer: after an out-of-memory "
                "error it would restart with a smaller batch, redrawing Poisson batches and "
                "changing the expected batch B̄ and the sampling rate q mid-run (the accountant "
                "assumes one q). Set per_device_train_batch_size explicitly to a size that fits, "
                "and use gradient_accumulation_steps for a large logical batch."
            )
        if self.fp16:
            raise ValueError(
                "fp16=True is not supported by DPTrainer: loss scaling would scale the per-sample "
                "gradients before they are clipped. Use bf16=True (no loss scaling) instead."
            )
        if self.max_grad_norm:
            warn_at_caller(
                f"max_grad_norm={self.max_grad_norm} is ignored by DPTrainer: gradients are "
                "clipped per sample at per_sample_max_grad_norm="
                f"{self.per_sample_max_grad_norm} (Trainer's batch-gradient clipping would act "
                "on the non-private gradient)."
            )
            self.max_grad_norm = 0.0
        if not self.check_sample_independence:
            warn_at_caller(
                "check_sample_independence=False: nothing checks that one record changes only its "
                "own loss and gradient; a model or per_sample_loss that mixes samples (batch "
                "statistics, in-batch negatives, a batch that is not dim 0) voids the DP "
                "guarantee without an error."
            )
        for name, (is_set, why) in IGNORED_LOADER_SETTINGS.items():
            value = getattr(self, name)
            if is_set(value):
                warn_at_caller(f"{name}={value!r} is ignored by DPTrainer: {why}.")
        if isinstance(self.tp_plan, str) and self.tp_plan.lower() in ("none", ""):
            self.tp_plan = None  # from the command line
        if self.average_tokens_across_devices:
            self.average_tokens_across_devices = False
        if self.memory_check not in MEMORY_CHECKS:
            raise ValueError(
                f"memory_check must be one of {MEMORY_CHECKS}, got {self.memory_check!r}"
            )
        if not torch.cuda.is_available() and not self.use_cpu:
            self.use_cpu = (
                True  # gloo on CPU: Trainer/accelerate need use_cpu for multi-process CPU
            )
        self._take_sharding_request()
        super().__post_init__()
        self._validate_privacy_settings()
        if self.dp_seed is not None:
            warn_at_caller(
                "dp_seed is set: the noise and the Poisson batches of this run are reproducible by "
                "anyone who knows it, who can then subtract the noise from two checkpoints. Use it "
                "for reproducibility tests only; it is never written under output_dir."
            )

    def _take_sharding_request(self) -> None:
        """Take the sharded-data-parallel idioms (``fsdp=...``, ``parallelism_config=...``, an
        ``accelerate launch`` FSDP or parallelism config) over as DPTrainer's own request
        (:func:`hf_dp_tp.parallel.dims.sharding_request`, which refuses what DPTrainer cannot
        do), kept as ``dp_fully_shard``, ``dp_replicate_size`` and ``dp_mesh_size`` for
        :meth:`hf_dp_tp.parallel.ParallelDims.from_args`. Trainer and accelerate never see
        ``fsdp`` / ``parallelism_config``: DPTrainer applies FSDP2 itself, after TP."""
        request = sharding_request(
            self.fsdp, self.fsdp_config, self.parallelism_config, self.tp_size
        )
        if request.fully_shard and self.grad_sample_mode == "hooks":
            raise ValueError(
                "FSDP shards parameters as DTensors: use grad_sample_mode='tp' or 'ghost', not "
                "'hooks'."
            )
        self.tp_size = request.tp_size
        self.fsdp, self.fsdp_config, self.parallelism_config = "", None, None
        self.dp_fully_shard = request.fully_shard
        self.dp_replicate_size = request.dp_replicate_size
        self.dp_mesh_size = request.dp_mesh_size

    # ------------------------------------------------------------------ representations
    # A user-fixed ``dp_seed`` lets anyone subtract the noise and rebuild every batch, so no
    # representation of the arguments holds it: ``to_dict`` (and with it ``to_json_string``,
    # ``to_sanitized_dict``, loggers, ``trainer_state.json``), ``str``/``repr``, and pickles
    # (``torch.save(args)``: every ``training_args.bin`` Trainer writes or pushes to the Hub).
    # Only the live object (and its in-memory copies) holds it, for the run itself.

    def to_dict(self) -> dict:
        """As ``TrainingArguments.to_dict``, with torch ``ParallelStyle`` objects of a dict
        ``tp_plan`` written as their ``repr`` (so logging integrations can serialise it) and a
        user-fixed ``dp_seed`` redacted (loggers and ``trainer_state.json`` never see it)."""
        out = super().to_dict()
        out["dp_seed"] = None if self.dp_seed is None else "<redacted>"
        if isinstance(out.get("tp_plan"), dict):
            out["tp_plan"] = {
                key: style if isinstance(style, str) else repr(style)
                for key, style in out["tp_plan"].items()
            }
        return out

    def __str__(self) -> str:
        """Every argument as ``to_dict`` gives it (a user-fixed ``dp_seed`` redacted), one per
        line: what scripts log first (``logger.info(f"{training_args}")``)."""
        shown = "".join(f"{key}={value},\n" for key, value in sorted(self.to_dict().items()))
        return f"{type(self).__name__}(\n{shown})"

    __repr__ = __str__

    def __getstate__(self) -> dict[str, Any]:
        """The pickled state, without a user-fixed ``dp_seed``: ``torch.save(args)`` (Trainer's
        ``training_args.bin`` in checkpoints, ``output_dir`` and Hub pushes) never stores it.
        Unpickled arguments have ``dp_seed=None`` (a fresh secret seed): a run that is to
        replay a fixed seed must be given it again."""
        state = dict(self.__dict__)
        if state.get("dp_seed") is not None:
            state["dp_seed"] = None
            state[_SEED_WITHHELD] = True
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        withheld = state.pop(_SEED_WITHHELD, False)
        self.__dict__.update(state)
        if withheld:
            warn_at_caller(
                "these DPTrainingArguments were saved with a user-fixed dp_seed, which is never "
                "stored: here dp_seed is None (a fresh secret seed is drawn). Set dp_seed again "
                "to replay the run's batches and noise."
            )

    def __copy__(self) -> DPTrainingArguments:
        """An in-memory copy keeps ``dp_seed`` (only what leaves the process is redacted)."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> DPTrainingArguments:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def _validate_privacy_settings(self) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "set exactly one of target_epsilon (σ is calibrated for the planned steps) and "
                f"noise_multiplier; got target_epsilon={self.target_epsilon}, "
                f"noise_multiplier={self.noise_multiplier}."
            )
        if self.target_epsilon is not None and not (
            self.target_epsilon > 0 and math.isfinite(self.target_epsilon)
        ):
            raise ValueError(
                f"target_epsilon must be a positive finite number, got {self.target_epsilon}. "
                "ε bounds how much any one training record can change what the trained model "
                "reveals (by a factor of at most e^ε, except with probability δ): ε = 0 would "
                "mean the model learns nothing from the data, and no finite σ reaches it. "
                "Typical values: 1-3 (strong), around 8 (common for fine-tuning), up to 10; to "
                "train without a budget give noise_multiplier instead."
            )
        if self.noise_multiplier is not None:
            if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
                raise ValueError(
                    f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}"
                )
        if self.target_delta is not None and not 0 < self.target_delta < 1:
            raise ValueError(f"target_delta must be in (0, 1), got {self.target_delta}")
        if not (math.isfinite(self.per_sample_max_grad_norm) and self.per_sample_max_grad_norm > 0):
            raise ValueError(
                f"per_sample_max_grad_norm must be a positive finite number, got "
                f"{self.per_sample_max_grad_norm}"
            )
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        check_accountant(
            self.accountant, allow_approximate_accountant=self.allow_approximate_accountant
        )
        check_grad_sample_mode(self.grad_sample_mode)
        if not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise ValueError(f"tp_size must be a positive int, got {self.tp_size!r}")
        if self.tp_size > 1 and declared_layout(self.grad_sample_mode) == PLAIN:
            raise ValueError(
                f"tp_size={self.tp_size} needs grad_sample_mode='tp' or 'ghost', not 'hooks'"
            )
        if not self.poisson_sampling:
            raise ValueError(
                "poisson_sampling=False is not supported by DPTrainer: the accountants assume "
                "Poisson sampling, so fixed-size batches would void the reported guarantee."
            )
        if self.secure_mode and self.dp_seed is not None:
            raise ValueError("secure_mode draws its randomness from the OS: do not set dp_seed.")
        if self.dp_seed is not None and self.dp_secrets_file is not None:
            raise ValueError(
                "give at most one of dp_seed (a fixed seed) and dp_secrets_file (a drawn seed kept "
                "in a private file)."
            )
        if self.tp_plan is not None and not isinstance(self.tp_plan, (str, dict)):
            raise ValueError(f"tp_plan must be 'auto', a dict or None, got {type(self.tp_plan)}")
        if isinstance(self.tp_plan, str) and self.tp_plan != "auto":
            raise ValueError(f"tp_plan must be 'auto', a dict or None, got {self.tp_plan!r}")
