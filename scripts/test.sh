#!/usr/bin/env bash
# Fresh machine -> set up (with the test tools), then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh dev,onnx,serve,scale
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
