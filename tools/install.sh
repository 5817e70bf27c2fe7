#!/usr/bin/env bash
# Installs offload (editable, with the test extra) into the current Python environment.
#
# torch comes first, because an unpinned torch requirement on a machine without torch pulls a multi-GB CUDA
# build: an installed torch >= 2.11 is kept (GPU users keep theirs; an older one is replaced); on a machine with an NVIDIA driver the
# package index's default (CUDA) build is installed; otherwise the CPU build torch==2.13.0. Set OFFLOAD_TORCH
# to a pip requirement (e.g. "torch==2.14.1") to choose another one.
set -euo pipefail
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."

# The oldest torch offload supports; keep in step with pyproject.toml.
TORCH_MIN=2.11
if "$PYTHON" - "$TORCH_MIN" 2>/dev/null <<'PY'
import sys, torch
have = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if have >= tuple(int(x) for x in sys.argv[1].split(".")) else 1)
PY
then
  echo "install.sh: keeping the installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
elif [ -n "${OFFLOAD_TORCH:-}" ]; then
  echo "install.sh: installing $OFFLOAD_TORCH (from OFFLOAD_TORCH)"
  "$PYTHON" -m pip install "$OFFLOAD_TORCH"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install.sh: NVIDIA GPU found: installing torch (CUDA build) from the package index"
  "$PYTHON" -m pip install "torch>=2.11"
else
  echo "install.sh: no GPU found: installing the CPU build torch==2.13.0"
  "$PYTHON" -m pip install "torch==2.13.0"
fi

# Builds the native extension (scikit-build-core + nanobind, ~15 s on 2 cores) in an isolated build env.
"$PYTHON" -m pip install -e ".[test]"
"$PYTHON" -m offload info
