"""Small process-level helpers shared by the launcher, the engine, tests and benchmarks."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable
from typing import Any

_INT_ONLY = frozenset((int,))


def all_plain_ints(values: list) -> bool:
    """Every value is a plain int (not a bool, not numpy's): checked in C, not per value in Python."""
    return _INT_ONLY.issuperset(map(type, values))


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS reports one (taskset, a
    container's cpuset), which `os.cpu_count()` ignores."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


# Ports below the usual ephemeral ranges (Linux 32768-60999, BSD and Windows 49152-65535): the OS
# hands these out only when asked by number.
_PICKED_PORTS = range(20000, 32768)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, for a process to listen on seconds later. It is drawn
    at random from below the ephemeral range: a port the OS picks (bind to port 0) comes from the
    range that every outgoing connection and every other bind to port 0 (gloo opens dozens while a
    world forms) also draws from, so it can be taken before its listener binds it."""
    rng = random.Random()  # its own, so a seeded global generator cannot repeat picks
    for _ in range(64):
        port = rng.choice(_PICKED_PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # that range is all taken
        s.bind((host, 0))
        return s.getsockname()[1]


def write_char_tokenizer(path: str, vocab_size: int) -> None:
    """Saves a character-level fast tokenizer of exactly `vocab_size` entries (printable ASCII, four
    specials, then filler tokens) with a minimal chat template: for random-weight test and benchmark
    checkpoints, which must not download anything."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = specials + [c for c in string.printable if c not in "\r\x0b\x0c"]
    if vocab_size < len(vocab):
        raise ValueError(
            f"a character tokenizer needs at least {len(vocab)} entries, got {vocab_size}"
        )
    vocab += [f"<extra_{i}>" for i in range(vocab_size - len(vocab))]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    fast.save_pretrained(path)


def set_process_title(title: str) -> None:
    """What `ps` shows for this process: the whole title where setproctitle is installed, else
    the kernel's 15-character name (`ps -o comm`, `top`, `pgrep`)."""
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(15, title.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def freeze_heap() -> None:
    """Start-up's objects (torch, which `transformers` imports even in a front end, the model,
    tables) live as long as the process: collected once, then frozen, so that no later collection
    walks them (a full collection over a front end's ~325k start-up objects cost 170 ms of CPU on
    the 2-core box)."""
    import gc

    gc.collect()
    gc.freeze()


def run_profiled(work: Callable[[], Any], out_dir: str | None, name: str) -> Any:
    """`work()`; with `out_dir`, under cProfile, writing <name>.prof and a text summary by own
    time (<name>.txt) there when it ends (PIPESERVE_PROFILE_DIR: every rank and front end)."""
    if not out_dir:
        return work()
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    try:
        return profiler.runcall(work)
    finally:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"{name}.prof")
        profiler.dump_stats(path)
        with open(os.path.join(out_dir, f"{name}.txt"), "w") as f:
            pstats.Stats(profiler, stream=f).sort_stats("tottime").print_stats(40)


def quiet_exit(code: int) -> None:
    """Exits once the logs are flushed, without the interpreter's teardown (for a spawned front
    end, which holds no multiprocessing resources: the tokenizer's `transformers` import loads
    torch and Triton, whose bindings report leaked objects at teardown, noise in every log)."""
    import logging
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
