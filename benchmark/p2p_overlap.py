"""P2P overlap microbenchmark: the synchronous baseline against the asynchronous tensor-dict path.

Two ranks (gloo on CPU; NCCL when two GPUs are present). Rank 0 sends a PP proxy dict
(`hidden_states`, `residual`, each [tokens, hidden]); rank 1 overlaps a calibrated matmul loop with
the transfer. Per size and dtype, medians over the timed iterations of:
  comm     receive alone (irecv_tensor_dict + wait)
  compute  the matmul loop alone
  sync     receive tensor by tensor (SGLang 0.5.x style), then compute
  async    irecv_tensor_dict posted, compute, then wait
overlap_efficiency = max(comm, compute) / async and speedup = sync / async. A second table gives the
layer's per-message overhead over raw torch.distributed isend/irecv of the same tensors (ping-pong).

With `--sglang` (SGLang installed, CPU), the same payloads also go through SGLang's own
GroupCoordinator, sent by its `send_tensor_dict(async_send=True)`, and are received
  sglang        as shipped: `recv_tensor_dict` (header, then each tensor waited in turn), then compute
  sglang+patch  by pipeserve's patch: `irecv_tensor_dict` posted, compute, then wait
with the compute calibrated to each row's own receive time; sync is SGLang as shipped in both rows.
`--sglang-wire` needs no SGLang (a device host has none): pipeserve's writer of SGLang's wire sends
(byte-identical to SGLang's, test/test_sglang_interop.py) and the receive that the patch installs
receives; with no shipped receive to compare, its sync is that receive, waited, then the compute.

    python benchmark/p2p_overlap.py [--quick] [--sglang | --sglang-wire] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeserve.distributed import (
    Channel,
    DistConfig,
    get_pp_group,
    get_world_group,
    init_distributed,
)
from pipeserve.distributed.sync_baseline import recv_tensor_dict_sync, send_tensor_dict_sync
from pipeserve.utils import free_port

FULL_SIZES = [(64, 1024), (256, 2048), (1024, 4096), (2048, 8192), (4096, 8192)]
QUICK_SIZES = [(64, 1024), (256, 2048), (1024, 4096)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
RAW_TAG = 1000
# the baseline never shares a channel with the asynchronous inbox (PROXY), and needs one with a
# device group on CUDA
SYNC_CHANNEL = Channel.TOKENS


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Compute:
    """A matmul loop whose length is calibrated to a target time. `sleep=True` is a diagnostic:
    the same wait without using a core, which separates the protocol's overlap from the CPU
    contention of a machine whose cores also run the transfer."""

    def __init__(self, device: torch.device, sleep: bool = False) -> None:
        n = 2048 if device.type == "cuda" else 256
        self.a = torch.randn(n, n, device=device)
        self.b = torch.randn(n, n, device=device)
        self.device = device
        self.iters = 1
        self.sleep_s = 0.0 if not sleep else 1e-3

    def run(self) -> None:
        if self.sleep_s:
            time.sleep(self.sleep_s)
            return
        c = self.a
        for _ in range(self.iters):
            c = torch.mm(self.a, self.b)
        _sync(self.device)
        del c

    def calibrate(self, target_ms: float) -> None:
        if self.sleep_s:
            self.sleep_s = target_ms / 1e3
            return
        self.iters = 50
        times = [_time(self.run) for _ in range(5)]
        per_iter = statistics.median(times) / 50
        self.iters = max(1, round(target_ms / per_iter))


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _payload(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> dict:
    return {
        "hidden_states": torch.randn(tokens, hidden, device=device).to(dtype),
        "residual": torch.randn(tokens, hidden, device=device).to(dtype),
    }


def _recv_async(pp, device: torch.device) -> dict:
    _, handles, post = pp.irecv_tensor_dict()
    for h in handles:
        h.wait()
    out = post()
    _sync(device)
    return out


def _measure(
    mode: str, pp, world, payload: dict, compute: Compute, iters: int, warmup: int
) -> float:
    """Runs one mode on both ranks; returns rank 1's median milliseconds."""
    device = pp.device
    times = []
    for i in range(warmup + iters):
        world.barrier()
        if pp.rank_in_group == 0:
            if mode == "sync":
                send_tensor_dict_sync(pp, payload, channel=SYNC_CHANNEL)
            elif mode != "compute":
                pp.send_tensor_dict(payload)
            continue
        start = time.perf_counter()
        if mode == "comm":
            _recv_async(pp, device)
        elif mode == "compute":
            compute.run()
        elif mode == "sync":
            recv_tensor_dict_sync(pp, channel=SYNC_CHANNEL)
            _sync(device)
            compute.run()
        else:
            _, handles, post = pp.irecv_tensor_dict()
            compute.run()
            for h in handles:
                h.wait()
            post()
            _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times) if times else 0.0


