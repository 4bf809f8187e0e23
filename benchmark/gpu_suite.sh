#!/usr/bin/env bash
# The GPU runs behind docs/benchmarks.md, one part per device call (each fits a 10-minute call):
#   bash benchmark/gpu_suite.sh tests|profile|admission|offline8b|pp|pp8b|pp1b|serving|serving1b|servingspy|serving8b|vlm|prefix8b|det|detdecode|detsweep|dettable|detisolation|detserve|det1b|det8b|detprefetch|detstep|detfinal|p2psglang
# Needs the wheels of benchmark/gpu_wheels.sh in .whl/ (carried). Logs and JSON go to $OUT.
set -u
O=${OUT:-/tmp/pipeserve-gpu}
mkdir -p "$O"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl >/dev/null 2>&1
# PYSRC: the package's source (default python/), for an A/B against another build's copy
export PYTHONPATH=/tmp/site:${PYSRC:-$PWD/python}:$PWD/test:$PWD/benchmark PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
LOG=$O/$1.log
step() {  # step SECONDS CMD...: runs under a timeout, appends to the part's log
  local t=$1; shift
  echo "=== $* ($(date +%T))" | tee -a "$LOG"
  timeout "$t" "$@" >>"$LOG" 2>&1
  echo "=== rc=$? ($(date +%T))" | tee -a "$LOG"
}
trim_traces() {  # what comes back is at most 8 files: the 1024-request plots, one trace gzipped
  rm -f "$1"/*one-request.png "$1"/*256-concurrent.png "$1"/*16,16*
  gzip -f "$1/trace_pp2_async.json" 2>/dev/null
  rm -f "$1"/*.json
}
switch_ab() {  # switch_ab VAR: the CUDA tests with VAR=1, then det1b off / on / off / on and
  # det8b off / on on one machine
  env "$1=1" bash "$0" det
  for part in det1b det1b det8b; do
    for on in 0 1; do
      echo "=== $1=$on" | tee -a "$O/$part.log"
      env "$1=$on" bash "$0" "$part"
    done
  done
  grep -h "$1\|decode_step_cost" "$O/det1b.log" "$O/det8b.log"
}
git log -1 --format='commit %h %s' 2>/dev/null | tee -a "$LOG"
nvidia-smi -L | tee -a "$LOG"
case $1 in
tests)
  step 420 python3 -m pytest -q -x -p no:cacheprovider test/test_cuda.py test/test_cuda_graphs.py \
    test/test_attention_backends.py
  if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then  # NCCL P2P needs two GPUs
    step 120 python3 benchmark/p2p_overlap.py --quick --json "$O/p2p_nccl.json"
  fi
  step 300 python3 benchmark/bench_offline.py --shape 1b --json "$O/offline_1b.json"
  ;;
profile)  # one GPU, 1B: one-row projections (gemv) against cuBLAS, the decode step's device time
  # and host share with gemv and without, and the engine's batch-1 latency both ways
  step 200 python3 benchmark/bench_gemv.py --rows 1 --json "$O/gemv.json"
  step 150 python3 benchmark/profile_step.py --shape 1b --batches 1,32,256 --json "$O/step_1b.json"
  PIPESERVE_GEMV_MAX_ROWS=0 step 150 python3 benchmark/profile_step.py --shape 1b --batches 1 \
    --top 0 --json "$O/step_1b_cublas.json"
  for rows in 1 0; do
    PIPESERVE_GEMV_MAX_ROWS=$rows step 150 python3 benchmark/bench_offline.py --shape 1b \
      --engines pipeserve --batches "" --model-path /tmp/ckpt-1b --json "$O/batch1_gemv$rows.json"
  done
  ;;
admission)  # a 1024-request batch reaching stage 0 (pp=1, and pp=2 where two GPUs are), with
  # stage 0's loop under cProfile
  for pp in 1 2; do
    [ "$pp" -gt "$(nvidia-smi -L | wc -l)" ] && continue
    PIPESERVE_PROFILE_DIR=$O/prof$pp step 240 python3 benchmark/bench_admission.py --device cuda \
      --pp-size $pp --requests 1024 --prompt-len 128 --json "$O/admission_pp$pp.json"
    rm -f "$O"/prof$pp/*.prof "$O"/prof$pp/rank1.txt
  done
  ;;
offline8b)
  step 560 python3 benchmark/bench_offline.py --shape 8b --repeats 2 --long 16384 \
    --model-path /tmp/ckpt-8b --json "$O/offline_8b.json"
  ;;
pp8b | pp1b)
  shape=${1#pp}
  step 560 python3 benchmark/bench_pp.py --device cuda --shape "$shape" --repeats 2 \
    --trace "$O/trace_$shape" --json "$O/pp_$shape.json"
  trim_traces "$O/trace_$shape"
  ;;
pp)  # what needs two GPUs, in one call: the two-GPU tests, then bench_pp on the 8B shape
  step 170 python3 -m pytest -q -p no:cacheprovider test/test_cuda_graphs.py -k "pp2_and_tp2" \
    test/test_cuda.py -k "nccl or pp2 or consumer_stream or pp2_and_tp2"
  step 400 python3 benchmark/bench_pp.py --device cuda --shape 8b --repeats 2 --partition 16,16 \
    --trace "$O/trace_8b" --json "$O/pp_8b.json"
  trim_traces "$O/trace_8b"
  ;;
serving)  # two GPUs: the HTTP server at pp=1 (one GPU) and pp=2, 8B shape, ~128-token prompts
  step 120 python3 -c "import sys, torch; sys.argv=['x']; from random_checkpoint import make_model, SHAPES; \
make_model('/tmp/ckpt-8b', SHAPES['8b'], torch.bfloat16, 'cuda')"
  flags="--device cuda --max-running-requests 512 --cuda-graph-max-bs 512"
  step 500 python3 benchmark/bench_serving.py --model-path /tmp/ckpt-8b --launch "$flags --pp-size 1" \
    --launch "$flags --pp-size 2" --concurrency 1,16,64,256 --per-client 4 --num-prompts 512 \
    --input-len 32 --output-len 128 --json "$O/serving_cuda.json" --plot "$O/serving_cuda.png"
  ;;
serving1b)  # one GPU, 1B: served (streaming and not) against offline, 1024 x 128 tokens, 256 in
  # flight, PROCS client processes (default 16) checked against twice as many; BASELINE=DIR (a
  # `python/` tree of an older build) runs the streaming point on it first; FRONTENDS="1 ..." adds
  # streaming points at those --api-server-count values
  step 120 python3 -c "import sys, torch; sys.argv=['x']; from random_checkpoint import make_model, SHAPES; \
make_model('/tmp/ckpt-1b', SHAPES['1b'], torch.bfloat16, 'cuda')"
  flags="--device cuda --max-running-requests 256 --cuda-graph-max-bs 256"
  load="--num-prompts 1024 --concurrency 256 --input-len 30 --output-len 128 --client-procs ${PROCS:-16}"
  if [ -n "${BASELINE:-}" ]; then
    PYTHONPATH=/tmp/site:$BASELINE:$PWD/test:$PWD/benchmark step 240 python3 benchmark/bench_serving.py \
      --model-path /tmp/ckpt-1b --launch "$flags" $load --check-client --offline-engine \
      --json "$O/serving1b_base.json"
  fi
  step 240 python3 benchmark/bench_serving.py --model-path /tmp/ckpt-1b --launch "$flags" $load \
    --check-client --offline-engine --json "$O/serving1b_stream.json"
  for n in ${FRONTENDS:-}; do
    step 150 python3 benchmark/bench_serving.py --model-path /tmp/ckpt-1b \
      --launch "$flags --api-server-count $n" $load --json "$O/serving1b_stream_fe$n.json"
  done
  step 200 python3 benchmark/bench_serving.py --model-path /tmp/ckpt-1b --launch "$flags" $load \
    --check-client --no-stream --json "$O/serving1b_nostream.json"
  step 60 python3 benchmark/write_floor.py --conns 256 --steps 400 --json "$O/write_floor.json"
  ;;
servingspy)  # one GPU, 1B: where a front end's CPU goes under the serving1b streaming load (4x the
  # requests, so that the load lasts): py-spy (a wheel of benchmark/gpu_wheels.sh) records each of
  # FRONTENDS (default 2) front ends; each server process's user and system CPU from /proc
  step 120 python3 -c "import sys, torch; sys.argv=['x']; from random_checkpoint import make_model, SHAPES; \
make_model('/tmp/ckpt-1b', SHAPES['1b'], torch.bfloat16, 'cuda')"
  n=${FRONTENDS:-2}
  python3 -m pipeserve.launch_server --model-path /tmp/ckpt-1b --device cuda --max-running-requests 256 \
    --cuda-graph-max-bs 256 --api-server-count "$n" --port 30555 >"$O/servingspy_server.log" 2>&1 &
  sp=$!
  for _ in $(seq 240); do curl -sf localhost:30555/health >/dev/null && break; sleep 1; done
  fes="$sp $(pgrep -f '^pipeserve-frontend')"  # the launcher is front end 0
  cpu() { for p in $sp $(pgrep -f '^pipeserve-'); do echo "$p $(tr -d '\0' </proc/$p/cmdline | cut -c1-40) \
$(awk '{print "user", $14, "system", $15}' /proc/$p/stat)"; done; }
  cpu >"$O/servingspy_cpu_before.txt"
  how="--native"  # the first front end with native frames (syscalls, the collector; pauses it per
  for p in $fes; do  # sample), the others without pausing them
    /tmp/site/bin/py-spy record $how --pid "$p" --rate 250 --format raw --duration 40 \
      -o "$O/servingspy_fe_$p.txt" >>"$LOG" 2>&1 &
    how="--nonblocking"
  done
  step 200 python3 benchmark/bench_serving.py --base-url http://127.0.0.1:30555 --server-pid "$sp" \
    --num-prompts 4096 --concurrency 256 --input-len 30 --output-len 128 --client-procs ${PROCS:-16} \
    --ignore-eos --json "$O/servingspy.json"
  cpu >"$O/servingspy_cpu_after.txt"
  kill -INT $(pgrep -f 'py-spy record') 2>/dev/null; sleep 2
  kill -TERM "$sp"; wait "$sp"
  for f in "$O"/servingspy_fe_*.txt; do  # summaries only: few files come back from a call
    python3 benchmark/spy_summary.py "$f" --self 60 --inclusive 100 >"${f%.txt}.md" && rm -f "$f"
  done
  ;;
serving8b)  # one GPU, 8B: served streaming against offline, the serving1b workload, PROCS
  # client processes (default 24) checked against twice as many
  step 120 python3 -c "import sys, torch; sys.argv=['x']; from random_checkpoint import make_model, SHAPES; \
make_model('/tmp/ckpt-8b', SHAPES['8b'], torch.bfloat16, 'cuda')"
  flags="--device cuda --max-running-requests 256 --cuda-graph-max-bs 256"
  step 300 python3 benchmark/bench_serving.py --model-path /tmp/ckpt-8b --launch "$flags" \
    --num-prompts 1024 --concurrency 256 --input-len 30 --output-len 128 --client-procs ${PROCS:-24} \
    --check-client --offline-engine --json "$O/serving8b_stream.json"
  ;;
vlm)  # one GPU: VL parity with decode graphs, the graphs' own tests, 8B-shape VL serving (pp=1)
  step 240 python3 -m pytest -q -p no:cacheprovider test/test_vlm.py test/test_cuda_graphs.py \
    -k "cuda or graphs or triton or padded"
  step 330 python3 benchmark/bench_vlm.py --shape vl8b --pp 1,2 --requests 256 --json "$O/vlm_8b.json"
  ;;
vlmbench)  # the benchmark of `vlm` alone
  step 230 python3 benchmark/bench_vlm.py --shape vl8b --pp 1,2 --requests 256 --json "$O/vlm_8b.json"
  ;;
prefix8b)  # one GPU, 8B: 1024 requests in 16 groups, 2048-token prefixes + 32 unique, 64 new
  step 560 python3 benchmark/bench_prefix.py --shape 8b --burst --groups 16 --per-group 64 \
    --prefix 2048 --unique 32 --new 64 --json "$O/prefix_8b.json"
  ;;
detdecode)  # deterministic mode at decode sizes, one GPU: the 1B projections with their weights
  # from HBM (candidate tiles and K splits, checked bitwise), and the decode attention with a long
  # request among short ones under each floor of programs along the splits (1B and 8B heads)
  step 300 python3 benchmark/decode_invariant_matmul.py --shape 1b --json "$O/decode_1b.json"
  for dim in 64 128; do
    step 100 python3 benchmark/bench_invariant_attention.py --dim $dim --json "$O/attn_d$dim.json"
  done
  ;;
det)  # deterministic mode's CUDA tests: the Triton matmul's rows over M, the attention probes,
  # the engine's outputs alone / batched / chunked / graphs on and off (pp=2 with two GPUs)
  step "${DET_TIMEOUT:-560}" python3 -m pytest -q -p no:cacheprovider test/test_deterministic_kernels.py \
    test/test_deterministic.py -k cuda
  ;;
detsweep)  # deterministic mode's matmul: candidate tiles checked bitwise and timed (1B, 8B shapes)
  # SWEEP_ARGS: more arguments, e.g. --candidates a,b,c
  step "${SWEEP_TIMEOUT:-540}" python3 benchmark/sweep_invariant_matmul.py --shapes 1b,8b ${SWEEP_ARGS:-} --json "$O/sweep_invariant.json"
  ;;
dettable)  # detsweep, its pick written into this copy's TABLE (the file comes back in $OUT, to
  # commit), then det1b and det8b with it: one 10-minute call (SWEEP_ARGS as for detsweep)
  SWEEP_TIMEOUT=${SWEEP_TIMEOUT:-200} bash "$0" detsweep
  step 30 python3 benchmark/pick_invariant_tiles.py "$O/sweep_invariant.json" \
    --write python/pipeserve/model/invariant_matmul.py
  cp python/pipeserve/model/invariant_matmul.py "$O/invariant_matmul_picked.py"
  for part in det1b det8b; do bash "$0" "$part"; done
  ;;
detisolation)  # deterministic mode's isolation stress test on one GPU (2,000 requests)
  step 300 python3 -m pytest -q -p no:cacheprovider test/test_isolation.py -k cuda
  ;;
detserve)  # deterministic mode on one GPU: the isolation stress test, and its cost through the
  # server (1B, streaming, 1 and 64 in flight, default then deterministic, ROUNDS times (2))
  bash "$0" detisolation
  step 120 python3 -c "import sys, torch; sys.argv=['x']; from random_checkpoint import make_model, SHAPES; \
make_model('/tmp/ckpt-1b', SHAPES['1b'], torch.bfloat16, 'cuda')"
  flags="--device cuda"
  launches=()
  for _ in $(seq "${ROUNDS:-2}"); do launches+=(--launch "$flags" --launch "$flags --deterministic"); done
  step "${SERVE_TIMEOUT:-280}" python3 benchmark/bench_serving.py --model-path /tmp/ckpt-1b "${launches[@]}" \
    --concurrency 1,64 --num-prompts 128 --input-len 30 --output-len 128 --client-procs 4 \
    --json "$O/detserve_1b.json"
  ;;
det1b | det8b)  # deterministic mode's cost: decode step at batch 1 (also paired: both engines up,
  # measured in turns), 32, 256 against the default
  shape=${1#det}
  step 560 python3 benchmark/bench_offline.py --shape "$shape" --engines pipeserve --deterministic \
    --batches 32,256 --repeats 2 --model-path "/tmp/ckpt-$shape" --json "$O/deterministic_$shape.json"
  ;;
detprefetch)  # deterministic mode's weight prefetch before the PDL wait, then the 1B projections
  # at decode sizes (about 8 minutes)
  switch_ab PIPESERVE_WEIGHT_PREFETCH
  step 200 python3 benchmark/decode_invariant_matmul.py --shape 1b --json "$O/decode_1b.json"
  ;;
detstep)  # deterministic mode's decode step (profile_step.py's graph replay, batch 1 and 32): the
  # CUDA tests, then per shape in SHAPES (1b 1b 1b 8b) the default, deterministic as shipped,
  # and with PIPESERVE_NARROW_TILES=0 (1b only: 8b has no narrow projection); about 7 minutes.
  # VARIANTS: a subset of "default det nonarrow"; NOTESTS=1 skips the tests. One JSON of every
  # replay comes back (a call returns at most 8 files)
  [ -n "${NOTESTS:-}" ] || bash "$0" det
  n=0
  rm -rf /tmp/steps && mkdir -p /tmp/steps  # a warm machine keeps /tmp between calls
  for shape in ${SHAPES:-1b 1b 1b 8b}; do
    n=$((n + 1))
    for v in ${VARIANTS:-default det nonarrow}; do
      [[ $shape == 8b && $v == nonarrow ]] && continue
      flags=--deterministic narrow=1
      case $v in
        default) flags= ;;
        nonarrow) narrow=0 ;;
      esac
      echo "=== $shape $v" >>"$LOG"
      PIPESERVE_NARROW_TILES=$narrow step 150 python3 benchmark/profile_step.py --shape "$shape" \
        --batches 1,32 --top 0 $flags --json "/tmp/steps/${n}_${shape}_$v.json"
    done
  done
  python3 -c 'import json, pathlib, sys; print(json.dumps({p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}, indent=1))' /tmp/steps >"$O/detstep.json"
  grep -E "^=== (1b|8b) |^ +(1|32) +[0-9]" "$LOG"
  ;;
detfinal)  # deterministic mode's batch-1 cost by both measures in one call (about 8 minutes): the
  # 1B step's graph replay (default, deterministic; two rounds), det1b, then the CUDA tests in
  # the time left
  SHAPES="1b 1b" VARIANTS="default det" NOTESTS=1 bash "$0" detstep
  bash "$0" det1b
  left=$((570 - SECONDS))  # a step's timeout: an outer one would not reach its process group
  if [ "$left" -ge 60 ]; then DET_TIMEOUT=$left bash "$0" det; else echo "no time left for det"; fi
  ;;
p2psglang)  # the host's CPU cores (gloo, GPU hidden): p2p_overlap.py's rows through SGLang itself,
  # as shipped and patched, beside pipeserve's own, two runs; carry .whl-sglang/ of
  # benchmark/gpu_wheels_sglang.sh (.whl/ is not needed)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl-sglang/*.whl >/dev/null 2>&1
  python3 -m zipfile -e .whl-sglang/sglang-*.zip /tmp/site
  for r in 1 2; do
    CUDA_VISIBLE_DEVICES= step 90 python3 benchmark/p2p_overlap.py --cpu --quick --sglang \
      --threads 1 --json "$O/p2p_cpu16_sglang_r$r.json"
  done
  ;;
esac
grep -E "passed|failed|SUMMARY|error|Error|rc=" "$LOG" | tail -40
