#!/usr/bin/env bash
# Fresh machine -> set up, then segment a generated clip with the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/virst demo -o "${1:-out/demo}"
