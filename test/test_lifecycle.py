"""The server's end, through the real server: SIGTERM drains within --shutdown-timeout and ends the
rest with a JSON 503 (streams with a final error event); a killed rank fails every request at once
with a JSON 503 that names it, /health included."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from checkpoints import make_checkpoint
from server_harness import Server, group_pids

GRACE_S = 5.0


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """Tens of ms a token on one CPU thread: a 400-token request outlasts the grace period by
    several seconds (6 layers did so by a hair once forwards overlapped the host's work)."""
    path = str(tmp_path_factory.mktemp("slow"))
    return make_checkpoint(
        path, "llama", layers=16, hidden=512, heads=8, kv_heads=4, intermediate=2048
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("tiny")), "llama", layers=4)


def running(srv: Server) -> float:
    for line in httpx.get(f"{srv.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("pipeserve_running_requests "):
            return float(line.split()[1])
    raise KeyError("pipeserve_running_requests")


def wait_running(srv: Server, count: int) -> None:
    deadline = time.monotonic() + 60
    while running(srv) < count:
        assert time.monotonic() < deadline, "requests did not start"
        time.sleep(0.05)


def read_stream(url: str, body: dict, lines: list[str]) -> int:
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            lines.append(line)
        return r.status_code


def around_traceback(output: str) -> str:
    """The part of a server's log that shows its first traceback whole."""
    at = output.find("Traceback")
    return output[max(0, at - 500) : at + 3000]


def events(lines: list[str]) -> list[dict]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def test_sigterm_drains_within_the_grace_period_then_answers_503(slow_model):
    srv = Server(
        "--model-path", slow_model, "--cpu-threads", "1", "--shutdown-timeout", str(GRACE_S)
    )
    url = f"{srv.url}/v1/completions"
    long = {"prompt": "a", "max_tokens": 400, "ignore_eos": True}
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            lines: list[str] = []
            streamed = pool.submit(read_stream, url, long, lines)
            plain = pool.submit(httpx.post, url, json=long, timeout=120)
            wait_running(srv, 2)
            short_lines: list[str] = []
            body = {"prompt": "b", "max_tokens": 8, "ignore_eos": True}
            body["stream_options"] = {"include_usage": True}
            short = pool.submit(read_stream, url, body, short_lines)
            while not short_lines and not short.done():  # its first token: it is running
                time.sleep(0.01)
            srv.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            time.sleep(0.2)
            late = httpx.post(url, json={"prompt": "c", "max_tokens": 2}, timeout=10)
            assert late.status_code == 503, late.text
            assert late.json()["error"]["code"] == "server_shutting_down"
            assert time.monotonic() - signalled < GRACE_S
            health = httpx.get(f"{srv.url}/health", timeout=10)
            assert health.status_code == 503 and health.json()["status"] == "shutting_down"
            assert short.result() == 200
            finished = events(short_lines)
            assert not [e for e in finished if "error" in e]
            assert finished[-1]["usage"]["completion_tokens"] == 8
            cut = plain.result()
            assert time.monotonic() - signalled >= GRACE_S - 0.1
            assert cut.status_code == 503, cut.text
            assert cut.json()["error"]["code"] == "server_shutting_down"
            assert streamed.result() == 200
        assert events(lines)[-1]["error"]["code"] == "server_shutting_down"
        assert [line for line in lines if line][-1] == "data: [DONE]"
        assert srv.proc.wait(30) == 0
        assert srv.leftovers() == []
    finally:
        srv.stop(signal.SIGKILL)


def test_killed_rank_fails_requests_at_once_and_is_named(tiny_model):
    srv = Server("--model-path", tiny_model, "--pp-size", "2", "--cpu-threads", "1")
    url = f"{srv.url}/v1/completions"
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            lines: list[str] = []
            body = {"prompt": "a", "max_tokens": 450, "ignore_eos": True}
            streamed = pool.submit(read_stream, url, body, lines)
            wait_running(srv, 1)
            ranks = [p for p in srv.children_alive() if p != srv.proc.pid]
            os.kill(max(ranks), signal.SIGKILL)  # the last started: rank 1, the last stage
            killed = time.monotonic()
            time.sleep(0.05)
            health = httpx.get(f"{srv.url}/health", timeout=5)
            assert health.status_code == 503 and health.json()["status"] == "dead"
            assert health.json()["reason"].startswith("rank 1 (pipeserve-rank1) was killed")
            late = [
                pool.submit(httpx.post, url, json={"prompt": "b", "max_tokens": 2}, timeout=30)
                for _ in range(4)
            ]
            for r in [f.result() for f in late]:
                assert r.status_code == 503, r.text
                error = r.json()["error"]
                assert error["code"] == "engine_dead"
                assert "rank 1 (pipeserve-rank1) was killed by SIGKILL" in error["message"]
                assert not error["message"].rstrip().endswith(":")
            assert time.monotonic() - killed < 1.0
            assert streamed.result() == 200
        assert events(lines)[-1]["error"]["code"] == "engine_dead"
        assert srv.proc.wait(30) != 0
        assert srv.leftovers() == []
        assert "engine failed: rank 1 (pipeserve-rank1) was killed by SIGKILL" in srv.output()
    finally:
        srv.stop(signal.SIGKILL)


def test_a_second_signal_stops_at_once_with_a_503_for_every_open_request(slow_model):
    srv = Server("--model-path", slow_model, "--cpu-threads", "1")  # grace: the default 25 s
    url = f"{srv.url}/v1/completions"
    long = {"prompt": "a", "max_tokens": 400, "ignore_eos": True}
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            lines: list[str] = []
            streamed = pool.submit(read_stream, url, long, lines)
            plain = pool.submit(httpx.post, url, json=long, timeout=120)
            wait_running(srv, 2)
            srv.proc.send_signal(signal.SIGINT)
            time.sleep(0.3)
            srv.proc.send_signal(signal.SIGINT)
            second = time.monotonic()
            assert srv.proc.wait(30) == 0
            assert time.monotonic() - second < 4
            cut = plain.result()
            assert cut.status_code == 503, cut.text
            assert cut.json()["error"]["code"] == "server_shutting_down"
            assert streamed.result() == 200
        assert events(lines)[-1]["error"]["code"] == "server_shutting_down"
        assert [line for line in lines if line][-1] == "data: [DONE]"
        assert srv.leftovers() == []
        assert "Traceback" not in srv.output(), around_traceback(srv.output())
    finally:
        srv.stop(signal.SIGKILL)


def test_signals_late_in_the_shutdown_never_kill_the_launcher(tiny_model):
    srv = Server("--model-path", tiny_model, "--pp-size", "2", "--cpu-threads", "1")
    try:
        while srv.proc.poll() is None:  # from the drain to the process's very end
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.03)
        assert srv.proc.wait() == 0, srv.output()
        assert srv.leftovers() == []
        assert "Traceback" not in srv.output(), around_traceback(srv.output())
    finally:
        srv.stop(signal.SIGKILL)


