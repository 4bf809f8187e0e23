"""Offline throughput: pipeserve's Engine against `transformers` generate on the same checkpoint, in
the same run, at batch sizes 1, 8, 32 and 128.

Prefill tokens/s: B prompts of --prompt-len tokens, one new token each. Decode tokens/s: from the
difference between runs of --new-tokens and of one new token (same prompts). On a GPU it also
reports the batch-1 decode step against the memory-bandwidth floor (weight bytes / measured copy
bandwidth) for the model used (by default a random-weight Llama shape of about 1B parameters).

    python benchmark/bench_offline.py [--device cpu|cuda] [--model-path DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from pipeserve import Engine
from pipeserve.model.config import ModelConfig

SHAPES = {
    "cpu": dict(hidden=512, layers=8, inter=1536, heads=8, kv=4, vocab=4096),
    "cuda": dict(
        hidden=2048, layers=16, inter=8192, heads=32, kv=8, vocab=32000
    ),  # ~1.1B parameters
}


def make_model(path: str, shape: dict, dtype: torch.dtype) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeserve.utils import write_char_tokenizer

    cfg = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["inter"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"],
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(path, safe_serialization=True)
    write_char_tokenizer(path, cfg.vocab_size)
    return path


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    rng = random.Random(batch)
    return [[rng.randrange(4, vocab) for _ in range(length)] for _ in range(batch)]


def timed(fn: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
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


def theirs(
    model: torch.nn.Module, batch: list[list[int]], new: int, device: str
) -> Callable[[], object]:
    ids = torch.tensor(batch, device=device)
    mask = torch.ones_like(ids)

    def go() -> object:
        with torch.no_grad():
            return model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )

    return go


def rates(
    fn_one: Callable,
    fn_many: Callable,
    batch: int,
    prompt_len: int,
    new: int,
    sync: Callable,
    repeats: int,
) -> tuple[float, float, float]:
    t1 = timed(fn_one, sync, repeats)
    tn = timed(fn_many, sync, repeats)
    decode_step = max(tn - t1, 1e-9) / (new - 1)
    return batch * prompt_len / t1, batch / decode_step, decode_step


def bandwidth_floor_ms(model_path: str, device: str) -> float:
    """Weight bytes over the measured device-to-device copy bandwidth (bytes read plus written)."""
    from pipeserve.model.loader import safetensors_files

    weight_bytes = sum(os.path.getsize(f) for f in safetensors_files(model_path))
    buf = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    out = torch.empty_like(buf)
    sync = torch.cuda.synchronize
    t = timed(lambda: out.copy_(buf), sync, 20)
    return weight_bytes / (2 * buf.numel() / t) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    shape = dict(SHAPES[args.device])
    path = args.model_path or make_model(tempfile.mkdtemp(prefix="bench-offline-"), shape, dtype)
    shape["vocab"] = ModelConfig.from_dir(path).vocab_size
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    hf.generation_config.eos_token_id = None
    rows = []
    print(f"{'batch':>5} {'engine':>12} {'prefill tok/s':>14} {'decode tok/s':>13} {'step ms':>8}")
    with Engine(
        model_path=path,
        device=args.device,
        dtype=str(dtype).removeprefix("torch."),
        max_running_requests=256,
    ) as engine:
        ours(engine, prompts(2, 8, shape["vocab"]), 2)()  # warm-up
        for b in [int(x) for x in args.batches.split(",")]:
            batch = prompts(b, args.prompt_len, shape["vocab"])
            for name, make in (
                ("pipeserve", lambda n, batch=batch: ours(engine, batch, n)),
                ("transformers", lambda n, batch=batch: theirs(hf, batch, n, args.device)),
            ):
                pre, dec, step = rates(
                    make(1),
                    make(args.new_tokens),
                    b,
                    args.prompt_len,
                    args.new_tokens,
                    sync,
                    args.repeats,
                )
                rows.append(
                    {
                        "device": args.device,
                        "batch": b,
                        "engine": name,
                        "prefill_tok_s": pre,
                        "decode_tok_s": dec,
                        "decode_step_ms": step * 1e3,
                    }
                )
                print(f"{b:>5} {name:>12} {pre:>14.1f} {dec:>13.1f} {step * 1e3:>8.2f}", flush=True)
            ours_row, hf_row = rows[-2], rows[-1]
            print(
                f"      ratio: prefill {ours_row['prefill_tok_s'] / hf_row['prefill_tok_s']:.2f}x, decode {ours_row['decode_tok_s'] / hf_row['decode_tok_s']:.2f}x"
            )
    step1 = next(
        (r["decode_step_ms"] for r in rows if r["engine"] == "pipeserve" and r["batch"] == 1), None
    )
    if args.device == "cuda" and step1 is not None:
        floor = bandwidth_floor_ms(path, args.device)
        rows.append(
            {
                "device": args.device,
                "bandwidth_floor_ms": floor,
                "batch1_step_ms": step1,
                "over_floor": step1 / floor,
            }
        )
        print(
            f"batch-1 decode step {step1:.2f} ms; bandwidth floor {floor:.2f} ms; {step1 / floor:.2f}x the floor"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
