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
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .agreement import fail_together
from .arguments import DPTrainingArguments
from .checkpoint import (
    REPORT_NAME,
    check_secrets_file_location,
    has_sharded_model,
    load_full_checkpoint_into_sharded,
    load_rank_optimizer,
    load_sharded_model,
    read_secrets_file,
    resolve_resume_path,
    save_rank_optimizer,
    save_sharded_model,
    write_ledger,
    write_secrets_file,
)
from .controller import GradSampleControllerTP
from .dataset_checks import check_tokenised
from .layout import PLAIN, infer_layout, model_layout
from .lora import is_peft_model, save_lora_adapter
from .losses import PerSampleLoss, default_per_sample_loss
from .memory import check_memory
from .model_card import write_privacy_card
from .optimizer import DPOptimizerTP
from .parallel import (
    MeshInfo,
    ParallelDims,
    check_tp_divisibility,
    destroy_process_groups,
    full_state_dict,
    release_accelerate_sharding,
    resolve_mesh,
)
from .parallel.groups import collective_device
from .parallelize import parallelize
from .privacy_plan import (
    LedgerError,
    PrivacyPlan,
    check_dataset_size,
    check_layout,
    read_ledger,
)
from .randomness import reseed_global_rngs, share_key, share_seed
from .sampling import DistributedPoissonBatchSampler, collate_with_empty

logger = logging.get_logger(__name__)

#: What the (ε, δ) guarantee does not cover, stated in every privacy report.
NOT_COVERED = (
    "the training loss, gradient-free metrics and evaluation results computed on private data "
    "and logged or reported during training (they are not noised)",
    "hyper-parameter choices tuned on the private data",
)


class PoissonDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`DistributedPoissonBatchSampler`; ``set_epoch`` reaches the
    sampler (Trainer calls it at every epoch, also after skipping batches on resume)."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


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


