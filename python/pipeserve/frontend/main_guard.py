"""What the rank processes need of the `__main__` module that starts them.

They are started with multiprocessing's "spawn": each child re-runs the parent's `__main__` script
(as `__mp_main__`) before it runs its rank. A script that creates an Engine at module level, outside
`if __name__ == "__main__":`, would then start ranks from inside every rank; multiprocessing stops
that with an error about the "bootstrapping phase", seen only as a rank failure. A script read from
standard input cannot be re-run at all (its `__file__` is "<stdin>").
"""

from __future__ import annotations

import ast
import contextlib
import os
import sys
from collections.abc import Iterator
from types import FrameType, ModuleType


def check_main_guard() -> None:
    """Raises RuntimeError, naming the guard, if the running `__main__` script is executing
    module-level code outside `if __name__ == "__main__":` (the spawned ranks would run it too)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not path or not os.path.isfile(path):
        return  # an interactive session, `python -c`, or stdin: nothing is re-run
    frame = _module_level_frame(main)
    if frame is None or _guarded(path, frame.f_lineno):
        return
    raise RuntimeError(
        f"{path}, line {frame.f_lineno}, starts pipeserve's rank processes at module level. "
        "They are spawned, and each re-runs this script: put the code that creates the Engine "
        'under `if __name__ == "__main__":` (see the README\'s Offline API example).'
    )


@contextlib.contextmanager
def spawnable_main() -> Iterator[None]:
    """While children are spawned: a `__main__` whose file does not exist (a script read from
    stdin) is not handed to them to re-run (they would fail with FileNotFoundError on it)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or os.path.isfile(path) or getattr(main.__spec__, "name", None):
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def _module_level_frame(main: ModuleType) -> FrameType | None:
    """The frame running `main`'s module-level code, if it is on the current stack."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is vars(main):
            return frame
        frame = frame.f_back
    return None


def _guarded(path: str, line: int) -> bool:
    """Whether `line` of the script lies in the body of an `if __name__ == "__main__":`."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, ValueError):
        return True  # cannot tell: do not refuse
    return any(
        isinstance(node, ast.If)
        and _is_main_test(node.test)
        and node.body[0].lineno <= line <= (node.body[-1].end_lineno or line)
        for node in ast.walk(tree)
    )


def _is_main_test(test: ast.expr) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return False
    if not isinstance(test.ops[0], ast.Eq):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    constants = [s.value for s in sides if isinstance(s, ast.Constant)]
    return names == ["__name__"] and constants == ["__main__"]
