"""One rank of the two-"node" DPTrainer check, launched by ``torchrun --nnodes 2`` from
tests/test_trainer.py: ``DPTrainer.train()`` on each configuration given as JSON (output folder
and argument overrides); the test compares the saved checkpoints with single-process DP-SGD."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def main() -> None:
    model_dir, runs = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from tests.test_trainer import _train_worker

    torch.manual_seed(1234 + dist.get_rank())  # the global RNG must play no role
    for out, overrides in runs:
        result = _train_worker(dist.get_rank(), dist.get_world_size(), model_dir, out, overrides)
        if dist.get_rank() == 0:
            with open(os.path.join(out, "mesh.json"), "w") as f:
                json.dump(result["mesh"], f)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
