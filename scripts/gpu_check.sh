#!/usr/bin/env bash
# GPU figures in one command, on whatever GPU torch finds (issue 13's GPU goals):
#   MNIST_LAB_DATA=../shared/data bash scripts/gpu_check.sh [out_dir]
# 1. conv2 at batch 512, a whole epoch of the official training split (54,000 images): the plain PyTorch
#    loop and mnist_lab's Trainer.fit path interleaved (scripts/benchmark.py), steps_per_execution 1, 8 and
#    auto (the default: 32 on a GPU).
#    Goal on an H100: <= 0.15 s an epoch.
# 2. +experiment=speedrun over 10 seeds (conv2, batch 256, one-cycle, bf16, channels_last, data on the
#    GPU): training seconds (train_seconds, validation included) and test accuracy of each seed, with
#    steps_per_execution 1 and auto. Goal on an H100: <= 0.5 s of training to >= 99 % (the public record:
#    0.76 s on a laptop GPU).
# Writes gpu_benchmark.json and the two sweep dirs' summaries into out_dir (default outputs/gpu_check).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/gpu_check}
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no GPU found by torch'; print(torch.cuda.get_device_name())"
python scripts/benchmark.py --device cuda --models conv2 --batch-sizes 512 --steps-per-execution 1 8 auto \
    --train-images 54000 --epochs 4 --repeats 2 --out "$out/gpu_benchmark.json"
seeds=${SEEDS:-0,1,2,3,4,5,6,7,8,9}
for k in 1 auto; do
    python -m mnist_lab.train -m +experiment=speedrun seed=$seeds steps_per_execution=$k \
        trainer.enable_progress_bar=false hydra.sweep.dir="$out/speedrun_k$k" > "$out/speedrun_k$k.log" 2>&1
    python - "$out/speedrun_k$k" <<'PY'
import json, statistics, sys
from pathlib import Path
runs = [json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("*/metrics.json"))]
acc = [r["test/acc"] for r in runs]
sec = [r["train_seconds"] for r in runs]
print(f"{sys.argv[1]}: {len(runs)} seeds, test acc mean {statistics.fmean(acc):.4f} (min {min(acc):.4f}, "
      f"{sum(a >= 0.99 for a in acc)} >= 0.99), train s median {statistics.median(sec):.2f} "
      f"(min {min(sec):.2f}, max {max(sec):.2f}), {runs[0]['device']}")
PY
done
