"""Run an example script under spies (``torchrun tests/example_spy.py OUT examples/x.py ARGS``).

Records, per rank, in ``OUT/rank{RANK}.json``: the seeds the example passes to
``PrivacyEngineGradSampleController.make_private``, the base seed its Poisson sampler agreed on,
and the size of every batch the sampler drew (this rank's share of each logical batch). The
example itself runs unchanged (as ``__main__``), so tests/test_examples.py can hold what it
prints against what it drew.
"""

from __future__ import annotations

import json
import os
import runpy
import sys

from hf_dp_tp import PrivacyEngineGradSampleController
from hf_dp_tp.sampling import DistributedPoissonBatchSampler

RECORDS: dict[str, list] = {"make_private": [], "sampler_seeds": [], "batch_sizes": []}


def _spy_make_private():
    make_private = PrivacyEngineGradSampleController.make_private

    def spied(self, **kwargs):
        RECORDS["make_private"].append(
            {name: kwargs.get(name) for name in ("sampling_seed", "noise_seed")}
        )
        out = make_private(self, **kwargs)
        if self.batch_sampler is not None:
            RECORDS["sampler_seeds"].append(self.batch_sampler.seed)
        return out

    PrivacyEngineGradSampleController.make_private = spied


def _spy_batches():
    iterate = DistributedPoissonBatchSampler.__iter__

    def spied(self):
        for batch in iterate(self):
            RECORDS["batch_sizes"].append(len(batch))
            yield batch

    DistributedPoissonBatchSampler.__iter__ = spied


def main() -> None:
    out, script, *args = sys.argv[1:]
    _spy_make_private()
    _spy_batches()
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
            json.dump(RECORDS, f)


if __name__ == "__main__":
    main()