ENGINE_START = """
import sys
from pipeserve import Engine

if __name__ == "__main__":
    try:
        Engine(model_path=sys.argv[1], pp_size=2, device="cpu", cpu_threads=1)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""


def importing_torch(pid: int) -> bool:
    """Whether process `pid` has torch's extension loaded (its import is then still going on)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "torch/_C" in f.read()
    except OSError:
        return False


def test_ctrl_c_while_an_engine_starts_leaves_no_traceback_in_a_rank(tiny_model, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group, ranks included, while they still
    import torch: the Engine's caller gets its KeyboardInterrupt, and the ranks stop without a
    traceback of their own, leaving nothing behind."""
    script, log = tmp_path / "start.py", tmp_path / "start.log"
    script.write_text(ENGINE_START)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script), tiny_model], stdout=out, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )  # fmt: skip
    group = lambda: [p for p in group_pids(proc.pid) if p != proc.pid]  # noqa: E731
    try:
        deadline = time.monotonic() + 120
        # both ranks loading torch: the launcher is past their spawns, where a Ctrl-C is lost
        while sum(map(importing_torch, group())) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0, log.read_text()
        assert "interrupted" in log.read_text()
        assert "Traceback" not in log.read_text(), around_traceback(log.read_text())
        deadline = time.monotonic() + 10
        while (left := group()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize(
    "moment, extra",
    [("starting 2 rank(s)", ()), ("ranks ready", ("--api-server-count", "3"))],
    ids=["while-ranks-load", "while-front-ends-start"],
)
def test_a_signal_while_starting_stops_every_process_cleanly(tiny_model, moment, extra):
    """Before serving, SIGTERM must not kill the launcher outright (its ranks and front ends would
    be left to notice alone): it unwinds the start-up and exits 0."""
    args = ("--model-path", tiny_model, "--pp-size", "2", "--cpu-threads", "1", *extra)
    srv = Server(*args, ready=False)
    try:
        deadline = time.monotonic() + 120
        while moment not in srv.output():
            assert srv.proc.poll() is None and time.monotonic() < deadline, srv.output()
            time.sleep(0.01)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0, srv.output()
        assert "stopped by SIGTERM while starting" in srv.output()
        assert "pipeserve ready" not in srv.output()
        assert srv.leftovers() == []
        assert "Traceback" not in srv.output(), around_traceback(srv.output())
    finally:
        srv.stop(signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_signal_as_ready_is_printed_stops_the_server(tiny_model, sig):
    """`pipeserve ready` is printed a moment before the server takes the signals over, and the
    heap is collected in between: a stop raised inside a collection's callback is only printed
    by Python (the server must act on it still), and one raised after the print, outside the
    serving's cleanup, would leave the ranks running and the launcher waiting on them at exit.
    Either way it must stop, at once and cleanly."""
    srv = Server("--model-path", tiny_model, "--pp-size", "2", "--cpu-threads", "1", ready=False)
    try:
        deadline = time.monotonic() + 120
        while "pipeserve ready" not in srv.output():
            assert srv.proc.poll() is None and time.monotonic() < deadline, srv.output()
            time.sleep(0.002)
        srv.proc.send_signal(sig)
        assert srv.proc.wait(20) == 0, srv.output()
        assert srv.leftovers() == []
        assert "Traceback" not in srv.output(), around_traceback(srv.output())
    finally:
        srv.stop(signal.SIGKILL)


LEFT_CHILD = """
import logging, multiprocessing, signal, time

def rank_like(ready):  # ignores SIGTERM and waits on its live parent, as a rank does
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    time.sleep(600)

if __name__ == "__main__":
    logging.basicConfig()
    from pipeserve.launch_server import _exit
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=rank_like, args=(ready,))
    child.start()
    assert ready.wait(30)
    print(child.pid, flush=True)
    _exit(0)
"""


def test_a_child_never_stopped_is_stopped_at_the_launchers_exit_which_says_so(tmp_path):
    """multiprocessing's exit handler joins every child: one that a cleanup missed would hang the
    launcher for ever. It is killed instead, the exit code is 1 and the error names it."""
    script = tmp_path / "left_child.py"
    script.write_text(LEFT_CHILD)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert "1 child process(es) never stopped" in out.stderr
    pid = int(out.stdout.split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
