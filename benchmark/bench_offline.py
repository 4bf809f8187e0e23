"""Offline speed: pipeserve's Engine (CUDA graphs on and off) against `transformers.generate` on the
same random-weight checkpoint, in the same run.

Per shape it reports
- batch-1 latency: one --prompt-len prompt, --new-tokens new tokens, greedy, ignore_eos (median of
  --batch1-repeats runs: cheap, and the noisiest point); wall time
  over tokens, beside the floor (weight bytes / measured device copy bandwidth, read + write);
- throughput at each --batches size (same prompt and output lengths): output tokens/s, and the
  decode step (difference between --new-tokens and one new token, over the extra steps), with the
  bandwidth bound of that step (weights + the KV cache read per step) for pipeserve;
- prefill: --prefill-batch prompts of --prefill-len tokens, one new token each: prompt tokens/s.

`--deterministic` also runs pipeserve in deterministic mode (batch-invariant kernels; CUDA graphs
on) in the same run and reports its cost: its decode step over the default's at batch 1 and at
each --batches size, and its prefill rate over the default's; and at batch 1 again with both
engines up at once, measured in turns for --paired-rounds rounds (the median of the per-round
ratios: a drift of the machine between the two engines' runs falls on both alike).

    python benchmark/bench_offline.py --shape 1b|8b|cpu [--model-path DIR] [--json PATH] [--plot PNG]
        [--deterministic]
    python benchmark/bench_offline.py --plot-from RESULT.json [RESULT.json ...] --plot PNG

`--plot` draws decode time against batch size per engine with the bandwidth floor (one panel per
result; needs the CUDA floor); `--plot-from` redraws saved results without running anything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from bench_plots import decode_figure, load
from pipeserve import Engine
from pipeserve.model.config import ModelConfig
from random_checkpoint import SHAPES, make_model

# pipeserve's variants: what each changes in the engine's configuration
VARIANTS = {
    "pipeserve": {},
    "pipeserve-eager": {"disable_cuda_graph": True},
    "pipeserve-deterministic": {"deterministic": True},
}


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed * 1000 + batch)
    return [[rng.randrange(4, vocab) for _ in range(length)] for _ in range(batch)]


def timed(fn: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
    """Median seconds of `repeats` runs after one untimed warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(engine: Engine, batch: list[list[int]], new: int) -> Callable[[], object]:
    params = {"temperature": 0, "max_new_tokens": new, "ignore_eos": True}
    return lambda: engine.generate(input_ids=batch, sampling_params=params)


