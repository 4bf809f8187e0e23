"""Pipeline-parallel throughput: pp=1 against pp=2 sync and pp=2 async (pp=4 where cores allow),
one build, one run, the same offline workloads.

Per configuration and workload: tokens/s, each stage's busy fraction (forward time / wall), and the
bubble (1 - mean busy) beside the (P-1)/(M+P-1) bound of a pipeline with M microbatches.

    python benchmark/bench_pp.py [--model-path DIR] [--quick] [--json PATH] [--pp-sizes 2,4]
        [--partition 5,4 ...] [--threads N] [--trace DIR]
    python benchmark/bench_pp.py --device cuda --shape 8b [--trace DIR]

On CUDA, pp=1 runs on one GPU and pp=P on P GPUs, on the 1B or 8B shape of bench_offline.py, with
256 and 1024 concurrent requests (128 prompt tokens, 128 new) and one request alone. `--trace DIR`
saves each configuration's pipeline trace (Chrome/Perfetto JSON) and a bubble plot PNG.

`--partition` adds sync and async runs with that layer split, e.g. to move a layer off the last
stage, which also carries the LM head and sampling.

Without --model-path a random-weight Llama-shaped checkpoint is created (nothing is downloaded).

`--plot-from RESULT.json --plot-trace DIR/trace_pp2_async.json[.gz] --plot PNG` redraws one
configuration's bubble plot from a saved run (its window from the JSON; `--plot-workload`,
`--plot-zoom A,B` for a second panel of that interval), without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import tempfile
import time

from pipeserve import Engine
from pipeserve.model.config import ModelConfig, stage_layers
from pipeserve.sampling_params import SamplingParams
from pipeserve.utils import usable_cores

WORKLOADS = {
    # name: (requests, prompt tokens, new tokens)
    "decode-heavy": (64, 32, 128),
    "prefill-heavy": (32, 384, 4),
}
QUICK = {"decode-heavy": (32, 16, 48), "prefill-heavy": (16, 192, 4)}
CUDA_WORKLOADS = {
    "one-request": (1, 128, 128),
    "256-concurrent": (256, 128, 128),
    "1024-concurrent": (1024, 128, 128),
}


def make_model(path: str, hidden: int, layers: int) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeserve.utils import write_char_tokenizer

    cfg = LlamaConfig(
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    write_char_tokenizer(path, cfg.vocab_size)
    return path


def requests(
    workload: tuple[int, int, int], vocab: int = 4000
) -> list[tuple[list[int], SamplingParams]]:
    n, prompt_len, new = workload
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
    return [([rng.randrange(4, vocab) for _ in range(prompt_len)], params) for _ in range(n)]


def run(
    engine: Engine, reqs: list[tuple[list[int], SamplingParams]]
) -> tuple[float, list[float], tuple[float, float]]:
    """(wall seconds, per-stage busy seconds during the run, the run's (start, end) epoch time)."""
    engine.generate(input_ids=[reqs[0][0]], sampling_params={"max_new_tokens": 2})  # refresh stats
    busy0 = list(engine.stats["stage_busy_s"])
    start, epoch = time.perf_counter(), time.time()
    states = engine.submit_many(reqs)
    engine.wait(states)
    wall = time.perf_counter() - start
    engine.generate(input_ids=[reqs[0][0]], sampling_params={"max_new_tokens": 2})  # busy to date
    busy = [b - a for a, b in zip(busy0, engine.stats["stage_busy_s"], strict=True)]
    return wall, busy, (epoch, epoch + wall)


def bench(
    model: str,
    pp: int,
    mode: str,
    threads: int | None,
    workloads: dict,
    repeats: int,
    partition: str | None = None,
    device: str = "cpu",
    trace_dir: str | None = None,
    zoom: tuple[float, float] | None = None,
) -> list[dict]:
    rows = []
    trace = None
    if trace_dir:
        trace = os.path.join(
            trace_dir, f"trace_pp{pp}_{mode}{'_' + partition if partition else ''}.json"
        )
    cuda = device == "cuda"
    with Engine(
        model_path=model,
        device=device,
        dtype="bfloat16" if cuda else "float32",
        pp_size=pp,
        pp_comm_mode=mode,
        cpu_threads=threads,
        max_running_requests=1024 if cuda else 256,
        cuda_graph_max_bs=1024,  # every decode microbatch replays a graph, pp=1's 1024 too
        pp_layer_partition=partition,
        pp_trace=trace,
        disable_radix_cache=True,  # the points' prompts repeat: compare layouts, not cache hits
    ) as engine:
        run(engine, requests((8, 16, 8)))  # warm-up
        m = engine.config.num_microbatches
        windows = {}
        for name, wl in workloads.items():
            reqs = requests(wl)
            tokens = wl[0] * wl[2]
            results = [run(engine, reqs) for _ in range(repeats)]
            wall = statistics.median(r[0] for r in results)
            busy = [statistics.median(r[1][i] for r in results) / wall for i in range(pp)]
            windows[name] = results[-1][2]
            rows.append(
                {
                    "pp_size": pp,
                    "mode": mode,
                    "workload": name,
                    "tokens_per_s": tokens / wall,
                    "total_tokens_per_s": wl[0] * (wl[1] + wl[2]) / wall,
                    "wall_s": wall,
                    "stage_busy": busy,
                    "bubble": 1 - sum(busy) / pp,
                    "bubble_bound": (pp - 1) / (m + pp - 1),
                    "microbatches": m,
                    "partition": partition,
                    "layers": stage_layers(ModelConfig.from_dir(model), pp, partition),
                    "threads": threads,
                    "device": device,
                    "ms_per_token": wall / wl[2] * 1e3 if wl[0] == 1 else None,
                }
            )
            print_row(rows[-1])
    if trace:
        from pp_trace_plot import plot_trace

        for row in rows:
            if row["pp_size"] == pp and row["mode"] == mode and row["partition"] == partition:
                png = trace.removesuffix(".json") + f"_{row['workload']}.png"
                row["trace_busy"] = plot_trace(
                    trace, windows[row["workload"]], png, row["workload"], zoom
                )
                row["trace_window"] = windows[row["workload"]]  # epoch seconds, to re-plot
    return rows


def print_row(r: dict) -> None:
    busy = "/".join(f"{b:.2f}" for b in r["stage_busy"])
    split = f" [{r['partition']}]" if r["partition"] else ""
    print(
        f"{r['workload']:>14} pp={r['pp_size']}{split} {r['mode']:>5} M={r['microbatches']}  {r['tokens_per_s']:9.1f} tok/s  "
        f"total {r['total_tokens_per_s']:9.1f} tok/s  busy {busy:>14}  bubble {r['bubble']:.2f} (bound {r['bubble_bound']:.2f})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", default=None)
    parser.add_argument(
        "--hidden", type=int, default=512, help="hidden size of the generated model"
    )
    parser.add_argument("--layers", type=int, default=8, help="layers of the generated model")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="runs per point (median)")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--pp-sizes",
        default=None,
        help="comma-separated pp sizes besides pp=1 (default: 2, and 4 with at least 4 cores)",
    )
    parser.add_argument(
        "--partition",
        action="append",
        default=[],
        metavar="A,B,...",
        help="also run pp=len(parts) sync and async with this layer split (repeatable)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per stage (default: cores // pp)"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--shape", default="8b", help="CUDA: bench_offline.py's 1b or 8b shape")
    parser.add_argument("--trace", default=None, metavar="DIR", help="save traces and bubble plots")
    parser.add_argument("--plot-from", default=None, metavar="JSON", help="redraw, no run")
    parser.add_argument("--plot-trace", default=None, help="with --plot-from: the saved trace")
    parser.add_argument("--plot-workload", default="1024-concurrent")
    parser.add_argument("--plot-zoom", type=parse_zoom, default=None, metavar="A,B",
                        help="also draw seconds A to B of each bubble plot")  # fmt: skip
    parser.add_argument("--plot", default=None, help="with --plot-from: the PNG")
    args = parser.parse_args()
    if args.plot_from:
        if not (args.plot_trace and args.plot):
            parser.error("--plot-from needs --plot-trace and --plot")
        redraw(args)
        return
    cores = usable_cores()
    cuda = args.device == "cuda"
    if args.trace:
        os.makedirs(args.trace, exist_ok=True)
    if cuda:
        import torch

        from random_checkpoint import SHAPES
        from random_checkpoint import make_model as make_cuda_model

        model = args.model_path or make_cuda_model(
            tempfile.mkdtemp(prefix="bench-pp-"), SHAPES[args.shape], torch.bfloat16, "cuda"
        )
        torch.cuda.empty_cache()
    else:
        model = args.model_path or make_model(
            tempfile.mkdtemp(prefix="bench-pp-"), args.hidden, args.layers
        )
    workloads = CUDA_WORKLOADS if cuda else QUICK if args.quick else WORKLOADS
    sizes = (
        [int(x) for x in args.pp_sizes.split(",")]
        if args.pp_sizes
        else [2]
        if cuda
        else [2] + ([4] if cores >= 4 else [])
    )
    configs = [(1, "async", None)]
    configs += [(pp, mode, None) for pp in sizes for mode in ("sync", "async")]
    configs += [
        (len(split.split(",")), mode, split)
        for split in args.partition
        for mode in ("sync", "async")
    ]
    rows = []
    for pp, mode, split in configs:
        threads = None if cuda else args.threads or max(1, cores // pp)
        rows += bench(
            model, pp, mode, threads, workloads, args.repeats, split, args.device, args.trace,
            args.plot_zoom,
        )  # fmt: skip
    print_ratios(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def parse_zoom(text: str) -> tuple[float, float]:
    a, b = (float(x) for x in text.split(","))
    return a, b


TRACE_NAME = re.compile(r"trace_pp(\d+)_(sync|async)(?:_([\d,]+))?\.json")  # as bench() names it


def redraw(args: argparse.Namespace) -> None:
    """The bubble plot of the saved trace's configuration and --plot-workload, from its window."""
    from pp_trace_plot import plot_trace

    found = TRACE_NAME.search(os.path.basename(args.plot_trace))
    if not found:
        raise SystemExit(f"{args.plot_trace}: not a trace name bench_pp.py writes")
    pp, mode, partition = int(found[1]), found[2], found[3]
    with open(args.plot_from) as f:
        rows = json.load(f)
    row = next(r for r in rows if (r["pp_size"], r["mode"], r["partition"], r["workload"])
               == (pp, mode, partition, args.plot_workload))  # fmt: skip
    title = f"pp={pp} {mode}, {args.plot_workload}" + (f" [{partition}]" if partition else "")
    busy = plot_trace(args.plot_trace, tuple(row["trace_window"]), args.plot, title, args.plot_zoom)
    print("busy per stage:", " / ".join(f"{b:.2f}" for b in busy))


def print_ratios(rows: list[dict]) -> None:
    by = {
        (r["pp_size"], r["partition"] or "", r["mode"], r["workload"]): r["tokens_per_s"]
        for r in rows
    }
    splits = sorted({(pp, split) for pp, split, _, _ in by if pp > 1})
    for wl in sorted({r["workload"] for r in rows}):
        for pp, split in splits:
            a, s = by.get((pp, split, "async", wl)), by.get((pp, split, "sync", wl))
            one = by.get((1, "", "async", wl))
            if a and s:
                label = f"pp={pp}" + (f" [{split}]" if split else "")
                print(f"{wl}: {label} async/sync = {a / s:.3f}x, async/pp1 = {a / one:.3f}x")
                if wl == "one-request":
                    print(f"{wl}: {label} latency async/pp1 = {one / a:.3f}x")


if __name__ == "__main__":
    main()
