"""Ghost clipping on CUDA against the per-sample mode, on one GPU (CI has none).

Builds the tests' tiny tied Llama in float64, float32 and bfloat16 on ``cuda:0``, runs one
backward in ``grad_sample_mode="hooks"`` and in ``"ghost"`` (each norm form), and prints one JSON
object with the largest relative difference of the per-sample norms and of the clipped sums
(bfloat16: both modes round differently — the per-sample mode builds bf16 per-sample gradients,
ghost sums exact products in fp32 — so expect ~1e-2 there). Usage, from the
repository root: ``python scripts/ghost_cuda_check.py``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_dp_tp import GradSampleControllerTP  # noqa: E402
from hf_dp_tp.ghost import clipped_sum_of, norm_form  # noqa: E402
from tests import models  # noqa: E402


def run(model, batch, mode: str, form: str = "auto"):
    model = copy.deepcopy(model)
    with norm_form(form):
        controller = GradSampleControllerTP(model, grad_sample_mode=mode)
        models.llama_losses(model, batch).mean().backward()
        norms = controller.get_per_sample_norms()
        factors = (0.5 * norms.min() / norms).clamp(max=1.0)
        sums = {
            n: clipped_sum_of(p.grad_sample, factors).reshape(p.shape)
            for n, p in model.named_parameters()
        }
        controller.cleanup()
    return norms, sums


def main() -> None:
    device = torch.device("cuda", 0)
    out = {"device": torch.cuda.get_device_name(device)}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        model = models.tiny_causal_lm(tie=True).to(device, dtype).train()
        model.config.use_cache = False
        batch = {k: v.to(device) for k, v in models.lm_batch(8, vocab=64, seq=8).items()}
        ref_norms, ref_sums = run(model, batch, "hooks")
        for form in ("auto", "ghost", "materialise"):
            norms, sums = run(model, batch, "ghost", form)
            norm_err = ((norms - ref_norms).abs().max() / ref_norms.max()).item()
            sum_err = max(
                ((sums[n] - s).abs().max() / s.abs().max().clamp_min(1e-30)).item()
                for n, s in ref_sums.items()
            )
            out[f"{str(dtype).split('.')[-1]}_{form}"] = {"norm_err": norm_err, "sum_err": sum_err}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
