"""The package's layout is its architecture: the library never imports the harness, and
no two modules import each other at import time."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "highwaybp"
# The harness: training loops, experiments, benchmarks, reports, the command line.
HARNESS = ("highwaybp.train", "highwaybp.bench", "highwaybp.cli", "highwaybp.__main__",
           "highwaybp.selftest_cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name.startswith("highwaybp")}


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_harness(name: str) -> bool:
    return any(name == h or name.startswith(h + ".") for h in HARNESS)


def test_library_never_imports_the_harness():
    offenders = {
        name: sorted(i for i in _imports(path, top_level_only=False) if _is_harness(i))
        for name, path in MODULES.items() if not _is_harness(name)
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_library_modules_do_not_import_the_package_root():
    """`import highwaybp` from inside the library makes every module depend on all others."""
    offenders = [name for name, path in MODULES.items()
                 if name != "highwaybp" and not _is_harness(name)
                 and "highwaybp" in _imports(path, top_level_only=False)]
    assert not offenders


def test_no_import_cycle_at_import_time():
    graph = {name: {i for i in _imports(path, top_level_only=True) if i in MODULES}
             for name, path in MODULES.items()}
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycles.append([*stack[stack.index(node):], node])
            return
        if node in done:
            return
        for nxt in graph.get(node, ()):
            # A package importing its own submodules (its __init__) is not a cycle.
            if nxt != "highwaybp" and not nxt.startswith(node + "."):
                visit(nxt, [*stack, node])
        done.add(node)

    for name in graph:
        visit(name, [])
    assert not cycles, cycles[:3]


def test_the_checks_see_the_package():
    # A typo in PACKAGE would make every test above pass on nothing.
    assert "highwaybp.core.chain" in MODULES and "highwaybp.train.io" in MODULES
    assert "highwaybp.core.backends.loop" in _imports(MODULES["highwaybp.core.chain"], True) or \
        "highwaybp.core.backends" in _imports(MODULES["highwaybp.core.chain"], True)
