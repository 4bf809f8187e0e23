"""A pipeserve server that a benchmark starts (`python -m pipeserve.launch_server` on a free port,
optionally pinned with taskset) and whose work it reads: the CPU time of its processes and the
/metrics counters that show how it batched."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time

import httpx

import proc_cpu

# A server's /metrics counters (labels summed) that show how it batched, by our name for each.
COUNTERS = {
    "pipeserve_microbatches_total": "microbatches",
    "pipeserve_generation_tokens_total": "tokens",
    "pipeserve_stage_busy_seconds_total": "busy_s",
    "pipeserve_prefix_cache_hit_tokens_total": "hit_tokens",
    "pipeserve_prefix_cache_query_tokens_total": "prompt_tokens",
}


class LaunchedServer:
    """Started on a free port (pinned to `cpus` with taskset when given) and ready on return;
    `usage()` read before and after a stretch of work tells what that work cost the server."""

    def __init__(self, flags: str, cpus: str | None) -> None:
        from pipeserve.utils import free_port

        port = free_port()
        cmd = [sys.executable, "-m", "pipeserve.launch_server", "--port", str(port)]
        pin = ["taskset", "-c", cpus] if cpus else []
        self.proc = subprocess.Popen(
            [*pin, *cmd, *shlex.split(flags)], stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while self.proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"server '{flags}' did not become ready (exit status {self.proc.poll()})")

    def usage(self) -> dict[str, float]:
        """CPU seconds of its processes and its `COUNTERS`, since it started."""
        out = dict.fromkeys(COUNTERS.values(), 0.0)
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            name = line.split("{")[0].split(" ")[0]
            if name in COUNTERS:
                out[COUNTERS[name]] += float(line.rsplit(" ", 1)[1])
        return {"cpu_s": self.cpu_s(), **out}

    def cpu_s(self) -> float:
        """User + system seconds of the server's live processes."""
        return sum(p.cpu_s for p in proc_cpu.take(self.proc.pid).values())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
