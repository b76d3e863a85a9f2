#!/usr/bin/env bash
# Run ON the GPU machine of the `device` tool, from the repository root, with .device-wheels/
# carried (see bench/device-prepare.sh):   bash bench/device.sh
# One prepared call (device run timeout_s=590) that fits a session's 15 minutes of device time,
# with no time left to rerun it; a command that gets its machine warm may give the steps more:
#   1. bench/train_speed.py --config gpu                      variable lengths: plain, dynamic, qlora, MFU
#   2. the same, --variant packed --arms dynamic,qlora        every row full: kernel speed apart from padding
#                                                             (plain = dynamic when nothing is padded)
#   3. the packed qlora arm again at batch 2                  qlora plan vs max_memory_reserved, second size
#   4. the packed qlora arm with training.torch_compile=true  the lever measured on CPU (+32-42%), if time is left
# Each step has its own time limit, so a slow step costs its own result, not the later ones, and a
# step that could not finish before DEADLINE seconds (default 560) is skipped.
# Everything is written to $OUT (the tool brings it back): versions.txt and one .txt per step.
# CONFIG=cpu runs the same steps on a CPU with a small model (a rehearsal of this script).
set -u
OUT=${OUT:-/tmp/device-out}
CONFIG=${CONFIG:-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 QLORA_CACHE=/tmp/qlora-cache PYTHONPATH=$PWD
shopt -s nullglob
packages=(.device-wheels/*.whl .device-wheels/*.tar.gz)
if [ ${#packages[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation "${packages[@]}" > "$OUT/pip.txt" 2>&1 \
    || { tail -20 "$OUT/pip.txt"; echo "installing .device-wheels failed: nothing else can run"; exit 1; }
fi
tokenizer=.device-wheels/tokenizer-v1
[ -d "$tokenizer" ] || tokenizer=mistral-common:v1
{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 - <<'EOF'
import platform
from importlib.metadata import version

import torch

print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
print(" | ".join(f"{name} {version(name)}" for name in ("transformers", "peft", "bitsandbytes", "accelerate", "datasets")))
EOF
} 2>&1 | grep -v kernels-community | tee "$OUT/versions.txt"

deadline=${DEADLINE:-560}
if [ "$CONFIG" = gpu ]; then  # 530 s of steps: with the machine's start, about 11 of the 15 minutes
  examples=1000; steps=8; limits=(290 170 70 150); model=/tmp/ts-spread/mistral-7b-random
else
  examples=300; steps=10; limits=(240 200 60 150); model=
fi
step() {  # name, time limit, arguments of bench/train_speed.py
  local name=$1 limit=$2; shift 2
  if [ $((SECONDS + limit)) -gt "$deadline" ]; then
    echo "== $name skipped: ${SECONDS}s gone, it may take ${limit}s, the deadline is ${deadline}s" | tee "$OUT/$name.txt"
    return
  fi
  echo "== $name ($(date -u +%T), limit ${limit}s)"
  timeout -k 20 "$limit" python3 bench/train_speed.py --config "$CONFIG" --tokenizer "$tokenizer" --steps "$steps" "$@" 2>&1 \
    | grep -v -e kernels-community -e "Saving the dataset" | tee "$OUT/$name.txt"
  echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.txt"
}
step spread "${limits[0]}" --examples "$examples" --workdir /tmp/ts-spread
model_args=()
[ -n "$model" ] && [ -d "$model" ] && model_args=(--model-dir "$model")
step packed "${limits[1]}" --examples "$examples" --variant packed --arms dynamic,qlora --workdir /tmp/ts-packed \
  "${model_args[@]}"
step packed-batch2 "${limits[2]}" --examples "$examples" --variant packed --arms qlora --workdir /tmp/ts-packed \
  "${model_args[@]}" --qlora training.per_device_train_batch_size=2
step packed-compile "${limits[3]}" --examples "$examples" --variant packed --arms qlora --workdir /tmp/ts-packed \
  "${model_args[@]}" --qlora training.torch_compile=true
