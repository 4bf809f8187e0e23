#!/usr/bin/env bash
# The wheels a GPU host's Python 3.12 image lacks, into .whl/ (git-ignored; carry it to the host):
# ../shared/gpu/wheels.sh's list, plus what pipeserve has needed since (msgspec, uvloop, httptools)
# and py-spy (gpu_suite.sh servingspy).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ../shared/gpu/wheels.sh .whl >/dev/null
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 -d .whl msgspec uvloop httptools py-spy
ls .whl