def _finite_mean(losses: torch.Tensor) -> torch.Tensor:
    """The mean of the finite per-sample losses over the whole micro-batch (what is logged): a
    record with a NaN or inf loss is left out of the update, and must not mark the logged loss
    of the step that sampled it either."""
    finite = torch.where(torch.isfinite(losses), losses, torch.zeros_like(losses))
    return finite.sum() / max(losses.shape[0], 1)


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
    """Stops training at the last step whose ε stays within the *current* ``target_epsilon``."""

    def __init__(self, trainer: DPTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        budget = self.trainer.budget_steps
        if budget is not None and state.global_step >= budget:
            if not control.should_training_stop and state.global_step < state.max_steps:
                logger.warning(
                    f"privacy budget spent: ε={self.trainer.get_epsilon():.4g} at step "
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

    #: The class ``create_optimizer`` wraps the optimizer in; a subclass may change one of its
    #: stages (the privacy audit adds canary gradients before clipping).
    dp_optimizer_class: type[DPOptimizerTP] = DPOptimizerTP

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
        if kwargs.get("train_dataset") is not None:
            check_dataset_size(kwargs["train_dataset"])  # empty or iterable: refused up front
            check_tokenised(
                kwargs["train_dataset"],
                data_collator=kwargs.get("data_collator"),
                per_sample_loss=per_sample_loss,
            )
        # accelerate's FSDP / parallelism switches: DPTrainer took their request over
        release_accelerate_sharding()
        # a resume path given in the arguments is checked before the model is sharded
        resolve_resume_path(args.resume_from_checkpoint, args.output_dir)
        _ = args.device  # under torchrun/accelerate this initialises torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        #: the run's parallelism sizes, decided here once; everything below reads them
        self.parallel_dims = ParallelDims.from_args(
            args, world, int(os.environ.get("LOCAL_WORLD_SIZE", world))
        )
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
                self.model,
                self.device_mesh,
                tp=model_layout(self.model, args.grad_sample_mode, self.device_mesh).tp,
            )
        self.grad_sample_controller = GradSampleControllerTP(
            self.model,
            device_mesh=self.device_mesh,
            grad_sample_mode=args.grad_sample_mode,
            mesh_info=self.mesh_info,
            loss_reduction="mean",
            check_sample_independence=False,  # DPTrainer's own check: _check_sample_independence
        )
        self.per_sample_loss = per_sample_loss or default_per_sample_loss
        self._privacy_plan: PrivacyPlan | None = None
        if self.train_dataset is not None:
            logger.info(
                f"DP-SGD: δ = {self.target_delta:g}, q = {self.sample_rate:.4g}, "
                f"B̄ = {self.expected_batch_size}, N = {self.train_size}"
            )
        self.dp_seed, self.secure_key = self._agree_on_secrets(args)
        if args.noise_multiplier == 0:
            warnings.warn(
                "noise_multiplier=0: this run is NOT differentially private (epsilon is infinite); "
                "use it only for debugging and equivalence checks.",
                stacklevel=2,
            )
        self.budget_steps: int | None = None
        self._dp_optimizer: DPOptimizerTP | None = None
        self._ledger_to_restore: dict[str, Any] | None = None
        self._batch_sampler: DistributedPoissonBatchSampler | None = None
        self._train_collate = None  # the training loader's collate (stand-in batches, FSDP)
        self._stand_in: dict[str, Any] | None = None
        self._sample_independence_checked = False  # once per run, at the first micro-batch
        self._nonfinite_samples_zeroed: int | None = None  # counted at the end of train()
        self._flops_per_micro_batch: float | None = None
        self.add_callback(_PrivacyCallback(self))

    # ------------------------------------------------------------------ set-up
    def _build_mesh(self, args: DPTrainingArguments) -> DeviceMesh | None:
        """The mesh of :attr:`parallel_dims` (None without torch.distributed: one process).

        ``ddp_timeout`` bounds every collective of the run, DPTrainer's own included (accelerate
        does not pass it on for CPU runs, and mesh sub-groups never inherit it): a rank that
        stops responding makes its peers fail after ``ddp_timeout`` seconds, with an error."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        return self.parallel_dims.build_mesh(timeout=args.ddp_timeout_delta)

    def _parallelize(self, model: nn.Module, args: DPTrainingArguments) -> nn.Module:
        """Refuse what the arguments cannot train, then :func:`~hf_dp_tp.parallelize.parallelize`
        (TP with ``args.tp_plan`` when ``tp_size > 1``, LoRA for TP, FSDP)."""
        dims = self.parallel_dims
        if dims.tp_enabled:
            check_tp_divisibility(getattr(model, "config", None), dims.tp)
        model_layout(model, args.grad_sample_mode)  # refuses "hooks" on a DTensor model
        plan = args.tp_plan if dims.tp_enabled else None
        model = parallelize(model, dims, self.device_mesh, plan, device=args.device)
        return model.train()

    @property
    def _fsdp(self) -> bool:
        """Whether DPTrainer shards the model with FSDP over DP (``fsdp=...``, a
        ``ParallelismConfig`` or accelerate's FSDP config): the clipped sums are then streamed per
        micro-batch and the checkpoints hold per-rank model shards."""
        return self.parallel_dims.fsdp_enabled

    @property
    def replays_randomness(self) -> bool:
        """True when the Poisson/noise secret is reused across runs (a user-fixed ``dp_seed`` or a
        ``dp_secrets_file``): a resumed run then continues the same streams."""
        return self.args.dp_seed is not None or self.args.dp_secrets_file is not None

    def _agree_on_secrets(self, args: DPTrainingArguments) -> tuple[int | None, bytes | None]:
        """``(seed, key)`` of the Poisson masks and the noise, identical on every rank: the user's
        ``dp_seed``, the one stored in ``dp_secrets_file``, or fresh from ``os.urandom``. Only an
        explicit ``dp_secrets_file`` (outside ``output_dir``, mode 0600) ever stores it."""
        if args.dp_seed is not None:
            return args.dp_seed, None
        path = args.dp_secrets_file
        first = not dist.is_initialized() or dist.get_rank() == 0
        stored = None
        if path is not None:
            check_secrets_file_location(path, args.output_dir)
            if first:
                stored = read_secrets_file(path, secure_mode=args.secure_mode)
        if args.secure_mode:
            secret: int | bytes = share_key(stored)
        else:
            secret = share_seed(stored)
        if path is not None and first and stored is None:
            write_secrets_file(path, secret)
        return (None, secret) if args.secure_mode else (secret, None)

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
    def privacy_plan(self) -> PrivacyPlan:
        """B̄, q, δ, σ, the accountant and the ledger of this run (built from the train set)."""
        if self._privacy_plan is None:
            args = self.args
            self._privacy_plan = PrivacyPlan(
                dataset_size=check_dataset_size(self.train_dataset),
                expected_batch_size=self.expected_batch_size,
                accountant_name=args.accountant,
                noise_multiplier=args.noise_multiplier,
                target_epsilon=args.target_epsilon,
                target_delta=args.target_delta,
                allow_approximate_accountant=args.allow_approximate_accountant,
            )
        return self._privacy_plan

    @property
    def train_size(self) -> int:
        return self.privacy_plan.dataset_size

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
        return self.privacy_plan.sample_rate

    @property
    def steps_per_epoch(self) -> int:
        return self.privacy_plan.steps_per_epoch

    @property
    def planned_steps(self) -> int:
        return self.privacy_plan.planned_steps(
            max_steps=self.args.max_steps, epochs=self.args.num_train_epochs
        )

    @property
    def target_delta(self) -> float:
        return self.privacy_plan.target_delta

    @property
    def noise_multiplier(self) -> float | None:
        return self.privacy_plan.noise_multiplier

    @property
    def accountant(self):
        return self.privacy_plan.accountant

    def _resolve_noise_multiplier(self) -> float:
        return self.privacy_plan.resolve_noise_multiplier(self.planned_steps)

    def get_epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default ``target_delta``), identical on every rank."""
        return self.privacy_plan.epsilon(delta)

    def privacy_report(self) -> dict[str, Any]:
        return {
            **self.privacy_plan.report(),
            "per_sample_max_grad_norm": self.args.per_sample_max_grad_norm,
            "dp_size": self.mesh_info.dp_size,
            "tp_size": self.mesh_info.tp_size,
            "dp_shard_size": self.mesh_info.dp_shard_size if self._fsdp else 1,
            "dp_replicate_size": self.mesh_info.dp_replicate_size,
            "secure_mode": self.args.secure_mode,
            "nonfinite_gradients_zeroed": self._nonfinite_samples_zeroed,
            "not_covered": list(NOT_COVERED),
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
        collate = collate_with_empty(collator, dataset)
        self._train_collate = collate
        return PoissonDataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, **self._loader_kwargs()
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
            dp_optimizer = self.dp_optimizer_class(
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
        self.privacy_plan.step(optimizer.noise_multiplier)

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
        cross-sample token count: ``num_items_in_batch`` is ignored), then clip and accumulate
        (under FSDP, large clipped sums reduce-scattered at once). An empty Poisson micro-batch
        skips forward/backward on every TP peer at once."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        self._check_same_batch_on_tp_peers(inputs)
        self._check_sample_independence(model)
        # FSDP: the clipped sums are reduce-scattered per micro-batch (held at 1/dp_shard), a
        # collective every DP rank joins after each micro-batch, empty ones included
        stream = self._fsdp
        if _batch_size(inputs) == 0:
            loss = torch.zeros((), device=self.args.device)
            if stream:
                self._run_discarded_stand_in(model)
                self._dp_optimizer.clip_and_accumulate(scatter=True)
        else:
            with self.compute_loss_context_manager():
                losses, _ = self.per_sample_loss(model, inputs)
            self.grad_sample_controller.check_batch_size(losses.shape[0])
            self.accelerator.backward(losses.mean())
            if stream:
                self._dp_optimizer.clip_and_accumulate(scatter=True)
            else:
                self._dp_optimizer.clip_and_accumulate()
            loss = _finite_mean(losses.detach())
        return loss / self.current_gradient_accumulation_steps

    def _check_sample_independence(self, model: nn.Module) -> None:
        """Once per run, before the first micro-batch, on every rank at once: replacing one record
        of a synthetic 4-sample probe (built from the structure of the training set's first
        record, identical on every rank) must change no other sample's per-sample loss or
        gradient (:func:`hf_dp_tp.separability.check_per_sample_losses_and_gradients`;
        ``check_sample_independence`` turns it off)."""
        if self._sample_independence_checked:
            return
        self._sample_independence_checked = True
        if not self.args.check_sample_independence or self._train_collate is None:
            return
        from .losses import _is_causal_lm
        from .separability import check_per_sample_losses_and_gradients, is_half, synthetic_probe

        example = self._prepare_inputs(self._train_collate.first_record())
        config = getattr(model, "config", None)
        probe, neighbour = synthetic_probe(
            example,
            vocab_size=getattr(config, "vocab_size", None),
            causal_lm=_is_causal_lm(model),
        )
        check_per_sample_losses_and_gradients(
            model,
            self.grad_sample_controller,
            self.per_sample_loss,
            probe,
            neighbour,
            backward=self.accelerator.backward,
            forward_context=self.compute_loss_context_manager,
            half=self.args.bf16 or is_half(*(p.dtype for p in model.parameters())),
        )

    def _run_discarded_stand_in(self, model: nn.Module) -> None:
        """Under FSDP every DP rank must run each micro-batch's forward and backward (FSDP's
        all-gathers are collectives of the DP group), an empty Poisson micro-batch included: run
        them on a synthetic stand-in that carries no record (the shapes of the first training
        record as collated, constant values: :func:`~hf_dp_tp.sampling.stand_in_batch`) and
        discard everything — the loss is multiplied by 0, the per-sample gradients are dropped
        before clipping and the raw gradients are dropped by the controller, so nothing of it
        reaches the update."""
        if self._stand_in is None:
            self._stand_in = self._train_collate.stand_in()
        stand_in = self._prepare_inputs(self._stand_in)
        with self.compute_loss_context_manager():
            losses, _ = self.per_sample_loss(model, stand_in)
        self.accelerator.backward(losses.sum() * 0.0)
        self.grad_sample_controller.zero_grad_sample()

    def floating_point_ops(self, inputs: dict[str, Any]) -> float:
        """FLOPs of the *expected* micro-batch (``per_device_train_batch_size`` samples at the
        model's context length), never of the sampled one: ``total_flos`` in checkpoints would
        otherwise give away every realised Poisson batch size."""
        if self._flops_per_micro_batch is None:
            model = self.model
            config = getattr(model, "config", None)
            tokens = getattr(config, "max_position_embeddings", None) or 1
            if hasattr(model, "num_parameters"):
                params = model.num_parameters(exclude_embeddings=True)
            else:
                params = sum(p.numel() for p in model.parameters())
            self._flops_per_micro_batch = float(
                6 * params * tokens * self.args.per_device_train_batch_size
            )
        return self._flops_per_micro_batch

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
            if not self.privacy_plan.epsilon_is_upper_bound:
                logs["epsilon_is_upper_bound"] = False  # an approximate accountant ("gdp")
        super().log(logs, start_time)

    # ------------------------------------------------------------------ train / report
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """As ``Trainer.train``; before the first step the ledger of ``resume_from_checkpoint``
        is checked and restored, σ is resolved, and the step budget of the current
        ``target_epsilon`` is fixed (a resume that cannot take one more step is refused)."""
        resume_from_checkpoint = resolve_resume_path(resume_from_checkpoint, self.args.output_dir)
        self._ledger_to_restore = None
        if resume_from_checkpoint:
            self._load_ledger(resume_from_checkpoint)
        plan = self.privacy_plan
        plan.resolve_noise_multiplier(self.planned_steps)
        self.budget_steps = plan.budget_steps(self.planned_steps)
        if self.budget_steps is not None and self.budget_steps <= plan.steps_accounted:
            raise ValueError(
                f"ε after {plan.steps_accounted} steps is {plan.epsilon():.4g} and one more step "
                f"would exceed target_epsilon={plan.target_epsilon}: nothing left to train."
            )
        check_memory(self)  # preflight estimate: logged; refused when clearly too large
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        self._nonfinite_samples_zeroed = self._count_nonfinite_samples()
        # dropout & co. advanced the global RNGs by the realised batch sizes: whatever runs after
        # training (sampling from the model, another run in this process) draws from fresh state
        reseed_global_rngs()
        self._write_privacy_report()
        return output

    def _count_nonfinite_samples(self) -> int:
        """Sampled records whose per-sample gradient was non-finite and left out, over the whole
        ``train()`` call and every rank (a collective). Data-dependent and outside the (ε, δ)
        claim: it is only ever reported at the end of training, never per step or in a
        checkpoint, where its change between two steps would date the record."""
        local = self._dp_optimizer.nonfinite_samples_zeroed if self._dp_optimizer else 0
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return local
        device = collective_device()
        count = torch.tensor([float(local)], dtype=torch.float64, device=device)
        dist.all_reduce(count)
        return round(count.item() / self.mesh_info.tp_size)  # TP peers count the same samples

    def _write_privacy_report(self) -> None:
        report = self.privacy_report()
        if self.args.should_save:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, REPORT_NAME), "w") as f:
                json.dump(report, f, indent=2)
            print("privacy report: " + json.dumps(report))

    # ------------------------------------------------------------------ checkpoints
    def ledger(self) -> dict[str, Any]:
        """The privacy ledger written into every checkpoint: continues ε exactly; holds no seed,
        key or generator state."""
        return self.privacy_plan.ledger(
            global_step=self.state.global_step,
            optimizer_state=self._dp_optimizer.dp_state_dict() if self._dp_optimizer else None,
            layout=self.parallel_layout,
        )

    @property
    def parallel_layout(self) -> dict[str, int]:
        """World size, dp, tp, dp_shard (1 without FSDP) and dp_replicate sizes of this run: a
        checkpoint resumes only on the layout that wrote it (its per-rank optimizer state)."""
        mesh = self.mesh_info
        world = dist.get_world_size() if dist.is_initialized() else 1
        return {
            "world_size": world,
            "dp_size": mesh.dp_size,
            "tp_size": mesh.tp_size,
            "dp_shard_size": mesh.dp_shard_size if self._fsdp else 1,
            "dp_replicate_size": mesh.dp_replicate_size,
        }

    def _load_ledger(self, checkpoint: str) -> None:
        # every rank reads the ledger; a failure on any rank stops every rank at once
        fail_together(lambda: self._restore_ledger(checkpoint), what="reading the privacy ledger")

    def _restore_ledger(self, checkpoint: str) -> None:
        ledger = read_ledger(checkpoint)
        check_layout(
            ledger,
            self.parallel_layout,
            where=checkpoint,
            rank_specific_state=self._rank_specific_optimizer_state,
        )
        self.privacy_plan.restore(
            ledger, where=checkpoint, explicit_sigma=self.args.noise_multiplier is not None
        )
        if self.args.ignore_data_skip and self.replays_randomness:
            raise ValueError(
                "ignore_data_skip=True with a replayed seed (dp_seed or dp_secrets_file) would "
                "draw the checkpoint's already-used Poisson batches again and count them as new. "
                "Resume without ignore_data_skip, or without a fixed seed (fresh batches)."
            )
        self._ledger_to_restore = ledger
        if self._dp_optimizer is not None:
            self._dp_optimizer.load_dp_state_dict(ledger["optimizer"])

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        super()._save_checkpoint(model, trial)
        output_dir = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        if self.args.should_save:
            write_ledger(output_dir, self.ledger())

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Trainer pushes from inside _save_checkpoint, before the override above writes the
        # ledger: a pushed checkpoint must carry its ledger too
        if self.args.should_save:
            write_ledger(checkpoint_folder, self.ledger())
        super()._push_from_checkpoint(checkpoint_folder)

    def _save_rng_state(self, output_dir: str) -> None:
        # Trainer stores the global RNG states in every checkpoint; dropout (and any collator
        # that draws) advances them by the realised batch sizes, so two consecutive states give
        # those sizes away (replay each candidate size). Nothing is stored (docs/usage.md,
        # "What is at rest").
        return None

    def _load_rng_state(self, checkpoint: str | None) -> None:
        # No RNG state is stored (see _save_rng_state): a resumed run draws its dropout from
        # fresh state, agreed by every rank (TP peers need the same dropout masks).
        if checkpoint is not None:
            reseed_global_rngs()

    @contextmanager
    def _defer_fsdp_gradient_reduction(self) -> Iterator[None]:
        # Trainer defers FSDP's reduce-scatter between micro-batches for models sharded by
        # transformers at load time; DPTrainer's own FSDP (fsdp="full_shard") never uses FSDP's
        # reduction for the update (the DP optimizer sums the clipped sums and writes the shard),
        # so there is nothing to defer.
        yield

    @property
    def _rank_specific_optimizer_state(self) -> bool:
        """Whether ranks hold different optimizer-state shards (TP, or FSDP over DP)."""
        return self.mesh_info.tp_size > 1 or self._fsdp

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self._rank_specific_optimizer_state:
            # each TP rank holds different optimizer-state shards: one file per rank
            save_rank_optimizer(output_dir, dist.get_rank(), self.optimizer.state_dict())

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        # per-rank files: a failure on any rank stops every rank at once
        fail_together(
            lambda: self._load_optimizer_state(checkpoint), what="loading the optimizer state"
        )

    def _load_optimizer_state(self, checkpoint: str) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if self._rank_specific_optimizer_state:
            state = load_rank_optimizer(checkpoint, dist.get_rank())
            if state is not None:
                self.optimizer.load_state_dict(state)
        if self._ledger_to_restore is not None and self._dp_optimizer is not None:
            expected = self._ledger_to_restore["optimizer"]["steps_taken"]
            if self._dp_optimizer.steps_taken != expected:
                raise LedgerError(
                    f"{checkpoint}: the optimizer state is from noisy step "
                    f"{self._dp_optimizer.steps_taken} but the privacy ledger records {expected}: "
                    "the files do not belong together. Resume from an untouched checkpoint."
                )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As ``Trainer.save_model``: an ordinary, unsharded checkpoint ``from_pretrained`` loads
        in one process. Checkpoints of an FSDP run (``_internal_call``) hold the model as
        per-rank shards instead (``torch.distributed.checkpoint``, ``pytorch_model_fsdp_0/``),
        with its config: nothing is gathered onto one rank."""
        if not (_internal_call and self._fsdp):
            super().save_model(output_dir, _internal_call)
            if not _internal_call:
                self._write_model_card(
                    output_dir if output_dir is not None else self.args.output_dir
                )
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_sharded_model(self.model, output_dir)  # every rank writes its shards
        if self.args.should_save:
            config = getattr(self.model, "config", None)
            if config is not None and hasattr(config, "save_pretrained"):
                config.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def create_model_card(self, *args, **kwargs) -> None:
        """Trainer's model card (what ``push_to_hub`` uploads), with the privacy section:
        :func:`hf_dp_tp.model_card.write_privacy_card`."""
        super().create_model_card(*args, **kwargs)
        self._write_model_card(self.args.output_dir)

    def _write_model_card(self, directory: str) -> None:
        """The privacy section of the model card in ``directory/README.md``: (ε, δ), the
        accountant, σ, q, steps, C, B̄, the privacy unit and what is not covered."""
        if self.args.should_save and self.train_dataset is not None:
            write_privacy_card(directory, self.privacy_report())

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is not None and has_sharded_model(best):
            load_sharded_model(self.model, best)
            return
        super()._load_best_model()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None):
        model = model if model is not None else self.model
        if has_sharded_model(resume_from_checkpoint):
            load_sharded_model(model, resume_from_checkpoint)  # a collective, with its own errors
            return
        # no collective below: a failure on any rank stops every rank at once
        fail_together(
            lambda: self._load_weights(resume_from_checkpoint, model), what="loading the weights"
        )

    def _load_weights(self, resume_from_checkpoint: str, model: nn.Module) -> None:
        if infer_layout(model) == PLAIN:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if is_peft_model(model):
            load_full_checkpoint_into_sharded(
                model, resume_from_checkpoint, adapter_name=model.active_adapter
            )
        else:
            load_full_checkpoint_into_sharded(model, resume_from_checkpoint)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """An ordinary, unsharded checkpoint that ``from_pretrained`` loads in one process (its
        ``training_args.bin``, like every pickle of the arguments, without a user-fixed
        ``dp_seed``: see ``DPTrainingArguments.__getstate__``)."""
        if infer_layout(self.model) == PLAIN:
            if self.args.should_save:
                super()._save(output_dir, state_dict=state_dict)
            return
        if is_peft_model(self.model):
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
