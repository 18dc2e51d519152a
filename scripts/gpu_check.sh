#!/usr/bin/env bash
# The GPU path, checked on a CUDA machine: the unit suite with CUDA visible (bf16 autocast, models placed on the
# GPU for evaluation, serving and generation) and tests/unit/test_gpu.py (bf16 LoRA, QLoRA with bitsandbytes' 4-bit
# CUDA kernels). Used through the `device` tool with the pinned wheels carried in .whl/ (scripts/gpu_wheels.sh gathers them);
# writes its log and a summary to $OUT (default /tmp/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 3
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 - <<'PY' 2>&1 | tee -a "$OUT/gpu.txt"
import time, torch, transformers, peft, trl, bitsandbytes
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft",
      peft.__version__, "trl", trl.__version__, "bitsandbytes", bitsandbytes.__version__)
from tunelab.precision import fast_bf16
print("fast_bf16:", fast_bf16(), "bf16 supported:", torch.cuda.is_bf16_supported())
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ a
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10):
    a @ a
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
print(f"bf16 8192^3 matmul: {2 * 8192 ** 3 / dt / 1e12:.0f} TFLOP/s")
PY
# faiss (icl), optuna (search) are not carried; compare runs icl entries
timeout "${GPU_TEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider -rfEs tests/unit \
  --ignore=tests/unit/test_icl.py --ignore=tests/unit/test_search.py --ignore=tests/unit/test_compare.py \
  -o addopts="" 2>&1 | grep -v "^DEBUG" | tee "$OUT/pytest.log" | tail -60
