#!/usr/bin/env bash
# Idempotent set-up of ./.venv for this checkout: torch (CPU 2.13.0 unless the venv already
# has a torch, e.g. a CUDA build a GPU user installed first), this project with the extras
# given as $1 (comma-separated, e.g. "dev" or "dev,onnx"), and sam2 1.1.0 without its
# torchvision pin. Versions come from requirements/constraints.txt (what the suite last passed
# with). A stamp skips everything when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
py=.venv/bin/python
digest=$(cat pyproject.toml requirements/*.txt scripts/bootstrap.sh | sha256sum | cut -c1-16)
stamp=".venv/.virst-setup-$digest-${extras:-base}"
[ -f "$stamp" ] && exit 0
$py -m pip install -q --upgrade pip setuptools wheel
$py -c "import torch" 2>/dev/null || $py -m pip install -q "torch==2.13.0"
$py -m pip install -q -c requirements/constraints.txt -e ".${extras:+[$extras]}"
SAM2_BUILD_CUDA=0 $py -m pip install -q --no-deps --no-build-isolation --require-hashes \
    -r requirements/sam2.txt
if $py -c "import torchvision" 2>/dev/null; then
    echo "bootstrap: torchvision is installed; it breaks CPU torch and transformers here:" \
         "pip uninstall torchvision" >&2
fi
$py -c "import sam2, torch, virst; print('bootstrap: torch', torch.__version__, 'ready')"
rm -f .venv/.virst-setup-*"-${extras:-base}"
touch "$stamp"