def _sglang_group():
    """SGLang's own GroupCoordinator over both ranks (gloo), with pipeserve's `irecv_tensor_dict`
    added; its `send_tensor_dict` / `recv_tensor_dict` stay as shipped."""
    from sglang.srt.distributed import parallel_state as ps

    import pipeserve.distributed.sglang as ps_sglang

    ps_sglang.patch()
    return ps.init_model_parallel_group(
        [[0, 1]],
        0,
        "gloo",
        use_pynccl=False,
        use_custom_allreduce=False,
        use_mscclpp=False,
        use_torch_symm_mem_allreduce=False,
        group_name="pp_sglang",
    )


class SGLangWire:
    """What `_measure_sglang` uses of an SGLang GroupCoordinator, on SGLang's wire without SGLang."""

    def __init__(self, pp) -> None:
        self.pp, self.rank_in_group = pp, pp.rank_in_group

    def send_tensor_dict(self, payload: dict, async_send: bool = True) -> list:
        works = self.pp.isend_tensor_dict(payload, channel=Channel.SGLANG)
        return [SimpleNamespace(work=w) for w in works]  # SGLang's P2PWork: `.work.wait()`

    def irecv_tensor_dict(self) -> tuple:
        return self.pp.irecv_tensor_dict(channel=Channel.SGLANG)


def _measure_sglang(
    mode: str, sgl, world, payload: dict, compute: Compute, iters: int, warmup: int
) -> float:
    """One SGLang mode on both ranks (see the module docstring); rank 1's median milliseconds."""
    times = []
    for i in range(warmup + iters):
        world.barrier()
        if sgl.rank_in_group == 0:
            if mode != "compute":
                for w in sgl.send_tensor_dict(payload, async_send=True):
                    w.work.wait()
            continue
        start = time.perf_counter()
        if mode == "compute":
            compute.run()
        elif mode in ("shipped", "shipped_comm"):
            sgl.recv_tensor_dict()
            if mode == "shipped":
                compute.run()
        elif mode == "serial":  # the patched receive, waited, then the compute
            _, handles, post = sgl.irecv_tensor_dict()
            _wait_all(handles)
            post()
            compute.run()
        else:
            _, handles, post = sgl.irecv_tensor_dict()
            if mode == "patched":
                compute.run()
            _wait_all(handles)
            post()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times) if times else 0.0


SGLANG_STACKS = (("sglang", "shipped"), ("sglang+patch", "patched"))


def _sglang_rows(sgl, world, payload: dict, compute: Compute, args, label: tuple) -> list[dict]:
    rows = []
    wire = isinstance(sgl, SGLangWire)
    stacks = (("sglang-wire+patch", "patched"),) if wire else SGLANG_STACKS
    baseline = "serial" if wire else "shipped"
    for stack, mode in stacks:
        run = lambda m: _measure_sglang(m, sgl, world, payload, compute, args.iters, args.warmup)  # noqa: E731
        comm = world.broadcast_object(run(f"{mode}_comm"), src=1)
        compute.calibrate(comm * args.compute_ratio)
        ms = {m: run(m) for m in ("compute", baseline, mode)}
        res = {"comm": comm, "compute": ms["compute"], "sync": ms[baseline], "async": ms[mode]}
        if sgl.rank_in_group == 1:
            rows.append({"stack": stack, **_row(*label, res, args.compute_ratio)})
    return rows


