"""One rank of the two-"node" FSDP × TP equivalence check, launched by ``torchrun --nnodes 2``
from tests/test_fsdp_tp.py: the same DP-SGD step as the spawned tests (TP inside a node, FSDP
over DP across the two nodes), against the single-process reference. Rank 0 writes the errors
to the JSON file given as the second argument."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist


def main() -> None:
    model_root, result_file = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from tests.test_fsdp_tp import _run

    torch.manual_seed(1234 + dist.get_rank())  # the global RNG must play no role
    results = {
        f"{case} [{mode}]": _run(case, model_root, 2, mode)
        for case in ("llama_tied_hf_plan",)
        for mode in ("tp", "ghost")
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        with open(result_file, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
