"""``DPSFTTrainer`` / ``DPSFTConfig``: trl's ``SFTTrainer`` with DP-SGD (the two-line swap).

In a trl script, swap ``SFTConfig`` for :class:`DPSFTConfig` and ``SFTTrainer`` for
:class:`DPSFTTrainer`. trl still prepares the data (chat templates, prompt-completion and
conversational datasets, completion-only and assistant-only label masks, truncation, its padding
collator); :class:`~hf_dp_tp.DPTrainer` still trains (Poisson batches, per-sample clipping,
noise, accounting, tensor parallelism). The privacy unit is one record of the training set, one
row of every batch; the loss is each record's mean token loss over its own trained tokens (the
completion, the assistant turns, or every token), averaged over the records. What would break
that is refused up front (see ``REFUSED_SFT_SETTINGS``); docs/trainer.md, "SFT with trl:
DPSFTTrainer".

Needs trl (``pip install -e ".[sft]"`` or ``pip install trl``); ``import hf_dp_tp`` does not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as error:  # pragma: no cover - exercised without trl installed
    raise ImportError(
        'DPSFTTrainer / DPSFTConfig need trl: `pip install -e ".[sft]"` in a checkout of '
        "hf_dp_tp, or `pip install trl`."
    ) from error

from .arguments import DPTrainingArguments
from .losses import IGNORE_INDEX, PerSampleLoss, default_per_sample_loss
from .trainer import DPTrainer

#: SFTConfig settings that mix records in one row or give the loss a cross-sample part, refused
#: by ``DPSFTConfig``: name -> (is the value refused?, why and what to do instead).
REFUSED_SFT_SETTINGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "packing": (
        bool,
        "packing concatenates several records into one row, so one 'sample' of per-sample "
        "clipping would be several records and the clip would no longer bound one record's "
        "influence (the privacy unit). Set packing=False: each row is then one record, padded "
        "(padding-free batches are not supported either)",
    ),
    "padding_free": (
        bool,
        "padding-free batches flatten every record of a micro-batch into one row, so per-sample "
        "clipping would clip the whole micro-batch as one sample. Set padding_free=False (rows "
        "are padded, one record each)",
    ),
    "eval_packing": (
        bool,
        "packed evaluation rows hold several records that attend to each other (the padded "
        "collator has no document boundaries), so the evaluation loss would not be per record. "
        "Leave eval_packing unset (or False)",
    ),
    "loss_type": (
        lambda value: value != "nll",
        "DPSFTTrainer's loss is each record's mean next-token negative log-likelihood over its "
        "own trained tokens; other trl loss types are not implemented as per-sample losses. Use "
        "loss_type='nll'",
    ),
    "activation_offloading": (
        bool,
        "DPTrainer's training step (per-sample clipping) replaces SFTTrainer's, which is where "
        "trl applies activation offloading. Use gradient_checkpointing to save memory instead",
    ),
    "router_aux_loss_coef": (
        lambda value: value is None or value != 0,
        "the MoE load-balancing loss is a statistic of the router probabilities of the whole "
        "batch (a cross-sample term), and None would take the model config's coefficient. Set "
        "router_aux_loss_coef=0.0 (DPSFTConfig's default)",
    ),
    "label_smoothing_factor": (
        bool,
        "the per-sample loss is the plain negative log-likelihood (label smoothing would be "
        "silently ignored). Set label_smoothing_factor=0",
    ),
}

#: Columns of a batch that only a packed or padding-free batch has (several records in a row).
_PACKED_BATCH_KEYS = ("seq_lengths", "cu_seq_lens_q", "cu_seq_lens_k", "seq_idx", "max_length_q")


def _trl_default(name: str) -> Any:
    """A field with ``SFTConfig``'s default and help for ``name``. ``DPTrainingArguments`` holds
    every ``TrainingArguments`` field with TrainingArguments' default, and dataclass fields of a
    later base win, so trl's own overrides must be restated here to survive."""
    trl_field = SFTConfig.__dataclass_fields__[name]
    return field(default=trl_field.default, metadata=dict(trl_field.metadata))


@dataclass
class DPSFTConfig(DPTrainingArguments, SFTConfig):
    """``SFTConfig`` plus the privacy and tensor-parallel settings of
    :class:`~hf_dp_tp.DPTrainingArguments` (every field of both; ``HfArgumentParser`` exposes
    them all).

    Defaults are trl's (``learning_rate`` 2e-5, ``logging_steps`` 10, ``gradient_checkpointing``
    True, ``bf16`` True unless ``fp16``), except ``router_aux_loss_coef`` = 0.0 and DPTrainer's
    own (``max_grad_norm`` and ``average_tokens_across_devices`` unused). The settings in
    ``REFUSED_SFT_SETTINGS`` (packing, padding-free batches, packed evaluation, loss types other
    than ``"nll"``, activation offloading, an MoE load-balancing loss, label smoothing) raise a
    ``ValueError`` saying why. ``completion_only_loss`` and ``assistant_only_loss`` are supported.
    """

    # trl's defaults, restated (see _trl_default): one visible place
    learning_rate: float = _trl_default("learning_rate")
    logging_steps: float = _trl_default("logging_steps")
    gradient_checkpointing: bool = _trl_default("gradient_checkpointing")
    bf16: bool | None = _trl_default("bf16")
    lr_scheduler_kwargs: dict | str | None = _trl_default("lr_scheduler_kwargs")
    use_liger_kernel: bool = _trl_default("use_liger_kernel")
    torch_empty_cache_steps: int | None = _trl_default("torch_empty_cache_steps")
    # DP's own default
    router_aux_loss_coef: float | None = field(
        default=0.0,
        metadata={
            "help": "Must stay 0.0: the MoE load-balancing loss is a cross-sample statistic of the "
            "batch, which per-sample clipping cannot bound."
        },
    )

    def __post_init__(self) -> None:
        for name, (is_refused, why) in REFUSED_SFT_SETTINGS.items():
            value = getattr(self, name)
            if is_refused(value):
                raise ValueError(f"{name}={value!r} is not supported by DPSFTTrainer: {why}.")
        super().__post_init__()