def layer_one_way_ms(coord, barrier, payload: dict, me: int) -> float:
    """One ping-pong round through the layer (send_tensor_dict, a posted irecv_tensor_dict),
    each side's receive claimed before the round starts: one-way milliseconds."""
    _, handles, post = coord.irecv_tensor_dict(src=1 - me)
    barrier()
    start = time.perf_counter()
    if me == 1:
        _wait_all(handles)
        post()
    coord.send_tensor_dict(payload, dst=1 - me)
    if me == 0:
        _wait_all(handles)
        post()
    return (time.perf_counter() - start) * 1e3 / 2


def _overhead(pp, world, payload: dict, iters: int) -> tuple[float, float]:
    """Ping-pong of the same two tensors, each side's receive posted before the round starts:
    (raw, layer) median one-way milliseconds."""
    me = pp.rank_in_group
    peer = pp.ranks[1 - me]
    raw, layer = [], []
    for i in range(iters + 5):
        bufs = [torch.empty_like(t) for t in payload.values()]
        recvs = [dist.irecv(b, peer, group=pp.cpu_group, tag=RAW_TAG) for b in bufs]
        world.barrier()
        start = time.perf_counter()
        if me == 1:
            _wait_all(recvs)
        _wait_all([dist.isend(t, peer, group=pp.cpu_group, tag=RAW_TAG) for t in payload.values()])
        if me == 0:
            _wait_all(recvs)
        raw_ms = (time.perf_counter() - start) * 1e3 / 2
        layer_ms = layer_one_way_ms(pp, world.barrier, payload, me)
        if i >= 5:
            raw.append(raw_ms)
            layer.append(layer_ms)
    return statistics.median(raw), statistics.median(layer)


def _wait_all(works: list) -> None:
    for w in works:
        w.wait()


def _worker(rank: int, port: int, args: argparse.Namespace, out_path: str) -> None:
    use_cuda = torch.cuda.device_count() >= 2 and not args.cpu
    torch.set_num_threads(args.threads)
    init_distributed(
        DistConfig(
            pp_size=2,
            rank=rank,
            init_method=f"tcp://127.0.0.1:{port}",
            device="cuda" if use_cuda else "cpu",
            local_rank=rank,
        )
    )
    pp, world = get_pp_group(), get_world_group()
    device = pp.device
    compute = Compute(device, sleep=args.compute == "sleep")
    rows, overhead_rows, sglang_rows = [], [], []
    sgl = SGLangWire(pp) if args.sglang_wire else _sglang_group() if args.sglang else None
    sizes = [] if args.overhead_only else QUICK_SIZES if args.quick else FULL_SIZES
    for dtype_name, dtype in DTYPES.items():
        for tokens, hidden in sizes:
            payload = _payload(tokens, hidden, dtype, device)
            comm = _measure("comm", pp, world, payload, compute, args.iters, args.warmup)
            comm = world.broadcast_object(comm, src=1)
            compute.calibrate(comm * args.compute_ratio)
            res = {
                m: _measure(m, pp, world, payload, compute, args.iters, args.warmup)
                for m in ("compute", "sync", "async")
            }
            res["comm"] = comm
            if rank == 1:
                rows.append(_row(dtype_name, tokens, hidden, res, args.compute_ratio))
                _print_row(rows[-1])
            if sgl is not None:
                label = (dtype_name, tokens, hidden)
                sglang_rows += _sglang_rows(sgl, world, payload, compute, args, label)
    if device.type == "cpu":
        for tokens, hidden in ((1, 1024), (16, 1024), (256, 4096)):
            raw, layer = _overhead(
                pp, world, _payload(tokens, hidden, torch.bfloat16, device), args.overhead_iters
            )
            overhead_rows.append(
                {
                    "tokens": tokens,
                    "hidden": hidden,
                    "raw_ms": raw,
                    "layer_ms": layer,
                    "overhead_ms": layer - raw,
                }
            )
    if rank == 1:
        with open(out_path, "w") as f:
            result = {"rows": rows, "overhead": overhead_rows, "device": str(device)}
            json.dump({**result, "sglang": sglang_rows}, f)
    world.barrier()
    sys.stdout.flush()
    os._exit(0)


