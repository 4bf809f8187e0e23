"""A plain install (the project's `dependencies`, no extras) holds every third-party module the
pipeline runner imports."""

from __future__ import annotations

import ast
import os
import re
import sys

import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "python", "pipeserve", "pipeline")
DISTRIBUTION = {"yaml": "pyyaml"}  # import name -> distribution name, where they differ


def imported_roots(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_every_third_party_import_of_the_runner_is_a_declared_dependency():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = {
            re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower()
            for d in tomllib.load(f)["project"]["dependencies"]
        }
    third_party = set()
    for folder, _, names in os.walk(PACKAGE):  # pipeline/ and its job/, endpoint/
        for name in names:
            if name.endswith(".py"):
                third_party |= imported_roots(os.path.join(folder, name))
    third_party -= set(sys.stdlib_module_names) | {"pipeserve"}
    assert third_party, "no third-party imports found: the scan is broken"
    missing = sorted(
        DISTRIBUTION.get(m, m) for m in third_party if DISTRIBUTION.get(m, m) not in declared
    )
    assert not missing, (
        f"imported by pipeserve.pipeline but not in [project].dependencies: {missing}"
    )
