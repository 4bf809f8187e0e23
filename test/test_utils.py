"""Process-level helpers."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys

import pytest

from pipeserve.utils import free_port, usable_cores


def test_usable_cores_counts_the_cores_this_process_may_use():
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_usable_cores_follows_a_narrowed_cpu_affinity():
    """Under taskset or a container's cpuset, the default torch threads per rank must not count
    cores the process cannot run on."""
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from pipeserve.utils import usable_cores; print(usable_cores())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "1"


def test_free_port_is_below_the_ephemeral_range_and_not_repeated_under_a_seeded_generator():
    """A picked port is bound seconds later (a rank's rendezvous, a test server): one from the
    ephemeral range can meanwhile go to any outgoing connection or any bind to port 0."""
    picks, state = [], random.getstate()
    try:
        for _ in range(8):
            random.seed(0)  # a seeded global generator must not make every pick the same
            picks.append(free_port())
    finally:
        random.setstate(state)
    assert len(set(picks)) > 1
    for port in picks:
        assert 1024 <= port < 32768
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


def test_free_port_skips_a_port_that_is_listened_on(monkeypatch):
    import pipeserve.utils

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", free_port()))
        held.listen()
        taken, free = held.getsockname()[1], free_port()
        monkeypatch.setattr(pipeserve.utils, "_PICKED_PORTS", (taken, free))
        assert free_port() == free
        monkeypatch.setattr(pipeserve.utils, "_PICKED_PORTS", (taken,))
        assert free_port() != taken  # those all taken: the OS picks one