def _row(dtype: str, tokens: int, hidden: int, res: dict, ratio: float) -> dict:
    return {
        "dtype": dtype,
        "tokens": tokens,
        "hidden": hidden,
        "compute_ratio": ratio,
        "comm_ms": res["comm"],
        "compute_ms": res["compute"],
        "sync_ms": res["sync"],
        "async_ms": res["async"],
        "overlap_efficiency": max(res["comm"], res["compute"]) / res["async"],
        "speedup": res["sync"] / res["async"],
    }


HEADER = f"{'dtype':>5} {'size':>13} {'comm_ms':>9} {'compute_ms':>10} {'sync_ms':>9} {'async_ms':>9} {'overlap':>8} {'speedup':>8}"


def _print_row(r: dict) -> None:
    print(
        f"{r['dtype']:>5} {r['tokens']:>6}x{r['hidden']:<6} {r['comm_ms']:>9.3f} {r['compute_ms']:>10.3f} "
        f"{r['sync_ms']:>9.3f} {r['async_ms']:>9.3f} {r['overlap_efficiency']:>8.3f} {r['speedup']:>8.3f}",
        flush=True,
    )


def _print_sglang(rows: list[dict]) -> None:
    print(
        "\nSGLang's wire (sync = SGLang as shipped: recv, then compute; for sglang-wire+patch, "
        "the patched receive, then compute)"
    )
    print(f"{'stack':>12} {HEADER}")
    for r in rows:
        print(f"{r['stack']:>12}", end=" ")
        _print_row(r)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a subset that runs in under a minute on 2 cores"
    )
    parser.add_argument("--json", default=None, help="write the rows to this path")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per mode (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--overhead-iters", type=int, default=200)
    parser.add_argument(
        "--overhead-only", action="store_true", help="only the per-message overhead ping-pong"
    )
    parser.add_argument("--compute-ratio", type=float, default=1.0, help="compute time / comm time")
    parser.add_argument(
        "--compute",
        choices=("matmul", "sleep"),
        default="matmul",
        help="sleep: diagnostic, see Compute",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU even when GPUs are present")
    parser.add_argument(
        "--sglang", action="store_true", help="also SGLang as shipped and patched (CPU; see above)"
    )
    parser.add_argument(
        "--sglang-wire",
        action="store_true",
        help="SGLang's wire and the patched receive, without SGLang installed (see above)",
    )
    args = parser.parse_args()
    out_path = args.json or os.path.join(
        os.environ.get("TMPDIR", "/tmp"), f"p2p_overlap_{os.getpid()}.json"
    )
    print(HEADER)
    mp.spawn(_worker, args=(free_port(), args, out_path), nprocs=2, join=True)
    with open(out_path) as f:
        result = json.load(f)
    if result["overhead"]:
        print(
            f"\nper-message overhead over raw isend/irecv (2 bf16 tensors, one way, median of {args.overhead_iters})"
        )
        print(f"{'size':>13} {'raw_ms':>8} {'layer_ms':>9} {'overhead_ms':>12}")
        for r in result["overhead"]:
            print(
                f"{r['tokens']:>6}x{r['hidden']:<6} {r['raw_ms']:>8.3f} {r['layer_ms']:>9.3f} {r['overhead_ms']:>12.3f}"
            )
    if result.get("sglang"):
        _print_sglang(result["sglang"])
    if args.json:
        if result.get("sglang"):
            with open(args.json.removesuffix(".json") + "_sglang.json", "w") as f:
                json.dump(result["sglang"], f, indent=1)
        with open(args.json, "w") as f:
            json.dump(result["rows"], f, indent=1)
        with open(args.json.removesuffix(".json") + "_overhead.json", "w") as f:
            json.dump(result["overhead"], f, indent=1)


if __name__ == "__main__":
    main()
