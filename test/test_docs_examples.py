"""Every Python example of README.md and docs/*.md, run as a script, prints what the text after it
says it prints. Examples that talk to http://127.0.0.1:30000 run against a real server of the
embedded model, started here on a free port. Also: an Engine script without the
`if __name__ == "__main__":` guard fails with one clear error, and one read from stdin runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pipeserve
from server_harness import Server

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SERVER_URL = "http://127.0.0.1:30000"
# a ```python block, blank lines, then the ```text block of what it prints
EXAMPLE = re.compile(
    r"```python\n(.*?)```\n(?:\s*\n)*(?:It prints:\n\s*\n)?(```text\n(.*?)```)?", re.S
)


def examples() -> list[tuple[str, str, str | None]]:
    found = []
    for doc in DOCS:
        for i, m in enumerate(EXAMPLE.finditer(doc.read_text())):
            found.append((f"{doc.relative_to(ROOT)}#{i}", m.group(1), m.group(3)))
    return found


EXAMPLES = examples()


@pytest.fixture(scope="module")
def server():
    srv = Server("--cpu-threads", "1")
    yield srv
    assert srv.stop() == 0


def run_script(code: str, *, stdin: bool = False) -> subprocess.CompletedProcess:
    package_root = Path(pipeserve.__file__).resolve().parents[1]  # the pipeserve under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), *sys.path])}
    if stdin:
        cmd, kwargs = [sys.executable, "-"], {"input": code}
    else:
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pipeserve_example_{os.getpid()}.py"
        path.write_text(code)
        cmd, kwargs = [sys.executable, str(path)], {}
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, **kwargs
    )


def lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


def test_every_example_says_what_it_prints():
    assert len(EXAMPLES) >= 4
    missing = [name for name, _, printed in EXAMPLES if printed is None]
    assert missing == [], f"examples without a ```text block of their output: {missing}"


@pytest.mark.parametrize(("name", "code", "printed"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_prints_what_the_docs_say(name, code, printed, request):
    if SERVER_URL in code:
        srv = request.getfixturevalue("server")
        code = code.replace(SERVER_URL, srv.url)
    out = run_script(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert lines(out.stdout) == lines(printed or ""), out.stderr[-3000:]


UNGUARDED = """\
from pipeserve import Engine

with Engine(device="cpu", cpu_threads=1) as engine:
    print(engine.generate("12+34=", {"temperature": 0, "max_new_tokens": 8})["text"])
"""


def test_engine_without_the_main_guard_is_one_clear_error():
    out = run_script(UNGUARDED)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("RuntimeError: ")
    assert 'if __name__ == "__main__":' in out.stderr and "line 3" in out.stderr
    assert "bootstrapping phase" not in out.stderr and "RankFailure" not in out.stderr


def test_engine_script_read_from_stdin_runs():
    out = run_script(UNGUARDED, stdin=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert lines(out.stdout) == ["46"]
