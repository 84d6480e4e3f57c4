"""``DPTrainer``: ``transformers.Trainer`` with DP-SGD on a tensor-parallel model.

Swap ``Trainer`` for ``DPTrainer`` and ``TrainingArguments`` for ``DPTrainingArguments``; launch
with ``torchrun`` or ``accelerate launch``. What changes relative to ``Trainer``:

- the model is sharded over the TP group (``tp_plan``) unless it already is, and a
  :class:`~hf_dp_tp.GradSampleControllerTP` computes per-sample gradients on its local shards;
- the train loader is a Poisson loader on the ``(dp, tp)`` mesh (one mask per logical batch,
  ``gradient_accumulation_steps`` micro-batches each), never re-sharded by accelerate;
- ``training_step`` uses a fixed per-sample loss reduction and clips every micro-batch;
  ``create_optimizer`` wraps the optimizer in :class:`~hf_dp_tp.DPOptimizerTP`, which owns the
  gradient (Trainer's loss division by TP size, replicated-gradient averaging and batch-gradient
  clipping are switched off — and so is logging the non-private gradient norm);
- ε and δ are added to every log record, training stops before the budget is exceeded, the
  privacy ledger is saved with every checkpoint and restored on resume, and a privacy report is
  written to ``output_dir`` at the end.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from .accounting import calibrate_noise_multiplier, epsilon_spent, make_accountant
from .arguments import DPTrainingArguments
from .controller import GradSampleControllerTP
from .lora import peft_tp_plan, prepare_lora_for_tp, save_lora_adapter
from .losses import PerSampleLoss, default_per_sample_loss
from .optimizer import DPOptimizerTP
from .parallel import (
    MeshInfo,
    apply_tp_plan,
    check_tp_divisibility,
    destroy_process_groups,
    full_state_dict,
    has_dtensor_parameters,
    init_dp_tp_mesh,
    resolve_mesh,
)
from .randomness import agree_on_key, agree_on_seed
from .sampling import DistributedPoissonBatchSampler, collate_with_empty

logger = logging.get_logger(__name__)

LEDGER_NAME = "dp_ledger.json"
REPORT_NAME = "privacy_report.json"
OPTIMIZER_RANK_NAME = "optimizer.rank{rank}.pt"


class PoissonDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`DistributedPoissonBatchSampler`; ``set_epoch`` reaches the
    sampler (Trainer calls it at every epoch, also after skipping batches on resume)."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


_CLEANUP_REGISTERED = False


def _destroy_process_group_at_exit() -> None:
    """Tear the process groups down before the interpreter exits: left to interpreter shutdown,
    gloo's threads can abort the process after training."""
    global _CLEANUP_REGISTERED
    if _CLEANUP_REGISTERED:
        return
    _CLEANUP_REGISTERED = True
    atexit.register(destroy_process_groups)


def _no_gather(tensors, *args, **kwargs):
    return tensors


def _batch_size(inputs: Mapping[str, Any]) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return value.shape[0]
    return 0


