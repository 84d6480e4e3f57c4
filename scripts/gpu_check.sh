#!/usr/bin/env bash
# The GPU checks, as one script for a machine with CUDA GPUs (CI has none):
#   - the multi-rank suite on NCCL (tests pick NCCL when there is one GPU per rank; needs >= 2),
#   - the CUDA path of the secure noise source (the ChaCha20 keystream made on the GPU equals the
#     CPU one bit for bit, tests/test_chacha.py), ghost clipping on CUDA vs the per-sample mode,
#   - noise throughput (secure = ChaCha20 on the GPU vs seeded: cuda_secure_over_seeded) and the
#     1b step-time benchmark (seeded and secure DP-TP, non-private TP, single-process opacus) on
#     the GPUs; the goal for secure mode is ratio_secure_over_seeded <= 1.1.
# Results go to $OUT (default gpu_check/): logs and one JSON file per benchmark.
# Usage: bash scripts/gpu_check.sh            (from the repository root, package importable)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

ngpu=$("$python" -c "import torch; print(torch.cuda.device_count())")
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
"$python" -c "import torch, transformers, opacus; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'transformers', transformers.__version__, 'opacus', opacus.__version__)" \
  | tee "$out/versions.txt"
echo "GPUs: $ngpu"

if [ "$ngpu" -ge 2 ]; then
  "$python" -m pytest -q -x tests/test_equivalence.py tests/test_noise.py \
    tests/test_accumulation_and_hooks_mode.py tests/test_lora_tp.py tests/test_trainer.py \
    2>&1 | tee "$out/nccl_suite.log"
  tp=2
else
  echo "one GPU: the multi-rank NCCL suite needs >= 2 GPUs (skipped); benchmarks use tp=1" \
    | tee "$out/nccl_suite.log"
  tp=1
fi

"$python" -m pytest -q tests/test_noise_source.py tests/test_chacha.py 2>&1 \
  | tee "$out/noise_source_tests.log"
"$python" scripts/ghost_cuda_check.py >"$out/ghost_cuda.json" 2>"$out/ghost_cuda.log"
cat "$out/ghost_cuda.json"
"$python" bench/noise_throughput.py --no_legacy >"$out/noise_throughput.json" \
  2>"$out/noise_throughput.log"
tail -c 2000 "$out/noise_throughput.json"
"$python" -c "import json, sys; d = json.load(open(sys.argv[1])); print('secure (ChaCha20 on \
the GPU) over seeded normals/s:', d['cuda_secure_over_seeded'])" "$out/noise_throughput.json"
"$python" bench/step_time.py --preset 1b --tp_size "$tp" --batch 4 --secure_mode \
  >"$out/step_time_1b.json" 2>"$out/step_time_1b.log"
tail -c 4000 "$out/step_time_1b.json"
"$python" -c "import json, sys; d = json.load(open(sys.argv[1])); r = d['ratio_secure_over_seeded']; \
print('secure step / seeded step:', r, '(goal <= 1.1)')" "$out/step_time_1b.json"
"$python" bench/clipping_sweep.py --preset 1b --tp_size "$tp" --batches 4 8 16 --seqs 512 \
  >"$out/clipping_sweep_1b.json" 2>"$out/clipping_sweep_1b.log"
tail -c 4000 "$out/clipping_sweep_1b.json"
