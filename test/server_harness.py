"""Starts the real server (`python -m pipeserve.launch_server`) on a free port and stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from pipeserve.utils import free_port


class Server:
    def __init__(
        self, *args: str, port: int | None = None, ready: bool = True, timeout: float = 120.0
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
            "w+", prefix="pipeserve-server-", suffix=".log", delete=False
        )
        cmd = [
            sys.executable,
            "-m",
            "pipeserve.launch_server",
            "--port",
            str(self.port),
            "--device",
            "cpu",
            *args,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        if ready:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def children_alive(self) -> list[int]:
        """PIDs still running in the server's process group (its ranks and resource tracker)."""
        return group_pids(self.proc.pid)

    def leftovers(self, timeout: float = 10.0) -> list[str]:
        """After the server has exited: what is still running in its group once `timeout` has
        passed, as "pid: command line". Waits because multiprocessing's resource tracker exits
        only after it has seen its parent's end of the pipe close, a moment after the parent."""
        deadline = time.monotonic() + timeout
        while (alive := self.children_alive()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [f"{pid}: {_cmdline(pid)}" for pid in alive]


def group_pids(group: int) -> list[int]:
    """PIDs running (not zombies) in process group `group`."""
    out = subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split() if _running(int(p))]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ").strip()
    except OSError:
        return "(gone)"


def _running(pid: int) -> bool:
    """False for a zombie: it has exited and only waits to be reaped (by init, in a container)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
