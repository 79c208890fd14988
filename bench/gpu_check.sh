#!/usr/bin/env bash
# The GPU check of the engine, as one prepared run (fits in 10 minutes on one H100/H200):
#  1. correctness on CUDA: the tiny model's K-sample predictions on the GPU equal the CPU's;
#  2. bench/k_samples.py (ours) and the shared reference script, same process order, same card,
#     on Qwen2-Audio-7B-shaped (r16) and Qwen2.5-Omni-3B-shaped (r8) random bf16 models, 30 s audio.
# Wheels for transformers 5.23 and friends travel in .whl/ (the card's image has another version);
# the reference script is copied there too. Results land in $OUT (or ./gpu-results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 bench/gpu_equivalence.py 2>&1 | tee "$OUT/equivalence.txt"
run() { timeout "$1" "${@:2}" 2>&1 | grep -v Warning; }
run 150 python3 bench/k_samples.py --shape qwen2-audio-7b --audio-s 30 --rank 16 --reps 10 \
  --ks 1,4,8,16,32 --out "$OUT/ours_7b.json" | tail -n 3
run 150 python3 .whl/k_samples_reference.py --shape qwen2-audio-7b --rank 16 --reps 10 \
  --out "$OUT/reference_7b.json" | tail -n 1
run 110 python3 bench/k_samples.py --shape qwen2.5-omni-3b --audio-s 30 --rank 8 --reps 10 \
  --ks 1,4,8,16,32 --out "$OUT/ours_3b.json" | tail -n 3
run 110 python3 .whl/k_samples_reference.py --shape qwen2.5-omni-3b --rank 8 --reps 10 \
  --out "$OUT/reference_3b.json" | tail -n 1
python3 bench/summarize_gpu.py "$OUT" | tee "$OUT/summary.md"
