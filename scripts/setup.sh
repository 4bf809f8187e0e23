#!/usr/bin/env bash
# Installs pipeserve and what it needs. `bash scripts/setup.sh` for serving, `bash scripts/setup.sh test`
# for serving plus the test tools. Takes the light CPU build of torch on machines without an NVIDIA GPU
# and leaves an already installed torch (a CUDA build, say) alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$PY" -m pip install -q torch
    else
        "$PY" -m pip install -q torch==2.13.0
    fi
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
"$PY" -m pip install -q -e ".${extra}"
# The SGLang interop tests run against SGLang's own GroupCoordinator. Its wheel (Linux x86_64,
# CPython 3.11 and 3.12) pins CUDA builds of its dependencies, so it goes in without them; what its
# parallel_state imports is in the test extra. The version is the one the tests were run with.
if [ "${1:-}" = "test" ] && [ "$(uname -sm)" = "Linux x86_64" ] \
    && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 11), (3, 12)))'; then
    "$PY" -m pip install -q --no-deps "sglang==0.5.23"
fi
