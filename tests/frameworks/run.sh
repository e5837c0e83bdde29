#!/usr/bin/env bash
# The framework checks of tests/frameworks (Megatron-Bridge 0.6.2, megatron-core 0.19.2, ms-swift 4.6.0;
# Python 3.12).
# Sets up its own virtual environment (VENV, default .venv-frameworks) the first time: the registry's
# torch (a CUDA build, about 5 GB, runs on the CPU), Megatron-Bridge without its GPU-only dependencies.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv-frameworks}
if [ -z "${PY312:-}" ]; then  # the first Python 3.12 that runs (a pyenv shim may exist and not run)
  for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PY312=$candidate; break; fi
  done
fi
PY312=${PY312:?no working python3.12 found: set PY312}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0 megatron-core==0.19.2 psutil 'transformers==5.12.1' safetensors click \
    rich numpy pytest pyyaml omegaconf einops nvidia-modelopt==0.47.0 megatron-energon tensorboard requests \
    datasets matplotlib ipython
  "$VENV/bin/pip" install -q --no-deps megatron-bridge==0.6.2
  # ms-swift 4.6.0 and its Megatron model package (test_ms_swift.py)
  "$VENV/bin/pip" install -q --no-deps mcore-bridge==1.6.5 ms-swift==4.6.0 peft==0.20.0 accelerate==1.16.0 \
    modelscope==1.40.2 modelscope-hub==0.5.1 json-repair==0.64.6
  "$VENV/bin/pip" install -q cryptography==50.0.2
  "$VENV/bin/pip" uninstall -q -y kernels || true  # its hub-kernel registry breaks transformers 5.12's import
fi
# megatron-core 0.16.1 with the Megatron-Bridge made for it (0.3.1), in a second environment
VENV016=${VENV016:-.venv-frameworks-mcore016}
if [ ! -x "$VENV016/bin/python" ]; then
  "$PY312" -m venv "$VENV016"
  "$VENV016/bin/pip" install -q torch==2.13.0 megatron-core==0.16.1 psutil 'transformers==5.12.1' safetensors \
    click rich numpy pyyaml omegaconf einops nvidia-modelopt==0.47.0 megatron-energon tensorboard requests datasets \
    matplotlib ipython
  "$VENV016/bin/pip" install -q --no-deps megatron-bridge==0.3.1
  "$VENV016/bin/pip" uninstall -q -y kernels || true
fi
MCORE016_PYTHON="$VENV016/bin/python" VLCONVERT_FRAMEWORKS=1 exec "$VENV/bin/python" -m pytest -q tests/frameworks "$@"