def theirs(model: torch.nn.Module, batch: list[list[int]], new: int) -> Callable[[], object]:
    ids = torch.tensor(batch, device=model.device)

    def go() -> object:
        with torch.no_grad():
            return model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )

    return go


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bytes per second, counting bytes read plus written: after half a
    second of copies, the best of five timings of ten back-to-back 1 GiB copies on CUDA events
    (no host round trip inside a timing; a slower timing only means interference)."""
    buf = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    out = torch.empty_like(buf)
    warm_until = time.perf_counter() + 0.5  # an idle GPU's clocks take a while to come up
    while time.perf_counter() < warm_until:
        out.copy_(buf)
        torch.cuda.synchronize()
    best = 0.0
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            out.copy_(buf)
        end.record()
        end.synchronize()
        best = max(best, 10 * 2 * buf.numel() / (start.elapsed_time(end) / 1e3))
    return best


def decode_time(
    run: Callable, batch: list[list[int]], new: int, sync: Callable, repeats: int
) -> tuple[float, float]:
    """(seconds for `new` tokens, ms per decode step without the prefill and round trip)."""
    t_many = timed(run(batch, new), sync, repeats)
    t_one = timed(run(batch, 1), sync, repeats)
    return t_many, max(t_many - t_one, 1e-9) / (new - 1) * 1e3


def measure(
    name: str, run: Callable, args: argparse.Namespace, shape: dict, sync: Callable
) -> list:
    """Latency, throughput and prefill rows of one engine; `run(batch, new)` makes a callable."""
    rows = []

    def decode(batch: list[list[int]], repeats: int) -> tuple[float, float]:
        return decode_time(run, batch, args.new_tokens, sync, repeats)

    t, step_ms = decode(prompts(1, args.prompt_len, shape["vocab"]), args.batch1_repeats)
    rows.append({"engine": name, "what": "batch1", "ms_per_token": t / args.new_tokens * 1e3,
                 "decode_step_ms": step_ms})  # fmt: skip
    for b in [int(x) for x in args.batches.split(",") if x]:
        t, step_ms = decode(prompts(b, args.prompt_len, shape["vocab"], seed=1), args.repeats)
        rows.append({"engine": name, "what": "throughput", "batch": b,
                     "tok_s": b * args.new_tokens / t, "decode_step_ms": step_ms})  # fmt: skip
    batch = prompts(args.prefill_batch, args.prefill_len, shape["vocab"], seed=2)
    t = timed(run(batch, 1), sync, args.repeats)
    rows.append(
        {
            "engine": name,
            "what": "prefill",
            "prefill_tok_s": args.prefill_batch * args.prefill_len / t,
        }
    )
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def paired_batch1(cfg: dict, args: argparse.Namespace, shape: dict, sync: Callable) -> list:
    """The default engine's and the deterministic one's batch-1 decode step, both up at once (a
    fixed KV pool each) and measured in turns, --paired-rounds times, the order alternating: a
    drift of the machine (clocks, a neighbour's load) between two engines measured one after the
    other moves the noisiest ratio by more than the cost itself. One row per engine and round."""
    batch = prompts(1, args.prompt_len, shape["vocab"])
    names = ("pipeserve", "pipeserve-deterministic")
    rows = []
    with contextlib.ExitStack() as stack:
        engines = {
            n: stack.enter_context(Engine(**cfg, **VARIANTS[n], max_total_tokens=1 << 16))
            for n in names
        }
        for engine in engines.values():
            ours(engine, prompts(2, 8, shape["vocab"]), 4)()  # warm-up
        for r in range(args.paired_rounds):
            turns = list(engines.items())
            for n, engine in turns[::-1] if r % 2 else turns:  # each order as often
                run = lambda b, k, e=engine: ours(e, b, k)  # noqa: E731
                _, step_ms = decode_time(run, batch, args.new_tokens, sync, args.batch1_repeats)
                row = {"engine": n, "what": "batch1-paired", "round": r, "decode_step_ms": step_ms}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def long_check(engine: Engine, length: int, vocab: int) -> dict:
    """One request of `length` prompt tokens decoded beside 127 short ones: it must complete (no
    dense per-layer K/V copies: the paged kernels read the pool in place)."""
    from pipeserve.sampling_params import SamplingParams

    long_prompt = prompts(1, length, vocab, seed=3)[0]
    short = SamplingParams(temperature=0, max_new_tokens=128, ignore_eos=True)
    items = [(long_prompt, SamplingParams(temperature=0, max_new_tokens=64, ignore_eos=True))]
    items += [(p, short) for p in prompts(127, 128, vocab, seed=4)]
    start = time.perf_counter()
    states = engine.submit_many(items)
    engine.wait(states)
    row = {
        "engine": "pipeserve",
        "what": "long-beside-short",
        "long_prompt_tokens": length,
        "completed": all(len(s.output_ids) == s.params.max_new_tokens for s in states),
        "wall_s": time.perf_counter() - start,
    }
    print(json.dumps(row), flush=True)
    return row


def kv_bytes_per_token(shape: dict, dtype: torch.dtype) -> int:
    d = shape["hidden"] // shape["heads"]
    return 2 * shape["layers"] * shape["kv"] * d * torch.tensor([], dtype=dtype).element_size()


def summarize(
    rows: list, args: argparse.Namespace, shape: dict, weight_bytes: int, bw: float, dtype
) -> list:
    by = {(r["engine"], r["what"], r.get("batch")): r for r in rows}
    out = []
    floor_ms = weight_bytes / bw * 1e3 if bw else None
    for name in ("pipeserve", "pipeserve-eager", "transformers"):
        lat = by.get((name, "batch1", None))
        if lat and floor_ms:
            out.append({"engine": name, "batch1_ms": lat["ms_per_token"], "floor_ms": floor_ms,
                        "over_floor": lat["ms_per_token"] / floor_ms})  # fmt: skip
    for b in [int(x) for x in args.batches.split(",") if x]:
        ours_row, hf = (
            by.get(("pipeserve", "throughput", b)),
            by.get(("transformers", "throughput", b)),
        )
        row = {"batch": b}
        if ours_row and hf:
            row["vs_transformers"] = ours_row["tok_s"] / hf["tok_s"]
        if ours_row and bw:
            mean_len = args.prompt_len + args.new_tokens / 2
            step_bytes = weight_bytes + b * mean_len * kv_bytes_per_token(shape, dtype)
            row["bandwidth_bound_ms"] = step_bytes / bw * 1e3
            row["of_bandwidth_bound"] = row["bandwidth_bound_ms"] / ours_row["decode_step_ms"]
        out.append(row)
    pre_ours, pre_hf = (
        by.get(("pipeserve", "prefill", None)),
        by.get(("transformers", "prefill", None)),
    )
    if pre_ours and pre_hf:
        out.append({"prefill_vs_transformers": pre_ours["prefill_tok_s"] / pre_hf["prefill_tok_s"]})
    out += deterministic_cost(by, rows, args)
    for r in out:
        print("SUMMARY", json.dumps(r), flush=True)
    return out


def deterministic_cost(by: dict, rows: list, args: argparse.Namespace) -> list:
    """Deterministic mode's decode step (and prefill rate) against the default's, same run; at
    batch 1 also the median of the paired rounds' ratios (`paired_batch1`)."""
    det, default = "pipeserve-deterministic", "pipeserve"
    out = []
    paired = {(r["engine"], r["round"]): r["decode_step_ms"] for r in rows if "round" in r}
    ratios = [paired[det, i] / paired[default, i] for i in range(args.paired_rounds)
              if (det, i) in paired and (default, i) in paired]  # fmt: skip
    if ratios:
        out.append({"deterministic_decode_step_cost_paired": statistics.median(ratios),
                    "batch": 1, "rounds": [round(x, 4) for x in ratios]})  # fmt: skip
    points = [("batch1", None)] + [("throughput", int(x)) for x in args.batches.split(",") if x]
    for what, b in points:
        ours_row, base = by.get((det, what, b)), by.get((default, what, b))
        if ours_row and base:
            out.append({"deterministic_decode_step_cost": ours_row["decode_step_ms"]
                        / base["decode_step_ms"], "batch": b or 1,
                        "decode_step_ms": ours_row["decode_step_ms"],
                        "default_decode_step_ms": base["decode_step_ms"]})  # fmt: skip
    pre, base = by.get((det, "prefill", None)), by.get((default, "prefill", None))
    if pre and base:
        out.append({"deterministic_prefill_cost": base["prefill_tok_s"] / pre["prefill_tok_s"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shape", default="1b" if torch.cuda.is_available() else "cpu", choices=SHAPES
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--batches", default="32,256")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-batch", type=int, default=32)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--batch1-repeats",
        type=int,
        default=10,
        help="repeats of the batch-1 runs (cheap, and the noisiest: a step is about a millisecond)",
    )
    parser.add_argument(
        "--cpu-threads", type=int, default=None, help="torch threads per rank (CPU)"
    )
    parser.add_argument("--engines", default="pipeserve,pipeserve-eager,transformers")
    parser.add_argument(
        "--long",
        type=int,
        default=0,
        help="also decode one request of this many prompt tokens beside 127 short ones",
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="also run pipeserve --deterministic and report its cost against the default",
    )
    parser.add_argument(
        "--paired-rounds",
        type=int,
        default=5,
        help="with --deterministic: rounds of the paired batch-1 measure (0: none)",
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None, help="PNG: decode ms against batch size")
    parser.add_argument("--plot-from", nargs="+", default=None, metavar="JSON",
                        help="redraw --plot from saved results instead of running")  # fmt: skip
    args = parser.parse_args()
    if args.plot_from:
        if not args.plot:
            parser.error("--plot-from needs --plot")
        decode_figure([load(p) for p in args.plot_from], args.plot)
        return
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    shape = dict(SHAPES[args.shape])
    start = time.perf_counter()
    path = args.model_path or tempfile.mkdtemp(prefix="bench-offline-")
    if not os.path.isfile(os.path.join(path, "config.json")):  # a new directory: fill it
        make_model(path, shape, dtype, args.device)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(f"checkpoint ready in {time.perf_counter() - start:.1f}s: {path}", flush=True)
    shape["vocab"] = ModelConfig.from_dir(path).vocab_size
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows: list = []
    engines = args.engines.split(",") + (["pipeserve-deterministic"] if args.deterministic else [])
    cfg_common = dict(model_path=path, device=args.device, dtype=str(dtype).removeprefix("torch."),
                      max_running_requests=max([256, *[int(b) for b in args.batches.split(",") if b]]),
                      # each point re-sends prompts of earlier ones: measured uncached, as transformers
                      disable_radix_cache=True, cpu_threads=args.cpu_threads)  # fmt: skip
    for name, variant in VARIANTS.items():
        if name not in engines:
            continue
        with Engine(**cfg_common, **variant) as engine:
            ours(engine, prompts(2, 8, shape["vocab"]), 4)()  # warm-up
            rows += measure(name, lambda b, n, e=engine: ours(e, b, n), args, shape, sync)
            if args.long and name == "pipeserve":
                rows.append(long_check(engine, args.long, shape["vocab"]))
        if args.deterministic and args.paired_rounds and name == "pipeserve-deterministic":
            rows += paired_batch1(cfg_common, args, shape, sync)
    if "transformers" in engines:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
        hf.generation_config.eos_token_id = None
        rows += measure("transformers", lambda b, n: theirs(hf, b, n), args, shape, sync)
        del hf
    from pipeserve.model.loader import safetensors_files

    weight_bytes = sum(os.path.getsize(f) for f in safetensors_files(path))
    bw = copy_bandwidth(args.device) if cuda else 0.0
    summary = summarize(rows, args, shape, weight_bytes, bw, dtype)
    meta = {"shape": args.shape, "device": args.device, "gpu": torch.cuda.get_device_name() if cuda else None,
            "copy_bandwidth": bw, "weight_bytes": weight_bytes, "args": vars(args)}  # fmt: skip
    result = {"meta": meta, "rows": rows, "summary": summary}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot and bw:  # the floor needs the CUDA copy bandwidth
        decode_figure([result], args.plot)


if __name__ == "__main__":
    main()
