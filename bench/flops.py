"""Matrix-multiply FLOPs of one training step: non-private vs DP-SGD per-sample (``"hooks"``) vs
ghost / book-keeping (``"ghost"``), on one process, counted exactly by
``torch.utils.flop_counter.FlopCounterMode`` (every mm / bmm / addmm / convolution / attention
kernel autograd and the DP code dispatch). Prints ONE JSON object on stdout.

Run from the repository root::

    python bench/flops.py                                   # the shape below, tiny and small
    python bench/flops.py --preset 1b --layers 1 --batch 4  # a 1b-wide decoder layer (slow on CPU)

What is counted, per configuration, over one optimizer step after one untimed step (the first
backward of each parameter runs the controller's self-check against autograd's gradient, which
later steps skip):

- ``non_private``: ``loss.backward()`` of the mean of per-sample losses (forward + backward, all
  weight gradients by autograd);
- ``hooks``: forward + backward with the per-sample hooks + ``DPOptimizerTP.step()`` (norms,
  clipping, the clipped sum, noise) — per-sample gradients materialised;
- ``ghost``: the same with ghost norms and the book-keeping clipped sum.

``ratio_<mode>`` = FLOPs of the mode / FLOPs of ``non_private``. Goals (numbers in
docs/performance.md): ``hooks`` ≤ 1.05, ``ghost`` ≤ 1.30 at ``--preset issue`` (B = 8,
T = 256, hidden 512, 2 layers, vocab 4096). Counting runs real kernels on the CPU, so big
shapes are slow; FLOP ratios depend on B, T and the layer widths, not on the number of layers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_time import PRESETS, build_model, global_batch, loss_fn  # noqa: E402

FLOP_PRESETS: dict[str, dict[str, Any]] = {
    "issue": dict(hidden=512, layers=2, heads=8, vocab=4096, seq=256, batch=8),
    **{
        name: {k: PRESETS[name][k] for k in ("hidden", "layers", "heads", "vocab", "seq", "batch")}
        for name in PRESETS
    },
}
MODES = ("hooks", "ghost")


def _config(preset: str, overrides: dict[str, int | None]) -> dict[str, Any]:
    cfg = dict(FLOP_PRESETS[preset])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    cfg["kv_heads"] = cfg["heads"]
    cfg["intermediate"] = 4 * cfg["hidden"]
    cfg["global_batch"] = cfg["batch"]
    cfg["bf16"] = False
    return cfg


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def count(cfg: dict[str, Any]) -> dict[str, Any]:
    """FLOPs of one step of each configuration on the model and batch of ``cfg``."""
    from hf_dp_tp import DPOptimizerTP, GradSampleControllerTP

    device = torch.device("cpu")
    ids = global_batch(cfg, device)
    model = build_model(cfg, device)
    result: dict[str, Any] = {}

    def plain_step() -> None:
        loss_fn(model, ids).backward()
        model.zero_grad(set_to_none=True)

    plain_step()
    result["non_private"] = _flops(plain_step)
    for mode in MODES:
        controller = GradSampleControllerTP(model, grad_sample_mode=mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer = DPOptimizerTP(
                torch.optim.SGD(model.parameters(), lr=0.0),
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                expected_batch_size=cfg["batch"],
                mesh=controller.mesh,
                noise_seed=0,
            )

        def dp_step(optimizer: DPOptimizerTP = optimizer) -> None:
            loss_fn(model, ids).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        dp_step()  # the first backward runs the self-check on autograd's weight gradients
        result[mode] = _flops(dp_step)
        controller.cleanup()
    for mode in MODES:
        result[f"ratio_{mode}"] = result[mode] / result["non_private"]
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(FLOP_PRESETS), action="append")
    for name in ("hidden", "layers", "heads", "vocab", "seq", "batch"):
        p.add_argument(f"--{name}", type=int, default=None, help="overrides the preset")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    overrides = {
        k: getattr(args, k) for k in ("hidden", "layers", "heads", "vocab", "seq", "batch")
    }
    out: dict[str, Any] = {"torch_version": torch.__version__, "presets": {}}
    for preset in args.preset or ["issue", "tiny", "small"]:
        cfg = _config(preset, overrides)
        out["presets"][preset] = {"config": cfg, **count(cfg)}
        print(f"{preset}: {out['presets'][preset]}", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
