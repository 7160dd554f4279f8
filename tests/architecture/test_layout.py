"""The layout's rules, read from the sources (never from import side effects).

- The core (`gradaudit/`) imports no training framework: no accelerate, no Trainer, no pytest.
- No module-level import cycle among gradaudit's modules, `gradaudit.integrations` included.
- Packages are layers: a module imports (at any depth) only from its own layer or those below.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"gradaudit": ROOT / "gradaudit", "gradaudit.integrations": ROOT / "integrations"}
FRAMEWORK_MODULES = ("accelerate", "pytest", "_pytest", "transformers.trainer")
FRAMEWORK_NAMES = ("Trainer", "Training")  # from transformers import Trainer*, Training*
# Bottom to top. "" is the package root (`gradaudit/__init__`): the public API over the core.
LAYERS = (
    ("errors", "io", "_version"),
    ("model",),
    ("gradients",),
    ("attacks",),
    ("scoring",),
    ("report",),
    ("privacy",),
    ("training",),
    ("experiments",),
    ("cli",),
    ("", "metrics", "__main__"),
    ("integrations",),
)


def module_files(packages: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of `packages`."""
    modules = {}
    for package, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def imports(path: Path, module: str, *, module_level: bool) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) per import statement of `path`.

    Relative imports are resolved against `module`. With `module_level`, only statements run
    at import time count: not those inside functions or under `if TYPE_CHECKING:`.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if module_level and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if (
                module_level
                and isinstance(child, ast.If)
                and "TYPE_CHECKING" in ast.unparse(child.test)
            ):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, []) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = module.split(".")[: len(module.split(".")) - child.level + is_package]
                    base = ".".join(parts + ([base] if base else []))
                found.append((base, [alias.name for alias in child.names]))
            visit(child)

    visit(tree)
    return found


def framework_imports(modules: dict[str, Path]) -> list[str]:
    """`module: import` for each import of a training framework, at any depth."""
    bad = []
    for module, path in modules.items():
        for target, names in imports(path, module, module_level=False):
            if target.startswith(FRAMEWORK_MODULES) or target.split(".")[0] in ("accelerate",):
                bad.append(f"{module}: {target}")
            elif target == "transformers":
                bad += [
                    f"{module}: transformers.{n}" for n in names if n.startswith(FRAMEWORK_NAMES)
                ]
    return bad


def layer_of(module: str) -> int:
    """The layer index of a gradaudit module."""
    part = module.split(".")[1] if "." in module else ""
    for index, names in enumerate(LAYERS):
        if part in names:
            return index
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS")


def upward_imports(modules: dict[str, Path]) -> list[str]:
    """`module -> target` for each import of a module in a higher layer."""
    bad = []
    for module, path in modules.items():
        for target, names in imports(path, module, module_level=False):
            if not target.startswith("gradaudit"):
                continue
            for name in names or [None]:
                full = f"{target}.{name}" if name and f"{target}.{name}" in modules else target
                if layer_of(full) > layer_of(module):
                    bad.append(f"{module} -> {full}")
    return bad


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules its module-level imports load explicitly."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, names in imports(path, module, module_level=True):
            for name in names or [None]:
                submodule = f"{target}.{name}" if name else target
                if submodule in modules:
                    graph[module].add(submodule)
                elif target in modules:
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_core_imports_no_training_framework():
    core = {
        m: p
        for m, p in module_files(PACKAGES).items()
        if not m.startswith("gradaudit.integrations")
    }
    assert len(core) > 40  # the whole core was read
    assert framework_imports(core) == []


def test_no_module_level_import_cycle():
    graph = import_graph(module_files(PACKAGES))
    assert "gradaudit.integrations.trainer" in graph
    assert cycles(graph) == []


def test_packages_import_only_from_their_layer_or_below():
    assert upward_imports(module_files(PACKAGES)) == []


def test_the_layer_check_finds_an_upward_import(tmp_path: Path):
    package = tmp_path / "gradaudit"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model" / "__init__.py").write_text("")
    (package / "model" / "families.py").write_text("def f():\n    from ..report import x\n")
    (package / "report.py").write_text("from gradaudit.model import families\n")
    modules = module_files({"gradaudit": package})
    assert upward_imports(modules) == ["gradaudit.model.families -> gradaudit.report"]


def test_the_checks_find_a_planted_cycle_and_framework_import(tmp_path: Path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg.a import thing\n")
    (package / "a.py").write_text("from .sub import b\nthing = 1\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text(
        "import typing\nif typing.TYPE_CHECKING:\n    from pkg import c\nfrom ..a import thing\n"
    )
    (package / "c.py").write_text(
        "def f():\n    from transformers import TrainerCallback\n    import pkg.a\n"
    )
    modules = module_files({"pkg": package})
    assert cycles(import_graph(modules)) == [["pkg.a", "pkg.sub.b"]]
    assert framework_imports(modules) == ["pkg.c: transformers.TrainerCallback"]


def test_every_package_folder_is_listed_for_installation():
    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    folders = {
        ".".join(["gradaudit", *path.parent.relative_to(PACKAGES["gradaudit"]).parts])
        for path in PACKAGES["gradaudit"].rglob("__init__.py")
    }
    assert sorted(listed) == sorted(folders | {"gradaudit.integrations"})
