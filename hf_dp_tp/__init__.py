"""Differentially private (DP-SGD) fine-tuning of HuggingFace models with tensor parallelism."""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public names -> the submodule that defines them. Imported on first use (PEP 562), so that
# `import hf_dp_tp.controller` does not pull in transformers' Trainer, and `import hf_dp_tp` does
# not need the optional trl (DPSFTTrainer / DPSFTConfig raise an ImportError naming the extra).
_EXPORTS = {
    "Conv1DParallel": "parallel",
    "DPOptimizerTP": "optimizer",
    "DPSFTConfig": "sft",
    "DPSFTTrainer": "sft",
    "DPTrainer": "trainer",
    "DPTrainingArguments": "arguments",
    "DistributedPoissonBatchSampler": "sampling",
    "GradSampleControllerTP": "controller",
    "MeshInfo": "parallel",
    "PrivacyEngineGradSampleController": "engine",
    "UnsupportedLayoutError": "grad_samplers",
    "apply_tp_plan": "parallel",
    "build_poisson_data_loader": "sampling",
    "calibrate_noise_multiplier": "accounting",
    "destroy_process_groups": "parallel",
    "init_distributed": "parallel",
    "gpt2_tp_plan": "parallel",
    "init_dp_tp_mesh": "parallel",
    "llama_sequence_parallel_plan": "parallel",
    "make_accountant": "accounting",
    "per_sample_norms": "norms",
    "prepare_lora_for_tp": "lora",
    "register_grad_sampler": "grad_samplers",
    "register_grad_sampler_alias": "grad_samplers",
    "resolve_mesh": "parallel",
    "save_lora_adapter": "lora",
    "set_collective_timeout": "parallel",
}

__all__ = [
    "Conv1DParallel",
    "DPOptimizerTP",
    "DPSFTConfig",
    "DPSFTTrainer",
    "DPTrainer",
    "DPTrainingArguments",
    "DistributedPoissonBatchSampler",
    "GradSampleControllerTP",
    "MeshInfo",
    "PrivacyEngineGradSampleController",
    "UnsupportedLayoutError",
    "apply_tp_plan",
    "build_poisson_data_loader",
    "calibrate_noise_multiplier",
    "destroy_process_groups",
    "gpt2_tp_plan",
    "init_distributed",
    "init_dp_tp_mesh",
    "llama_sequence_parallel_plan",
    "make_accountant",
    "per_sample_norms",
    "prepare_lora_for_tp",
    "register_grad_sampler",
    "register_grad_sampler_alias",
    "resolve_mesh",
    "save_lora_adapter",
    "set_collective_timeout",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from .accounting import calibrate_noise_multiplier, make_accountant
    from .arguments import DPTrainingArguments
    from .controller import GradSampleControllerTP
    from .engine import PrivacyEngineGradSampleController
    from .grad_samplers import (
        UnsupportedLayoutError,
        register_grad_sampler,
        register_grad_sampler_alias,
    )
    from .lora import prepare_lora_for_tp, save_lora_adapter
    from .norms import per_sample_norms
    from .optimizer import DPOptimizerTP
    from .parallel import (
        Conv1DParallel,
        MeshInfo,
        apply_tp_plan,
        destroy_process_groups,
        gpt2_tp_plan,
        init_distributed,
        init_dp_tp_mesh,
        llama_sequence_parallel_plan,
        resolve_mesh,
        set_collective_timeout,
    )
    from .sampling import DistributedPoissonBatchSampler, build_poisson_data_loader
    from .sft import DPSFTConfig, DPSFTTrainer
    from .trainer import DPTrainer
