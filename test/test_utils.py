"""Process-level helpers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeserve.utils import usable_cores


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