def _drop_fused_lm_head(model: nn.Module) -> None:
    """Undo trl's ``add_fused_lm_head`` patch of ``model.forward`` (an instance attribute): its
    fused path multiplies by ``lm_head.weight`` directly, past the per-sample hooks of the LM
    head, and only trl's own ``compute_loss`` (never used here) calls it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    patched = base.__dict__.get("forward")
    code = getattr(getattr(patched, "__func__", None), "__code__", None)
    if code is not None and code.co_name == "_fused_forward":  # functools.wraps keeps co_name
        del base.__dict__["forward"]


class DPSFTTrainer(DPTrainer, SFTTrainer):
    """trl's ``SFTTrainer`` trained with DP-SGD by :class:`~hf_dp_tp.DPTrainer`.

    trl prepares the datasets and builds the collator; DPTrainer's ``training_step`` (per-sample
    losses, clipping), ``compute_loss``, data loaders and optimizer are used, never
    ``SFTTrainer.compute_loss``. The default per-sample loss is each record's mean next-token loss
    over its own labels, where trl has set the prompt (``completion_only_loss``) or non-assistant
    (``assistant_only_loss``) tokens to -100; mask columns a custom collator leaves in the batch
    (``completion_mask``, ``assistant_masks``) are folded into the labels the same way. A batch of
    packed or padding-free rows is refused. trl's per-step metrics of the training batches
    (``num_tokens``, ``mean_token_accuracy``, ``entropy``) are never computed or logged: they are
    statistics of the private batches (``num_tokens`` counts the realised Poisson batch sizes).

    Args:
        model: a causal LM (``PreTrainedModel`` or ``PeftModel``), or a path / Hub id loaded with
            ``args.model_init_kwargs`` as ``SFTTrainer`` does.
        args: :class:`DPSFTConfig`.
        per_sample_loss: ``fn(model, inputs) -> (losses [B], outputs)``; default
            :meth:`sft_per_sample_loss`.
        peft_config: a ``peft.PeftConfig``; the adapters are added before the model is sharded,
            so that they follow the tensor-parallel plan of their base layers.
        **kwargs: everything ``SFTTrainer`` takes (``train_dataset``, ``eval_dataset``,
            ``processing_class``, ``data_collator``, ``formatting_func``, ``callbacks``, ...),
            except ``compute_loss_func`` (a batch-level loss).
    """

    def __init__(
        self,
        model: nn.Module | str | None = None,
        args: DPSFTConfig | None = None,
        *,
        per_sample_loss: PerSampleLoss | None = None,
        peft_config: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, DPSFTConfig):
            raise TypeError("DPSFTTrainer needs args=DPSFTConfig(...)")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "compute_loss_func is not supported by DPSFTTrainer: it reduces the loss over the "
                "batch (num_items_in_batch). Pass per_sample_loss=fn(model, inputs) -> (losses "
                "[B], outputs) instead."
            )
        path = args.chat_template_path
        if path is not None and not path.endswith((".jinja", ".j2")):
            raise ValueError(
                f"chat_template_path={path!r}: cloning a tokenizer's chat template adds tokens and "
                "resizes the model's embeddings after DPSFTTrainer has sharded the model. Set "
                "processing_class.chat_template yourself (resizing the model before the trainer), "
                "or pass a .jinja template file."
            )
        if isinstance(model, str):
            from trl.trainer.utils import create_model_from_path

            model = create_model_from_path(model, **dict(args.model_init_kwargs or {}))
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        super().__init__(
            model, args, per_sample_loss=per_sample_loss or self.sft_per_sample_loss, **kwargs
        )
        _drop_fused_lm_head(self.model)

    def sft_per_sample_loss(
        self, model: nn.Module, inputs: Mapping[str, Any]
    ) -> tuple[torch.Tensor, Any]:
        """Each record's mean next-token loss over its own trained tokens, ``[B]``.

        Labels are -100 wherever trl masked them. Mask columns still in the batch are applied
        as trl applies them when it builds labels: ``assistant_masks`` always,
        ``completion_mask`` when completion-only loss is on; they are never passed to the
        model. Refuses packed or padding-free batches (several records in one row)."""
        packed = [key for key in _PACKED_BATCH_KEYS if key in inputs]
        if packed:
            raise ValueError(
                f"the batch has {packed}: its rows hold several records (packing or padding-free "
                "collation), so per-sample clipping would clip several records as one. Use "
                "packing=False, padding_free=False and a collator that pads one record per row."
            )
        inputs = dict(inputs)
        masks = [inputs.pop("assistant_masks", None)]
        completion_mask = inputs.pop("completion_mask", None)
        if getattr(self, "completion_only_loss", False):
            masks.append(completion_mask)
        labels = inputs.get("labels")
        for mask in masks:
            if mask is not None and labels is not None:
                labels = labels.masked_fill(mask.to(labels.device) == 0, IGNORE_INDEX)
        if labels is not None:
            inputs["labels"] = labels
        return default_per_sample_loss(model, inputs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """As ``DPTrainer.log``; trl's per-step metrics (``num_tokens``, ``mean_token_accuracy``,
        ``entropy``, ``aux_loss``) are dropped, had anything recorded them: they are statistics
        of the private training batches, outside the (ε, δ) guarantee."""
        for metrics in getattr(self, "_metrics", {}).values():
            metrics.clear()
        super().log(logs, start_time)
