"""Differentially private (DP-SGD) fine-tuning of HuggingFace models with tensor parallelism."""

from .accounting import calibrate_noise_multiplier, make_accountant
from .arguments import DPTrainingArguments
from .controller import GradSampleControllerTP, per_sample_norms
from .engine import PrivacyEngineGradSampleController
from .grad_samplers import UnsupportedLayoutError, register_grad_sampler
from .lora import prepare_lora_for_tp, save_lora_adapter
from .optimizer import DPOptimizerTP
from .parallel import MeshInfo, apply_tp_plan, init_dp_tp_mesh, resolve_mesh
from .sampling import DistributedPoissonBatchSampler, build_poisson_data_loader
from .trainer import DPTrainer

__version__ = "0.1.0"

__all__ = [
    "DPOptimizerTP",
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
    "init_dp_tp_mesh",
    "make_accountant",
    "per_sample_norms",
    "prepare_lora_for_tp",
    "register_grad_sampler",
    "resolve_mesh",
    "save_lora_adapter",
]
