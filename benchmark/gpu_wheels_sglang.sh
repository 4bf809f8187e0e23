#!/usr/bin/env bash
# SGLang's wheel and what its GroupCoordinator needs beyond a GPU host's Python 3.12 image (torch,
# transformers, numpy, jinja2, httpx, ...), into DIR (default .whl-sglang/, git-ignored), for
# `p2p_overlap.py --sglang` there. A device call carries at most 64 MiB with the working tree, so
# SGLang's wheel is kept as a zip of its files less its compiled Rust extensions (19 of its 39 MB;
# nothing on the parallel_state path loads them), and all of it stays out of .whl/, which every other
# device call carries. The version is scripts/setup.sh's (the one the interop tests run with).
# The list: what importing sglang.srt.distributed.parallel_state, building its GroupCoordinator over
# gloo and one send and receive load in an image holding only those packages (found one missing
# module at a time); the dev box's versions, but orjson, whose version there has no CPython 3.12 wheel.
#   bash benchmark/gpu_wheels_sglang.sh [DIR] [PYTHON_VERSION]
# On the host (the GPU hidden, so that SGLang takes its CPU path, as on a CPU-only machine):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site DIR/*.whl \
#     && python3 -m zipfile -e DIR/sglang-*.zip /tmp/site
#   export PYTHONPATH=/tmp/site:$PWD/python CUDA_VISIBLE_DEVICES=
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl-sglang}
pyv=${2:-3.12}
sglang=$(grep -oE 'sglang==[0-9a-z.]+' scripts/setup.sh)
mkdir -p "$dir"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyv" --implementation cp \
  --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux_2_5_x86_64 \
  -d "$dir" "$sglang" apache-tvm-ffi==0.1.15.post2 msgspec==0.23.0 pyzmq==27.3.0 orjson==3.13.0 \
  psutil==7.2.2 pybase64==1.5.1 pillow==13.0.0 requests==2.34.2 urllib3==2.7.0 \
  charset-normalizer==3.4.7 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
  typing-inspection==0.4.2 starlette==1.10.0 aiohttp==3.14.5 aiohappyeyeballs==2.7.1 \
  aiosignal==1.4.0 attrs==26.1.0 frozenlist==1.8.0 multidict==7.2.1 propcache==0.5.4 yarl==1.25.1 \
  ipython==8.12.3 traitlets==5.15.0 stack-data==0.6.3 executing==2.2.1 asttokens==3.0.1 \
  pure-eval==0.2.3 pexpect==4.8.0 ptyprocess==0.7.0 pickleshare==0.7.5 backcall==0.2.0 \
  decorator==5.2.1 prompt-toolkit==3.0.52 wcwidth==0.7.0 pygments==2.20.0
python3 - "$dir" <<'EOF'
import pathlib, sys, zipfile

wheel = next(pathlib.Path(sys.argv[1]).glob("sglang-*.whl"))
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(
    wheel.with_name(wheel.name.split("-cp")[0] + "-no-ext.zip"), "w", zipfile.ZIP_DEFLATED
) as out:
    for item in src.infolist():
        if not item.filename.endswith(".so"):
            out.writestr(item, src.read(item))
wheel.unlink()
EOF
ls "$dir"
