#!/usr/bin/env bash
# Regenerates model.onnx beside this script from model.safetensors and model.json (the
# shipped default), through pipelines/export/onnx_export.py, and checks the result in
# ONNX Runtime against torch on a DeepPCB board. Run it whenever the weights change:
# pipelines/pcb/tests/onnx_parity.rs fails on a model.onnx that was exported from other
# weights (it compares the sha256 the export records).
#
#   pipelines/models/deeppcb-compact/make_onnx.sh
#
# Needs a Python with deploy/requirements-bench.txt (torch, torchvision, onnx,
# onnxruntime): PCB_EXPORT_PYTHON, else <repo>/.venv-bench/bin/python.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
ROOT="$(cd "$HERE/../../.." && pwd -P)"
PY="${PCB_EXPORT_PYTHON:-$ROOT/.venv-bench/bin/python}"
"$PY" "$ROOT/pipelines/export/onnx_export.py" \
    --weights "$HERE/model.safetensors" \
    --config "$HERE/model.json" \
    --out "$HERE/model.onnx" \
    --check
ls -l "$HERE/model.safetensors" "$HERE/model.onnx"
