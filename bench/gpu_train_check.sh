#!/usr/bin/env bash
# The GPU check of the training half, as one prepared run (about 4-6 minutes on one H100/H200,
# computed from the shapes, not yet measured: no card was lent while it was written):
#   bench/gpu_train_check.py on random-weight Qwen2.5-Omni-3B- and Qwen2-Audio-7B-shaped bf16
#   models: 20 IVON + 20 AdamW steps with LoRA r8 on every LLM linear layer (step time, peak
#   memory, tokens/s), export, then K=8 from the exported posterior (ratio to the merged pass)
#   and micro-batching throughput at 16 concurrent clients.
# Wheels for transformers 5.23, tokenizers, safetensors, peft and friends (the versions of the
# .venv) travel in .whl/, as for bench/gpu_check.sh. Results land in $OUT (or ./gpu-results).
#
#   bench/gpu_train_check.sh                  # on the card
#   bench/gpu_train_check.sh --device cpu --tiny  # the same flow on a CPU in about 2 minutes
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ ! -d .whl ] && PY=.venv/bin/python
if [ "${1:-}" = "--device" ] && [ "${2:-}" = "cpu" ]; then
  # CPU: tiny shapes, short clips, few steps (the flow, not the figures)
  timeout 600 "$PY" bench/gpu_train_check.py "$@" --steps 4 --batch 4 --micro 2 --audio-s 2 \
    --reps 2 --clients 4 --each 2 --out "$OUT/train_cpu.json" 2>&1 | grep -v Warning
  exit "${PIPESTATUS[0]}"
fi
nvidia-smi -L
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
timeout 460 "$PY" bench/gpu_train_check.py --device cuda "$@" --out "$OUT/train_gpu.json" 2>&1 \
  | grep -v Warning
exit "${PIPESTATUS[0]}"
