"""Memory and step time of the clipping methods as the micro-batch and the sequence grow.

Runs ``bench/step_time.py`` (non-private TP, per-sample DP-TP and ghost DP-TP, each in its own
fresh processes, opacus skipped) once per ``(batch, seq)`` and prints ONE JSON object::

    python bench/clipping_sweep.py                                  # CPU: B {8,32,64} x T {64,256}
    python bench/clipping_sweep.py --batches 4 8 --seqs 512 --preset 1b --tp_size 1   # a GPU

Fields: ``preset``, ``args`` (what was passed through), and ``rows``, one per ``(batch, seq)``:

- ``batch`` (per DP rank), ``seq``;
- ``non_private_s``, ``per_sample_s``, ``ghost_s``: median seconds per step;
  ``per_sample_ratio``, ``ghost_ratio``: over non-private;
- ``non_private_increase_mb``, ``per_sample_increase_mb``, ``ghost_increase_mb``: memory training
  adds over the built model (max over ranks; step_time.py's ``*_increase_mb``), and
  ``per_sample_memory_ratio``, ``ghost_memory_ratio`` over non-private;
- ``ghost_breakdown_s``: the stages of the ghost step, ``ghost_overhead_note``: where its extra
  time goes.

``machine`` is the first run's machine description. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parent / "step_time.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--seqs", type=int, nargs="+", default=[64, 256])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tp_size", type=int, default=None)
    p.add_argument("--timeout", type=float, default=3600)
    return p.parse_args(argv)


def run_one(args: argparse.Namespace, batch: int, seq: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--preset",
        args.preset,
        "--batch",
        str(batch),
        "--seq",
        str(seq),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--no_opacus",
    ]
    if args.tp_size is not None:
        cmd += ["--tp_size", str(args.tp_size)]
    sys.stderr.write(f"[clipping_sweep] B={batch} T={seq}: {' '.join(cmd[1:])}\n")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-6000:])
        raise SystemExit(f"step_time.py failed for B={batch} T={seq}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(batch: int, seq: int, out: dict[str, Any]) -> dict[str, Any]:
    a = out["non_private_tp_increase_mb"]
    return {
        "batch": batch,
        "seq": seq,
        "non_private_s": out["non_private_tp_s"],
        "per_sample_s": out["dp_tp_s"],
        "ghost_s": out["dp_tp_ghost_s"],
        "per_sample_ratio": out["ratio_dp_tp_over_non_private"],
        "ghost_ratio": out["ratio_ghost_over_non_private"],
        "non_private_increase_mb": a,
        "per_sample_increase_mb": out["dp_tp_increase_mb"],
        "ghost_increase_mb": out["dp_tp_ghost_increase_mb"],
        "per_sample_memory_ratio": out["increase_ratio_dp_tp_over_non_private"],
        "ghost_memory_ratio": out["increase_ratio_ghost_over_non_private"],
        "ghost_breakdown_s": out["dp_tp_ghost_breakdown_s"],
        "ghost_overhead_note": out["ghost_overhead_note"],
    }


def main() -> None:
    args = parse_args()
    rows, machine, config = [], None, None
    for seq in args.seqs:
        for batch in args.batches:
            out = run_one(args, batch, seq)
            machine = machine or out["machine"]
            config = config or out["config"]
            rows.append(row(batch, seq, out))
            sys.stderr.write(json.dumps(rows[-1]) + "\n")
    print(
        json.dumps(
            {
                "preset": args.preset,
                "config": config,
                "args": vars(args),
                "machine": machine,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
