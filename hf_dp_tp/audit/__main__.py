"""``python -m hf_dp_tp.audit ...`` (under torchrun: ``torchrun --nproc-per-node N -m
hf_dp_tp.audit ...``)."""

from .run import main

if __name__ == "__main__":
    main()
