"""Up-front checks that a training dataset is in the shape DPTrainer can batch.

An untokenised ``datasets.Dataset`` (only text columns) would otherwise reach Trainer's column
pruning at the first step and fail there with a hint (``remove_unused_columns=False``) that does
not fix it: the records must be tokenised first.
"""

from __future__ import annotations

from typing import Any

MODEL_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "input_features", "input_values")


def check_tokenised(dataset: Any, *, data_collator: Any, per_sample_loss: Any) -> None:
    """Refuse a ``datasets.Dataset`` whose columns are all text and none a model input, when
    neither a ``data_collator`` (which could tokenise on the fly) nor a ``per_sample_loss``
    (which could take raw records) was given. Other datasets pass unchecked."""
    features = getattr(dataset, "features", None)
    if features is None or data_collator is not None or per_sample_loss is not None:
        return
    names = list(features)
    if not names or any(name in MODEL_INPUTS for name in names):
        return
    if all(getattr(features[name], "dtype", None) in ("string", "large_string") for name in names):
        raise ValueError(
            f"the train dataset has only text columns {names} and no input_ids: tokenise it "
            "first, e.g. train = train.map(lambda b: tokenizer(b['text'], truncation=True), "
            "batched=True, remove_columns=train.column_names), and pass a collator that pads "
            "and adds labels (examples/finetune_causal_lm.py shows one). Setting "
            "remove_unused_columns=False does not help: the model needs token ids."
        )
