#!/usr/bin/env bash
# One-shot GPU check for a session that is lent a GPU (within 8 minutes on one H100/H200):
#   1. the ViT-L/14 DINOv2 train step (dinov2_jax/configs/pretrain.py:vitl14: bf16, 2 x 224 + 8 x 98 crops,
#      131072-prototype heads, Sinkhorn-Knopp, drop path 0.4) at the largest batch that fits: step
#      time, images/s and MFU (benchmarks/gpu_step.py); cuDNN flash attention checked against XLA's;
#   2. bf16 forward_features against PyTorch (transformers Dinov2Model, SDPA), S/B/L/g at 224 and 518 px
#      (benchmarks/inference.py).
# Put the printed tables in benchmarks/RESULTS.md with the device named.
#
# The GPU image has jax, flax, optax, orbax, torch and transformers but not ml-collections; carry it:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl ml-collections==1.1.0
# then run this script with `.whl` carried (the device tool: carry=[".whl"]).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import jax, flax, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__)"
echo "== 1. ViT-L/14 train step"
timeout 300 python3 benchmarks/gpu_step.py --recipe vitl14 --iters 10 || echo "gpu_step.py failed or timed out (rc $?)"
echo "== 2. bf16 inference vs PyTorch"
timeout 180 python3 benchmarks/inference.py --models vits14,vitb14,vitl14,vitg14 --sizes 224,518 --dtype bfloat16 \
  --batch 32 --iters 10 --warmup 2 || echo "inference.py failed or timed out (rc $?)"
