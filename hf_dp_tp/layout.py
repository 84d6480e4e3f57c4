"""Two independent axes of a DP run, each decided here once.

- The **layout** of the model: ``"plain"`` (no tensor parallelism: every rank holds whole
  parameters) or ``"tp"`` (tensor-parallel: DTensor parameters sharded over the TP group, contract
  rule 2, docs/usage.md). FSDP over the DP dimension will be a third value. It is a property of the
  parameters and the mesh (:func:`infer_layout`).
- The **clipping method**: how the per-sample norms and the clipped sum are obtained: per-sample
  gradients materialised by hooks (:data:`PER_SAMPLE`), or ghost norms with a book-keeping
  clipped sum (:data:`GHOST`, :mod:`hf_dp_tp.ghost`: matrix weights kept as factors, never as
  ``B × parameters``).

The public ``grad_sample_mode`` names the method, and for the seed's two modes the layout too:
``"tp"`` and ``"hooks"`` are both per-sample hooks, ``"tp"`` on a tensor-parallel model and
``"hooks"`` on one without tensor parallelism; ``"ghost"`` works on either, its layout inferred
from the model. :func:`model_layout` maps a mode and a model to ``(layout, method)`` and refuses a
mode that contradicts the model's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .parallel import TP_DIM, has_dtensor_parameters

#: Model layouts: PLAIN (no DTensor parameters) or TP (DTensor parameters — TP shards, FSDP
#: shards or both; each parameter's own placements are read by ``parallel.param_layout``).
PLAIN = "plain"
TP = "tp"

PER_SAMPLE = "per_sample"
GHOST = "ghost"
#: Clipping methods: materialised per-sample gradients, or ghost norms + book-keeping sums.
CLIPPING_METHODS = (PER_SAMPLE, GHOST)

#: Public ``grad_sample_mode`` values → (clipping method, layout the mode declares; None: the
#: layout is inferred from the model).
_MODES: dict[str, tuple[str, str | None]] = {
    "tp": (PER_SAMPLE, TP),
    "hooks": (PER_SAMPLE, PLAIN),
    "ghost": (GHOST, None),
}
GRAD_SAMPLE_MODES = tuple(_MODES)


@dataclass(frozen=True)
class ModelLayout:
    """How a model is laid out (:data:`PLAIN` or :data:`TP`) and how its per-sample norms are
    obtained (:data:`CLIPPING_METHODS`)."""

    layout: str
    method: str

    @property
    def tp(self) -> bool:
        """Whether the model has a TP group (its norms are reduced over it, rule 3)."""
        return self.layout == TP


def check_grad_sample_mode(grad_sample_mode: str) -> None:
    """Refuse a ``grad_sample_mode`` that names no existing method."""
    if grad_sample_mode not in _MODES:
        raise ValueError(
            f"unknown grad_sample_mode {grad_sample_mode!r}: grad_sample_mode must be one of "
            f"{GRAD_SAMPLE_MODES} ('tp' for tensor-parallel models, 'hooks' for models without "
            "TP, 'ghost' for either: ghost norms, no per-sample gradients materialised)."
        )


def clipping_method(grad_sample_mode: str) -> str:
    """The clipping method a ``grad_sample_mode`` selects (:data:`CLIPPING_METHODS`)."""
    check_grad_sample_mode(grad_sample_mode)
    return _MODES[grad_sample_mode][0]


def declared_layout(grad_sample_mode: str) -> str | None:
    """The layout a ``grad_sample_mode`` stands for (``"tp"`` → TP, ``"hooks"`` → plain,
    ``"ghost"`` → None: inferred from the model)."""
    check_grad_sample_mode(grad_sample_mode)
    return _MODES[grad_sample_mode][1]


def _tp_size(device_mesh: DeviceMesh) -> int:
    if device_mesh.ndim == 1:
        return device_mesh.size()
    names = device_mesh.mesh_dim_names or ()
    return device_mesh[TP_DIM].size() if TP_DIM in names else 1


def infer_layout(module: nn.Module, device_mesh: DeviceMesh | None = None) -> str:
    """The layout of ``module`` from its parameters and the mesh: TP when a parameter is a DTensor
    or the mesh has a TP dimension of more than one rank, plain otherwise."""
    if has_dtensor_parameters(module):
        return TP
    if device_mesh is not None and _tp_size(device_mesh) > 1:
        return TP
    return PLAIN


def model_layout(
    module: nn.Module, grad_sample_mode: str, device_mesh: DeviceMesh | None = None
) -> ModelLayout:
    """The layout and clipping method of ``module`` trained with ``grad_sample_mode`` (on
    ``device_mesh``, when given: a mode whose layout is inferred reads its TP size).

    A mode declaring the plain layout (``"hooks"``) on a model with DTensor parameters is refused:
    per-sample gradients of shards would be computed as if they were whole tensors (wrong norms).
    ``"tp"`` on a model without a TP mesh is refused by :func:`~hf_dp_tp.parallel.resolve_mesh`,
    which looks for that mesh.
    """
    method = clipping_method(grad_sample_mode)
    layout = declared_layout(grad_sample_mode)
    if layout is None:
        return ModelLayout(layout=infer_layout(module, device_mesh), method=method)
    if layout == PLAIN and infer_layout(module) == TP:
        raise ValueError(
            f"the model has DTensor (tensor-parallel) parameters but grad_sample_mode="
            f"{grad_sample_mode!r}: per-sample gradients would be computed on shards as if "
            "they were whole tensors. Use grad_sample_mode='tp'."
        )
    return ModelLayout(layout=layout, method=method)
