#!/usr/bin/env bash
# The GPU checks of the trainer, in one run on a machine with an NVIDIA GPU and a CUDA
# build of torch 2.11.0 importable by python3 (its libraries stand in for .libtorch):
#   1. builds the NCCL shim against that torch (deploy/build-nccl-shim.sh);
#   2. the NCCL unit test (collectives and the gradient average on the GPU);
#   3. the trainer's process tests (tests/tests/trainer.rs) with the ranks on the GPU;
#   4. `pcb demo`: the whole pipeline with a trainer rank on the GPU (NCCL, world 1);
#   5. training images/s of R50-FPN at 640x640, ours (`pcb train --data`) beside
#      torchvision's on the same GPU.
# Binaries come prebuilt from this repo's release build (BIN, default .gpu/bin: pcb and
# the stage binaries, nats-server, and the test binaries pcb_trainer_test and
# deps/trainer_test). Everything it prints also lands in $OUT.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
cd "$ROOT"
OUT=${OUT:-/tmp/pcb-gpu}
BIN=${BIN:-$ROOT/.gpu/bin}
WORK=$(mktemp -d)
mkdir -p "$OUT"
exec > >(tee "$OUT/check.log") 2>&1
STEPS=${STEPS:-1 2 3 4 5}
want() { [[ " $STEPS " == *" $1 "* ]]; }
step() { printf '\n== %s (%s)\n' "$*" "$(date +%T)"; }

TORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export NATS_SERVER="${NATS_SERVER:-$BIN/nats-server}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda)'

step "1. NCCL shim"
TORCH_LIB="$TORCH_LIB" TORCH_INCLUDE="$(dirname "$TORCH_LIB")/include" \
    deploy/build-nccl-shim.sh "$WORK/lib" || exit 1
export PCB_NCCL_SHIM="$WORK/lib/libpcb_nccl.so"
# Also by name, as ranks started by `pcb` look it up.
export LD_LIBRARY_PATH="$WORK/lib:$LD_LIBRARY_PATH"

if want 2; then
step "2. NCCL unit test"
# The NCCL test in a process of its own: libtorch must see CUDA loaded before any other
# tensor work, which the other tests of the binary do first.
"$BIN/pcb_trainer_test" --ignored --exact dist::tests::nccl_collectives_and_gradient_average_on_a_gpu >"$OUT/unit.log" 2>&1
"$BIN/pcb_trainer_test" --test-threads 1 dist:: >>"$OUT/unit.log" 2>&1
grep -E "^test |test result|panicked|assertion|left|right" "$OUT/unit.log" | head -30
fi

if want 3; then
step "3. trainer process tests, ranks on the GPU"
timeout 300 "$BIN/deps/trainer_test" --test-threads 1 --nocapture >"$OUT/process.log" 2>&1
grep -E "^test |test result|panicked|relative|differ" "$OUT/process.log" | head -30
fi

want 4 || exit 0
step "4. pcb demo, trainer rank on the GPU"
timeout 400 "$BIN/pcb" demo --count ${DEMO_COUNT:-200} --train-epochs ${DEMO_EPOCHS:-3} \
    --data-dir "$WORK/demo" 2>&1 | tail -60
grep -rh "joining the job" "$WORK/demo" 2>/dev/null | head -2

step "5. R50-FPN training images/s at 640x640: ours vs torchvision"
"$BIN/pcb" synth --count 48 --out "$WORK/synth" --val-fraction 0 >/dev/null
timeout 300 "$BIN/pcb" train --data "$WORK/synth" --backbone r50 --norm batch \
    --min-size 640 --max-size 640 --epochs 2 --batch-size 4 --out "$WORK/r50" 2>&1 | tail -8
python3 - <<'PY'
import time, torch, torchvision
torch.manual_seed(0)
m = torchvision.models.detection.fasterrcnn_resnet50_fpn(
    weights=None, weights_backbone=None, num_classes=7, min_size=640, max_size=640).cuda().train()
opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-4)
imgs = [torch.rand(3, 640, 640, device="cuda") for _ in range(4)]
tg = [{"boxes": torch.tensor([[100., 100., 140., 130.], [300., 310., 330., 350.]], device="cuda"),
       "labels": torch.tensor([1, 3], device="cuda")} for _ in range(4)]
def step():
    loss = sum(m(imgs, tg).values()); opt.zero_grad(); loss.backward(); opt.step()
for _ in range(3): step()
torch.cuda.synchronize(); t = time.perf_counter(); n = 20
for _ in range(n): step()
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / n
print(f"torchvision R50-FPN train step, batch 4 at 640x640 on GPU: {dt*1000:.1f} ms/step, {4/dt:.1f} images/s")
PY
step "done"
