"""Whether the running script lacks the `if __name__ == "__main__":` guard its training needs.

The attack worker is a spawned process (a fork would copy training's threads and CUDA
state; 'forkserver' imports the main script just the same), and a spawned process imports
the main script again, as `__mp_main__`, to find what it unpickles. Code at the script's top
level outside the guard then runs again in the worker: the whole training. That is checked
here before the worker starts, from the script's source and the line it is running.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from types import FrameType, ModuleType


def _is_main_test(node: ast.expr) -> bool:
    """`__name__ == "__main__"` (either side), alone or in an `and`."""
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
        return any(_is_main_test(value) for value in node.values)
    if not (isinstance(node, ast.Compare) and len(node.ops) == 1):
        return False
    if not isinstance(node.ops[0], ast.Eq):
        return False
    sides = [node.left, node.comparators[0]]
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    texts = [s.value for s in sides if isinstance(s, ast.Constant)]
    return names == ["__name__"] and texts == ["__main__"]


def _guarded(tree: ast.Module, line: int) -> bool:
    """Whether `line` lies in the body of an `if __name__ == "__main__":` block."""
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_main_test(node.test):
            if node.body[0].lineno <= line <= (node.body[-1].end_lineno or line):
                return True
    return False


def _reimported(main: ModuleType | None) -> Path | None:
    """The script a spawned process re-runs at import, or None (interactive, a package's
    `__main__`, or IPython: multiprocessing runs none of those again)."""
    path = getattr(main, "__file__", None)
    name = getattr(getattr(main, "__spec__", None), "name", None) or ""
    if path is None or name == "__main__" or name.endswith(".__main__"):
        return None
    path = Path(path)
    return None if path.stem == "ipython" else path


def _top_level_frame(main: ModuleType) -> FrameType | None:
    """The frame running the main script's top-level code, if it is on the stack."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals is vars(main) and frame.f_code.co_name == "<module>":
            return frame
        frame = frame.f_back
    return None


def unguarded_main_line() -> tuple[Path, int] | None:
    """(script, line) when the caller was reached from a line of the main script's top level
    that a spawned process re-runs (outside `if __name__ == "__main__":`); else None."""
    main = sys.modules.get("__main__")
    path = _reimported(main)
    frame = None if path is None else _top_level_frame(main)
    if frame is None:
        return None
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return None  # no readable source: nothing to say for sure
    return None if _guarded(tree, frame.f_lineno) else (path, frame.f_lineno)


def unguarded_message(where: tuple[Path, int]) -> str:
    """What to do about an unguarded script, naming the line."""
    path, line = where
    return (
        f"{path.name} runs training from its top level (line {line}) outside "
        '`if __name__ == "__main__":`. The attack worker is a spawned process that imports '
        f"{path.name} again, so it would run the training again: put the script's top-level "
        'code (or a call to a main() holding it) under `if __name__ == "__main__":`, or set '
        "background=False to attack inline (no worker; each attack then pauses training)"
    )
