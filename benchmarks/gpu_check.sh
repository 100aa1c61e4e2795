#!/usr/bin/env bash
# The GPU-side check of training (issue 16): distillation in fp32/bf16/fp16 on CUDA, a GPU
# checkpoint resumed on the CPU, torchrun --nproc_per_node 1 over NCCL, pruning with recovery.
# Needs Python with torch (CUDA), transformers and onnx; deployopt runs from this source tree.
#
#   benchmarks/gpu_check.sh                 # on the GPU (about 2-4 minutes on one H100)
#   benchmarks/gpu_check.sh --device cpu    # smoke mode, tiny sizes (DEVICE=cpu works too)
#
# Prints a table (time per epoch, peak memory and the student's cosine per precision) and
# writes $OUT/gpu_check.json when OUT is set; exits 1 when a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" benchmarks/gpu_check.py --device "${DEVICE:-cuda}" "$@"
