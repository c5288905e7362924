"""The architecture, enforced: packages form layers that import only downward, no module imports
another in a cycle, nothing private crosses a package, and no module grows past 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
# Lower number = lower layer. A module may import its own layer and those below, never above.
LAYERS = {"errors": 0, "fsutil": 0, "versions": 0, "bundle": 1, "inputs": 2, "backends": 3, "runtime": 4,
          "extras": 5, "measure": 6, "datasets": 6, "serve": 6, "cli": 7}
# The runtime reaches the `convert` extra only through these doorways, and only inside functions.
CONVERT_DOORWAYS = {"medgemma_edge.extras", "medgemma_edge.measure.validation_report"}


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(path: Path, module: str) -> list[tuple[str, list[str], bool]]:
    """(imported module, names, at module level) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{module}: relative import; the project imports absolutely"
            found.append((node.module or "", [a.name for a in node.names], id(node) in top))
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if parts[0] == "medgemma_edge" and len(parts) > 1 else None


def _graph() -> dict[str, set[str]]:
    mods = {**_modules("medgemma_edge"), **_modules("convert")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for target, names, _ in _imports(path, m):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in mods and candidate != m:
                    graph[m].add(candidate)
                    break
    return graph


def test_layers_only_import_downward() -> None:
    wrong = []
    for m, deps in _graph().items():
        here = _layer(m)
        for d in deps:
            there = _layer(d)
            if here is not None and there is not None and there > here:
                wrong.append(f"{m} -> {d}")
    assert not wrong, wrong


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_the_runtime_reaches_convert_only_through_its_doorways_and_never_at_import() -> None:
    for m, path in _modules("medgemma_edge").items():
        for target, _, top in _imports(path, m):
            if target.split(".")[0] == "convert":
                assert m in CONVERT_DOORWAYS and not top, (m, target)
            if target.split(".")[0] in ("torch", "transformers"):
                pytest.fail(f"{m} imports {target}: the runtime never needs torch or transformers")


def test_nothing_private_crosses_a_package() -> None:
    mods = {**_modules("medgemma_edge"), **_modules("convert")}
    leaks = []
    for m, path in mods.items():
        for target, names, _ in _imports(path, m):
            if target.split(".")[0] not in ("medgemma_edge", "convert"):
                continue
            same_package = target.rsplit(".", 1)[0] == m.rsplit(".", 1)[0]
            leaks += [f"{m}: {target}.{n}" for n in names
                      if n.startswith("_") and not n.startswith("__") and not same_package]
    assert not leaks, leaks


def test_no_module_over_400_lines() -> None:
    big = {m: n for m, p in {**_modules("medgemma_edge"), **_modules("convert")}.items()
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not big, big
