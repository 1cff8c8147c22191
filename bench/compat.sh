#!/usr/bin/env bash
# The oldest torch the README supports, proved: a fresh virtual environment with Python 3.12 and
# torch 2.10.0 (what a Kaggle kernel has: Python 3.12, torch 2.10.0+cu128), the other pinned
# requirements, and the test suite on the CPU as CI runs it: the whole suite (training, prediction
# and the notebook included) on the machine's default numerics path, then every test that trains or
# predicts in fp32. PyPI's torch 2.10.0 is a CUDA build (about 3 GB with its nvidia packages); its
# CPU path is what runs here. Not run by CI.
#
#   bash bench/compat.sh                    # torch 2.10.0
#   TORCH=2.11.0 bash bench/compat.sh -x    # another version; arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version="${TORCH:-2.10.0}"
venv="${COMPAT_VENV:-${TMPDIR:-/tmp}/mnist-csv-compat-torch$torch_version}"

python="${PYTHON:-}"
if [ -z "$python" ]; then
    for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
        if "$candidate" -c "" 2>/dev/null; then python="$candidate"; break; fi
    done
fi
[ -n "$python" ] || { echo "compat: no Python 3.12 found (set PYTHON=/path/to/python3.12)"; exit 1; }

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$venv/bin/pip" install --quiet "torch==$torch_version"
grep -hv -e '^torch==' -e '^-r ' requirements.txt requirements-dev.txt > "$venv/requirements-but-torch.txt"
"$venv/bin/pip" install --quiet -r "$venv/requirements-but-torch.txt"
"$venv/bin/python" -c 'import sys, torch; print(f"compat: Python {sys.version.split()[0]}, torch {torch.__version__}")'
"$venv/bin/python" -m pytest "$@"
MNIST_PRECISION=fp32 "$venv/bin/python" -m pytest -m numerics "$@"
