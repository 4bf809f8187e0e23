"""The import rules of the package's folders (DESIGN.md section 0): the front-end side never loads
torch or the rank side, `scheduler/` is host code, `distributed/` stands on its own."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "python" / "pipeserve"
FRONT_END = ("frontend", "ipc", "server", "pipeline")
RANK_SIDE = ("stage", "runner", "model", "distributed")


def _modules(folder: str) -> list[str]:
    return [
        "pipeserve."
        + ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        for p in sorted((PACKAGE / folder).rglob("*.py"))
        if p.name != "__main__.py"
    ]


def _top_level_imports(path: pathlib.Path) -> set[str]:
    """Modules imported at module level (TYPE_CHECKING blocks excluded)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_front_end_folders_load_no_torch_and_nothing_of_the_rank_side():
    modules = [m for folder in FRONT_END for m in _modules(folder)]
    probe = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m == 'torch' or m.split('.')[:2] in "
        f"{[['pipeserve', f] for f in RANK_SIDE]!r})\nprint(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_scheduler_imports_no_rank_side_and_distributed_nothing_of_pipeserve():
    for path in (PACKAGE / "scheduler").rglob("*.py"):
        for name in _top_level_imports(path):
            assert not any(name.startswith(f"pipeserve.{f}") for f in ("stage", "runner")), (
                f"{path.name} imports {name}"
            )
    for path in (PACKAGE / "distributed").rglob("*.py"):
        for name in _top_level_imports(path):
            assert not name.startswith("pipeserve.") or name.startswith("pipeserve.distributed"), (
                f"{path.name} imports {name}"
            )
