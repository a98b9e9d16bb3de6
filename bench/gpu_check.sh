#!/usr/bin/env bash
# The prepared GPU check (issues #7, #8 and #12), for a machine with one CUDA GPU and this checkout:
#   CIFAR10_ARCHIVE=/path/to/cifar-10-binary.tar.gz OUT=/tmp/out bash bench/gpu_check.sh
# 1. training throughput of every model on the GPU (fp32, fp32 + channels-last, bf16 + channels-last) and
#    what the fast recipe's `auto` picks there;
# 2. the fast recipe on the GPU, test accuracy after every epoch, 3 seeds (time to 93 %; the recipe is
#    airbench's 93 % network, so 94 % is reported as reached or not);
# 3. the train step itself on one CUDA device through `mlflow run`, images/s as MLflow logs them;
# first of all (issue #21), the speed-runs as published (airbench 0.1.8: fp16, no torch.compile in that
# release) beside our recipes, 2 seeds each, time to 94 % / 93 %: airbench94 vs fast94, airbench93 vs fast.
# Everything lands in $OUT. Untried on a GPU so far: budget 10 minutes on an H100 and read $OUT as it fills.
set -euo pipefail
OUT=${OUT:-$(mktemp -d)}
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device"
print(torch.cuda.get_device_name(), torch.__version__)
PY
if python -c "import airbench" 2>/dev/null; then
  for pair in "airbench94 fast94 94" "airbench93 fast 93"; do
    set -- $pair
    python -m bench.peer --device cuda --peer "$1" --ours "$2" --target "$3" --seeds 42,2 --json "$OUT/peer_$1.json" \
      | tee "$OUT/peer_$1.txt"
  done
else  # a dev dependency; a machine without the package index takes its wheel along (pip download airbench==0.1.8)
  echo "airbench is not installed: the peer runs are skipped"
fi
python -m bench.models --device cuda --batch 512 --json "$OUT/models_cuda.json" | tee "$OUT/models_cuda.txt"
python -m bench.time_to_accuracy --device cuda --runs 3 --target 93 --json "$OUT/fast_cuda.json" | tee "$OUT/fast_cuda.txt"
MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db" PATH="$(dirname "$(command -v python)"):$PATH" \
  bash -c 'time mlflow run . --env-manager local -P recipe=fast -P device=cuda -P int8=false' 2>&1 | tail -30 \
  | tee "$OUT/recipe_cuda.txt"
