#!/usr/bin/env bash
# The prepared GPU check (issues #7, #8 and #12), for a machine with one CUDA GPU and this checkout:
#   CIFAR10_ARCHIVE=/path/to/cifar-10-binary.tar.gz OUT=/tmp/out bash bench/gpu_check.sh
# 1. training throughput of every model on the GPU (fp32, fp32 + channels-last, bf16 + channels-last) and
#    what the fast recipe's `auto` picks there;
# 2. the fast recipe on the GPU, test accuracy after every epoch, 3 seeds (time to 93 %; the recipe is
#    airbench's 93 % network, so 94 % is reported as reached or not);
# 3. the train step itself on one CUDA device through `mlflow run`, images/s as MLflow logs them.
# Everything lands in $OUT. About 5 minutes on an H100.
set -euo pipefail
OUT=${OUT:-$(mktemp -d)}
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device"
print(torch.cuda.get_device_name(), torch.__version__)
PY
python -m bench.models --device cuda --batch 512 --json "$OUT/models_cuda.json" | tee "$OUT/models_cuda.txt"
python -m bench.time_to_accuracy --device cuda --runs 3 --target 93 --json "$OUT/fast_cuda.json" | tee "$OUT/fast_cuda.txt"
MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db" PATH="$(dirname "$(command -v python)"):$PATH" \
  bash -c 'time mlflow run . --env-manager local -P recipe=fast -P device=cuda -P int8=false' 2>&1 | tail -30 \
  | tee "$OUT/recipe_cuda.txt"
