#!/usr/bin/env bash
# R50-FPN from scratch on DeepPCB on one GPU, sized to a time budget, then `pcb eval` on
# val.txt. For a lent GPU machine with a CUDA build of torch 2.11.0 importable by python3:
#   here:  cargo build --release -p pcb && mkdir -p .gpu/bin && strip -o .gpu/bin/pcb target/release/pcb
#          .venv-bench/bin/python tests/gpu/pack-deeppcb.py        # .gpu/data, about 40 MB
#   there: BUDGET=460 tests/gpu/deeppcb-r50.sh                     # carry .gpu
# Epoch 1 is timed; the run then resumes for as many epochs as fit in BUDGET seconds (from
# the start of this script), the learning rate x0.1 for the last 30% of them. `--device
# cuda` makes a machine where CUDA does not load fail at once instead of training on its
# CPU. Everything it prints, the JSON report and the PR curves land in $OUT. For a smoke
# test elsewhere: DEVICE=cpu BACKBONE=r18 EXTRA="--limit 8 --min-size 320 --max-size 320".
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
cd "$ROOT"
BIN=${BIN:-.gpu/bin}
DATA=${DATA:-.gpu/data}
WORK=${WORK:-.gpu/r50}
OUT=${OUT:-/tmp/pcb-gpu}
BUDGET=${BUDGET:-460}
DEVICE=${DEVICE:-cuda}
BACKBONE=${BACKBONE:-r50}
mkdir -p "$OUT"
exec > >(tee "$OUT/deeppcb-r50.log") 2>&1
START=$(date +%s)
TORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || exit 2
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$BIN/pcb" --version || exit 3
# The training boards travelled as 1-bit PNG: back to JPEG (quality 95) under their names.
DATA="$DATA" python3 - <<'PY' || exit 4
import glob, os
from multiprocessing import Pool
from PIL import Image
def convert(path):
    Image.open(path).convert("L").save(path[:-4] + ".jpg", quality=95)
    os.remove(path)
files = glob.glob(os.path.join(os.environ["DATA"], "**", "*.png"), recursive=True)
with Pool(os.cpu_count()) as pool:
    pool.map(convert, files, chunksize=32)
print(len(files), "images back to JPEG")
PY
ARGS="--device $DEVICE --data $DATA --list trainval.txt --backbone $BACKBONE --norm batch --batch-size 4 --lr 1e-3 --out $WORK ${EXTRA:-}"
T0=$(date +%s)
"$BIN/pcb" train $ARGS --epochs 1 --lr-step-epochs 1000 || exit 5
T1=$(date +%s)
EPOCH=$((T1 - T0))
N=$((1 + (BUDGET - (T1 - START)) / (EPOCH + 2)))
[ "$N" -lt 1 ] && N=1
STEP=$(( (N * 7 + 5) / 10 ))
[ "$STEP" -lt 1 ] && STEP=1
echo "epoch 1 took ${EPOCH} s: $N epochs in all, learning rate x0.1 from epoch $((STEP + 1))"
if [ "$N" -gt 1 ]; then
    "$BIN/pcb" train $ARGS --epochs "$N" --lr-step-epochs "$STEP" || exit 6
fi
cat "$WORK/state.json"; echo
"$BIN/pcb" eval --device "$DEVICE" --data "$DATA" --list val.txt --weights "$WORK/model.safetensors" \
    ${EVAL_EXTRA:-} --report "$OUT/eval.json" --plot "$OUT/eval-pr.png" || exit 7
echo "total $(( $(date +%s) - START )) s"
