#!/usr/bin/env bash
# Fresh machine -> set up, then the main job on the embedded default model: segment a
# generated shapes clip (masks + overlay, scored against its ground truth) and build the
# verified bf16 deployment artifacts (ONNX per unit, LLM folder, manifest).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh onnx
out="${1:-out}"
.venv/bin/virst demo -o "$out/demo"
exec .venv/bin/python -m export.build --precision bf16 --out "$out/artifacts-bf16"
