"""The layers of saeray/ and what each may import (lazy imports inside functions count too).

engine <- assets <- {analysis, executors} <- tools <- report <- cli: a package imports only from the packages
this table allows, so the engine never imports an analysis, tool, report or executor, and analyses never
import the executors or the worker. CONTRIBUTING.md draws the same picture.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "saeray"

MAY_IMPORT = {
    "engine": set(),
    "assets": {"engine"},
    "analysis": {"engine"},
    "executors": {"engine"},
    "tools": {"engine", "assets", "analysis"},
    "report": {"engine", "assets", "analysis", "tools"},
    "cli": {"engine", "assets", "analysis", "executors", "tools", "report"},
}
NEVER = {"analysis": {"saeray.engine.worker"}, "report": {"saeray.engine.worker"}}
"""Single modules a layer may not import although their package is allowed."""


def _module_name(path: Path, root: Path = PACKAGE) -> tuple[str, bool]:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def saeray_imports(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module) of every import of a saeray module in the file, relative ones resolved."""
    name, is_package = _module_name(path, root)
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "saeray"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "saeray":
                target = node.module
            else:
                continue
            if node.module is None:  # from . import a, b: each name may be a module of its own
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in MAY_IMPORT else None


def violations(root: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        mine = layer_of(_module_name(path, root)[0])
        if mine is None:
            continue  # saeray/__init__.py: the version and the old names' aliases
        for line, module in saeray_imports(path, root):
            theirs = layer_of(module)
            where = f"{path.relative_to(root.parent)}:{line} imports {module}"
            if theirs is not None and theirs != mine and theirs not in MAY_IMPORT[mine]:
                allowed = ", ".join(sorted(MAY_IMPORT[mine])) or "no other layer"
                out.append(f"{where}: {mine} may import {allowed}")
            elif any(module == m or module.startswith(m + ".") for m in NEVER.get(mine, ())):
                out.append(f"{where}: {mine} must not import {module}")
    return out


def test_every_module_belongs_to_a_layer():
    strays = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
              if layer_of(_module_name(p)[0]) is None and p != PACKAGE / "__init__.py"]
    assert not strays, f"modules outside the layer packages {sorted(MAY_IMPORT)}: {strays}"


def test_layers_import_only_downward():
    found = violations()
    assert not found, "imports against the layers (tests/test_layers.py, CONTRIBUTING.md):\n  " + "\n  ".join(found)


def test_the_table_has_no_cycle():
    seen: dict[str, int] = {}

    def depth(layer: str, path: tuple[str, ...] = ()) -> int:
        assert layer not in path, f"cycle: {' -> '.join((*path, layer))}"
        if layer not in seen:
            seen[layer] = 1 + max((depth(d, (*path, layer)) for d in MAY_IMPORT[layer]), default=0)
        return seen[layer]

    assert [depth(layer) for layer in MAY_IMPORT]


def test_the_check_sees_relative_lazy_and_from_package_imports(tmp_path):
    root = tmp_path / "saeray"
    (root / "engine").mkdir(parents=True)
    (root / "analysis").mkdir()
    (root / "engine" / "x.py").write_text("def f():\n    from ..analysis import stats\n    from . import store\n")
    (root / "analysis" / "y.py").write_text("import saeray.engine.worker\nfrom ..executors.driver import run\n"
                                           "from ..engine.store import RunDir\n")
    found = violations(root)
    assert [f.split(": ")[0] for f in found] == ["saeray/analysis/y.py:1 imports saeray.engine.worker",
                                                 "saeray/analysis/y.py:2 imports saeray.executors.driver",
                                                 "saeray/engine/x.py:2 imports saeray.analysis"], found