def _fingerprint(inputs: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    """A cheap order-sensitive checksum of the integer/float tensors of a batch."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for key in sorted(inputs):
        value = inputs[key]
        if isinstance(value, torch.Tensor) and value.numel() > 0:
            flat = value.detach().reshape(-1).to(device=device, dtype=torch.float64)
            weights = torch.arange(1, flat.numel() + 1, device=device, dtype=torch.float64)
            total = total + (flat * torch.sin(weights)).sum() + flat.numel()
    return total


class _PrivacyCallback(TrainerCallback):
    """Stops training before the step that would exceed ``target_epsilon``."""

    def __init__(self, trainer: DPTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if args.target_epsilon is None:
            return control
        # ε after the steps σ was calibrated for is within the budget; check only beyond them
        if state.global_step < (trainer.calibrated_steps or trainer.planned_steps):
            return control
        if trainer.epsilon_after_next_step() > args.target_epsilon:
            if not control.should_training_stop:
                logger.warning(
                    f"privacy budget spent: ε={trainer.get_epsilon():.4g} at step "
                    f"{state.global_step}; one more step would exceed target_epsilon="
                    f"{args.target_epsilon}. Stopping."
                )
            control.should_training_stop = True
        return control


class DPTrainer(Trainer):
    """A ``Trainer`` that trains with DP-SGD, on a tensor-parallel model when ``tp_size > 1``.

    Args:
        model: a ``PreTrainedModel`` (full weights on every rank, sharded here with
            ``args.tp_plan``), or one already loaded with a TP plan (``from_pretrained(...,
            distributed_config=DistributedConfig(tp_size=...))``) or parallelized by the user.
        args: :class:`~hf_dp_tp.DPTrainingArguments`.
        per_sample_loss: ``fn(model, inputs) -> (losses [B], outputs)``; the default handles
            causal LMs (mean next-token loss over each sample's own labels), token and sequence
            classification.
        **kwargs: everything ``Trainer`` takes (``train_dataset``, ``eval_dataset``,
            ``data_collator``, ``processing_class``, ``callbacks``, ``optimizers``, ...).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: DPTrainingArguments | None = None,
        *,
        per_sample_loss: PerSampleLoss | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, DPTrainingArguments):
            raise TypeError("DPTrainer needs args=DPTrainingArguments(...)")
        if model is None:
            raise ValueError("DPTrainer needs a model (model_init is not supported).")
        _ = args.device  # under torchrun/accelerate this initialises torch.distributed
        self.device_mesh = self._build_mesh(args)
        if self.device_mesh is not None:
            _destroy_process_group_at_exit()
        model = self._parallelize(model, args)
        # Trainer refuses checkpoints of models sharded at load time (DistributedConfig) because
        # it cannot save their optimizer state; DPTrainer saves per-rank optimizer state, gathered
        # weights and the privacy ledger, and loads them back shard by shard (see _save,
        # _save_optimizer_and_scheduler, _load_from_checkpoint), so that refusal does not apply.
        save_only_model = args.save_only_model
        if getattr(model, "is_distributed_loading_by_transformers", False):
            args.save_only_model = True
        try:
            super().__init__(model=model, args=args, **kwargs)
        finally:
            args.save_only_model = save_only_model
        if dist.is_initialized() and dist.get_world_size() > 1:
            # The model owns its placement; accelerate must not wrap it in DDP, and every rank
            # takes part in the gathers of save_model.
            self.is_distributed_loading_by_transformers = True

        if self.device_mesh is None:
            self.mesh_info = MeshInfo()
        else:
            self.mesh_info = resolve_mesh(
                self.model, self.device_mesh, tp=args.grad_sample_mode == "tp"
            )
        self.grad_sample_controller = GradSampleControllerTP(
            self.model,
            grad_sample_mode=args.grad_sample_mode,
            mesh_info=self.mesh_info,
            loss_reduction="mean",
        )
        self.per_sample_loss = per_sample_loss or default_per_sample_loss
        self.accountant = make_accountant(args.accountant)
        if args.secure_mode:
            self.dp_seed, self.secure_key = None, agree_on_key(None)
        else:
            self.dp_seed, self.secure_key = agree_on_seed(args.dp_seed), None
        self.noise_multiplier: float | None = args.noise_multiplier
        self.calibrated_steps: int | None = None
        if self.noise_multiplier == 0:
            warnings.warn(
                "noise_multiplier=0: this run is NOT differentially private (epsilon is infinite); "
                "use it only for debugging and equivalence checks.",
                stacklevel=2,
            )
        self._dp_optimizer: DPOptimizerTP | None = None
        self._ledger_to_restore: dict[str, Any] | None = None
        self._batch_sampler: DistributedPoissonBatchSampler | None = None
        self.add_callback(_PrivacyCallback(self))

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _build_mesh(args: DPTrainingArguments):
        if not (dist.is_available() and dist.is_initialized()):
            if args.tp_size > 1:
                raise ValueError(
                    f"tp_size={args.tp_size} needs {args.tp_size} processes: launch with "
                    f"`torchrun --nproc-per-node {args.tp_size} ...` or `accelerate launch`."
                )
            return None
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        return init_dp_tp_mesh(args.tp_size, device_type)

    def _parallelize(self, model: nn.Module, args: DPTrainingArguments) -> nn.Module:
        config = getattr(model, "config", None)
        if args.tp_size > 1:
            check_tp_divisibility(config, args.tp_size)
        if has_dtensor_parameters(model) and args.grad_sample_mode != "tp":
            raise ValueError(
                f"the model has DTensor (tensor-parallel) parameters but grad_sample_mode="
                f"{args.grad_sample_mode!r}: per-sample gradients of shards would be computed as "
                "if they were whole tensors. Use grad_sample_mode='tp'."
            )
        if has_dtensor_parameters(model):
            sizes = {p.device_mesh.size() for p in model.parameters() if isinstance(p, DTensor)}
            if sizes != {args.tp_size}:
                raise ValueError(
                    f"the model is already sharded over {sorted(sizes)} ranks but tp_size="
                    f"{args.tp_size}: set tp_size to the TP degree the model was loaded with."
                )
        elif args.tp_size > 1:
            if args.tp_plan is None:
                raise ValueError(
                    f"tp_size={args.tp_size} with tp_plan=None, but the model is not parallelized:"
                    " pass tp_plan='auto' (the model's HF plan) or an explicit plan."
                )
            if args.device.type != "cpu":
                model = model.to(args.device)
            plan = peft_tp_plan(model, args.tp_plan) if _is_peft(model) else args.tp_plan
            apply_tp_plan(model, self.device_mesh["tp"], plan)
        if _is_peft(model) and args.tp_size > 1:
            # adapters sharded like their base layers and identical on every rank
            prepare_lora_for_tp(model, self.device_mesh["tp"])
        return model.train()

    def _build_accelerator_args(self, **kwargs) -> dict[str, Any]:
        # DPTrainer does the data split (Poisson sampler on the dp/tp mesh) and owns the
        # gradient (DP optimizer), so accelerate gets no TP parallelism config: its TP
        # validation refuses multi-CPU runs and its dataloader sharding is not wanted.
        args = super()._build_accelerator_args(**kwargs)
        args.pop("parallelism_config", None)
        return args

    def _sync_replicated_trainable_parameters(self, model: nn.Module) -> None:
        # Start replicated trainable parameters identical on every rank (e.g. LoRA factors),
        # without Trainer's gradient-averaging hooks: the DP optimizer owns the gradient.
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad and not isinstance(param, DTensor):
                    dist.broadcast(param.data, src=0)

    # ------------------------------------------------------------------ privacy plan
    @property
    def train_size(self) -> int:
        if self.train_dataset is None:
            raise ValueError("DPTrainer: training requires a train_dataset.")
        if isinstance(self.train_dataset, torch.utils.data.IterableDataset) or not hasattr(
            self.train_dataset, "__len__"
        ):
            raise ValueError(
                "DPTrainer needs a map-style train_dataset with a length: Poisson sampling draws "
                "each of the N records independently (an IterableDataset cannot be sampled)."
            )
        return len(self.train_dataset)

    @property
    def expected_batch_size(self) -> int:
        """B̄: per_device_train_batch_size × gradient_accumulation_steps × dp_size."""
        args = self.args
        return (
            args.per_device_train_batch_size
            * args.gradient_accumulation_steps
            * self.mesh_info.dp_size
        )

    @property
    def sample_rate(self) -> float:
        rate = self.expected_batch_size / self.train_size
        if rate > 1:
            raise ValueError(
                f"the expected logical batch {self.expected_batch_size} (per_device_train_batch_"
                f"size × gradient_accumulation_steps × dp_size) exceeds the {self.train_size} "
                "training records: lower the batch settings."
            )
        return rate

    @property
    def steps_per_epoch(self) -> int:
        return max(1, round(1 / self.sample_rate))

    @property
    def planned_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        return max(1, math.ceil(self.args.num_train_epochs * self.steps_per_epoch))

    @property
    def target_delta(self) -> float:
        return self.args.target_delta if self.args.target_delta is not None else 1 / self.train_size

    def _resolve_noise_multiplier(self) -> float:
        if self.noise_multiplier is None:
            self.calibrated_steps = self.planned_steps
            self.noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=self.args.target_epsilon,
                target_delta=self.target_delta,
                sample_rate=self.sample_rate,
                steps=self.planned_steps,
                accountant=self.args.accountant,
            )
        return self.noise_multiplier

    def get_epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default ``target_delta``), identical on every rank."""
        return epsilon_spent(self.accountant, self.target_delta if delta is None else delta)

    def epsilon_after_next_step(self) -> float:
        from opacus.accountants import create_accountant

        probe = create_accountant(mechanism=self.args.accountant)
        probe.load_state_dict(self.accountant.state_dict())
        probe.step(noise_multiplier=self._resolve_noise_multiplier(), sample_rate=self.sample_rate)
        return epsilon_spent(probe, self.target_delta)

    def privacy_report(self) -> dict[str, Any]:
        return {
            "epsilon": self.get_epsilon(),
            "delta": self.target_delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self._dp_optimizer.steps_taken if self._dp_optimizer else 0,
            "accountant": self.args.accountant,
            "per_sample_max_grad_norm": self.args.per_sample_max_grad_norm,
            "expected_batch_size": self.expected_batch_size,
            "dataset_size": self.train_size,
            "dp_size": self.mesh_info.dp_size,
            "tp_size": self.mesh_info.tp_size,
            "poisson_sampling": True,
            "secure_mode": self.args.secure_mode,
            "target_epsilon": self.args.target_epsilon,
        }

    # ------------------------------------------------------------------ data
    def _dataset_and_collator(self, dataset: Dataset, description: str):
        import datasets

        collator = self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description=description)
        else:
            collator = self._get_collator_with_removed_columns(collator, description=description)
        return dataset, collator

    def _loader_kwargs(self) -> dict[str, Any]:
        args = self.args
        kwargs = {
            "num_workers": args.dataloader_num_workers,
            "pin_memory": args.dataloader_pin_memory,
            "persistent_workers": args.dataloader_persistent_workers,
        }
        if args.dataloader_num_workers > 0:
            kwargs["prefetch_factor"] = args.dataloader_prefetch_factor
        return kwargs

    def get_train_dataloader(self) -> DataLoader:
        """Poisson batches on the (dp, tp) mesh: each DP rank gets its share of one mask per
        logical batch, split into ``gradient_accumulation_steps`` micro-batches; TP peers get the
        same lists; empty batches are yielded. Not handed to accelerate (no re-sharding)."""
        dataset, collator = self._dataset_and_collator(self.train_dataset, "training")
        sampler = DistributedPoissonBatchSampler(
            len(dataset),
            self.sample_rate,
            dp_rank=self.mesh_info.dp_rank,
            dp_size=self.mesh_info.dp_size,
            num_micro_batches=self.args.gradient_accumulation_steps,
            seed=self.dp_seed,
            secure_mode=self.args.secure_mode,
            secure_key=self.secure_key,
        )
        self._batch_sampler = sampler
        return PoissonDataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate_with_empty(collator, dataset),
            **self._loader_kwargs(),
        )

    def _plain_loader(self, dataset: Dataset, description: str) -> DataLoader:
        """Evaluation data, the same on every rank (TP peers must see the same batches; DP
        replicas evaluate the whole set, so gathered metrics are unchanged)."""
        dataset, collator = self._dataset_and_collator(dataset, description)
        return DataLoader(
            dataset,
            batch_size=self.args.eval_batch_size,
            shuffle=False,
            collate_fn=collator,
            **self._loader_kwargs(),
        )

    def get_eval_dataloader(self, eval_dataset: str | Dataset | None = None) -> DataLoader:
        if eval_dataset is None and self.eval_dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        elif eval_dataset is None:
            eval_dataset = self.eval_dataset
        return self._plain_loader(eval_dataset, "evaluation")

    def get_test_dataloader(self, test_dataset: Dataset) -> DataLoader:
        return self._plain_loader(test_dataset, "test")

    def evaluation_loop(self, *args, **kwargs):
        # Every rank evaluates the whole set (see _plain_loader): gathering across ranks would
        # repeat each prediction world_size times. Trainer resets gather_function after each loop.
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.gather_function = _no_gather
        return super().evaluation_loop(*args, **kwargs)

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if isinstance(optimizer, DPOptimizerTP):
            return optimizer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # σ = 0 was already warned about at construction
            dp_optimizer = DPOptimizerTP(
                optimizer,
                noise_multiplier=self._resolve_noise_multiplier(),
                max_grad_norm=self.args.per_sample_max_grad_norm,
                expected_batch_size=self.expected_batch_size,
                mesh=self.mesh_info,
                loss_reduction="mean",
                noise_seed=self.dp_seed,
                secure_mode=self.args.secure_mode,
            )
        dp_optimizer.attach_step_hook(self._accountant_step)
        if self._ledger_to_restore is not None:
            dp_optimizer.load_dp_state_dict(self._ledger_to_restore["optimizer"])
        self._dp_optimizer = self.optimizer = dp_optimizer
        return dp_optimizer

    def _accountant_step(self, optimizer: DPOptimizerTP) -> None:
        self.accountant.step(
            noise_multiplier=optimizer.noise_multiplier, sample_rate=self.sample_rate
        )

    def _clip_grad_norm(self, model: nn.Module):
        return None  # per-sample clipping happens in the DP optimizer

    def _get_grad_norm(self, model: nn.Module, grad_norm=None):
        # The autograd gradient is the non-private batch gradient: its norm is never logged.
        return None

    # ------------------------------------------------------------------ step
    def _check_same_batch_on_tp_peers(self, inputs: Mapping[str, Any]) -> None:
        mesh = self.mesh_info
        if mesh.tp_size == 1:
            return
        device = next((v.device for v in inputs.values() if isinstance(v, torch.Tensor)), None)
        device = device or self.args.device
        value = _fingerprint(inputs, device)
        both = torch.stack([value, -value])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=mesh.tp_group)
        if bool(both[0] != -both[1]):
            raise RuntimeError(
                "TP peers received different batches: tensor parallelism would silently compute "
                "garbage. The train loader must not be re-sharded across TP ranks (do not wrap it "
                "with accelerate's prepare, and keep DPTrainer.get_train_dataloader)."
            )

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None, *args, **kwargs
    ) -> torch.Tensor:
        """Forward/backward of one micro-batch with ``mean_i ℓ_i`` of per-sample losses (never a
        cross-sample token count: ``num_items_in_batch`` is ignored), then clip and accumulate.
        An empty Poisson micro-batch skips forward/backward on every TP peer at once."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        self._check_same_batch_on_tp_peers(inputs)
        if _batch_size(inputs) == 0:
            loss = torch.zeros((), device=self.args.device)
        else:
            with self.compute_loss_context_manager():
                losses, _ = self.per_sample_loss(model, inputs)
            loss = losses.mean()
            self.accelerator.backward(loss)
            self._dp_optimizer.clip_and_accumulate()
        return loss.detach() / self.current_gradient_accumulation_steps

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch=None,
        **kwargs,
    ):
        """The mean over samples of per-sample losses (used for evaluation)."""
        losses, outputs = self.per_sample_loss(model, inputs)
        loss = losses.mean()
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._dp_optimizer is not None:
            logs["epsilon"] = self.get_epsilon()
            logs["delta"] = self.target_delta
        super().log(logs, start_time)

    # ------------------------------------------------------------------ train / report
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in output_dir {self.args.output_dir}")
        if resume_from_checkpoint:
            self._load_ledger(resume_from_checkpoint)
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        self._write_privacy_report()
        return output

    def _write_privacy_report(self) -> None:
        report = self.privacy_report()
        if self.args.should_save:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, REPORT_NAME), "w") as f:
                json.dump(report, f, indent=2)
            print("privacy report: " + json.dumps(report))

    # ------------------------------------------------------------------ checkpoints
    def ledger(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue ε and never reuse noise or masks."""
        return {
            "accountant": {
                "mechanism": self.args.accountant,
                "history": [list(entry) for entry in self.accountant.history],
            },
            "noise_multiplier": self.noise_multiplier,
            "calibrated_steps": self.calibrated_steps,
            "sample_rate": self.sample_rate,
            "dp_seed": self.dp_seed,
            "secure_key": self.secure_key.hex() if self.secure_key else None,
            "optimizer": self._dp_optimizer.dp_state_dict() if self._dp_optimizer else None,
            "global_step": self.state.global_step,
        }

    def _load_ledger(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, LEDGER_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"{checkpoint} has no privacy ledger ({LEDGER_NAME}): resuming DP training from it "
                "would reset ε and could reuse noise. Resume only from DPTrainer checkpoints."
            )
        with open(path) as f:
            ledger = json.load(f)
        if ledger["accountant"]["mechanism"] != self.args.accountant:
            raise ValueError(
                f"the checkpoint was accounted with {ledger['accountant']['mechanism']!r}, "
                f"not {self.args.accountant!r}"
            )
        if abs(ledger["sample_rate"] - self.sample_rate) > 1e-12:
            raise ValueError(
                f"the checkpoint's sampling rate {ledger['sample_rate']} differs from this run's "
                f"{self.sample_rate}: keep the dataset and batch settings when resuming."
            )
        self.accountant.history = [tuple(entry) for entry in ledger["accountant"]["history"]]
        self.noise_multiplier = ledger["noise_multiplier"]
        self.calibrated_steps = ledger.get("calibrated_steps")
        if self.args.secure_mode:
            self.secure_key = bytes.fromhex(ledger["secure_key"])
        else:
            self.dp_seed = ledger["dp_seed"]
        self._ledger_to_restore = ledger
        if self._dp_optimizer is not None:
            self._dp_optimizer.load_dp_state_dict(ledger["optimizer"])

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        super()._save_checkpoint(model, trial)
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        output_dir = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        if self.args.should_save:
            with open(os.path.join(output_dir, LEDGER_NAME), "w") as f:
                json.dump(self.ledger(), f)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.mesh_info.tp_size > 1:
            # each TP rank holds different optimizer-state shards: one file per rank
            os.makedirs(output_dir, exist_ok=True)
            path = os.path.join(output_dir, OPTIMIZER_RANK_NAME.format(rank=dist.get_rank()))
            torch.save(self.optimizer.state_dict(), path)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.mesh_info.tp_size > 1:
            path = os.path.join(checkpoint, OPTIMIZER_RANK_NAME.format(rank=dist.get_rank()))
            if os.path.isfile(path):
                self.optimizer.load_state_dict(torch.load(path, weights_only=False))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None):
        model = model if model is not None else self.model
        if not has_dtensor_parameters(model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if _is_peft(model):
            load_full_checkpoint_into_sharded(
                model, resume_from_checkpoint, adapter_name=model.active_adapter
            )
        else:
            load_full_checkpoint_into_sharded(model, resume_from_checkpoint)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """An ordinary, unsharded checkpoint that ``from_pretrained`` loads in one process."""
        if not has_dtensor_parameters(self.model):
            if self.args.should_save:
                super()._save(output_dir, state_dict=state_dict)
            return
        if _is_peft(self.model):
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            save_lora_adapter(self.model, output_dir)  # collective; a plain peft adapter
            if self.args.should_save:
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(output_dir)
                torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
            return
        full = full_state_dict(self.model)  # every rank takes part
        if not self.args.should_save:
            return
        config = getattr(self.model, "config", None)
        distributed_config = getattr(config, "distributed_config", None)
        if distributed_config is not None:
            config.distributed_config = None  # a plain checkpoint, loadable in one process
        try:
            super()._save(output_dir, state_dict=full)
        finally:
            if distributed_config is not None:
                config.distributed_config = distributed_config


def load_full_checkpoint_into_sharded(
    model: nn.Module, checkpoint_dir: str, adapter_name: str | None = None
) -> None:
    """Load an unsharded safetensors checkpoint into a TP-sharded model: each rank copies its own
    slice of every DTensor entry. With ``adapter_name``, the checkpoint is a peft adapter
    (``adapter_model.safetensors``, names without the adapter name) and only its entries load."""
    from safetensors.torch import load_file
    from torch.distributed.tensor import distribute_tensor

    names = sorted(n for n in os.listdir(checkpoint_dir) if n.endswith(".safetensors"))
    wanted = [n for n in names if ("adapter" in n) == (adapter_name is not None)]
    if not wanted:
        raise ValueError(f"no safetensors weights to resume from in {checkpoint_dir}")
    full: dict[str, torch.Tensor] = {}
    for name in wanted:
        full.update(load_file(os.path.join(checkpoint_dir, name)))
    loaded = 0
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            key = name.replace(f".{adapter_name}.", ".") if adapter_name else name
            if key not in full:
                continue
            source = full[key]
            if isinstance(tensor, DTensor):
                local = distribute_tensor(
                    source.to(tensor.dtype),
                    tensor.device_mesh,
                    tensor.placements,
                    src_data_rank=None,
                ).to_local()
                tensor.to_local().copy_(local)
            else:
                tensor.copy_(source.to(dtype=tensor.dtype, device=tensor.device))
            loaded += 1
    if loaded < len(full):
        raise ValueError(
            f"{checkpoint_dir}: only {loaded} of {len(full)} saved tensors match the model's "
            "parameters; resume with the same model and adapter configuration."
        )
