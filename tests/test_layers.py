"""Imports only point down: each package of pipefold may import the layers below it, never
one above, and no two modules import each other (directly or around a cycle).

The layers, bottom to top (docs/architecture.md draws them):

    errors, _version, files, device, balance    the base: anyone may import these
    schedule                                    the IR and its families
    timeline                                    -> schedule
    simulate                                    -> schedule, timeline
    plan                                        -> simulate, schedule, timeline
    viz                                         -> simulate, schedule, timeline
    model, data                                 -> schedule (torch, no runtime)
    hf                                          -> model (Hugging Face models; hf.files is torch-free)
    parallel_config                             -> schedule (the rulebook, torch-free)
    runtime                                     -> model, plan, simulate, schedule, ...
    job                                         -> runtime and everything below
    cli, __main__                               -> job and everything below

The test reads the source (ast), so it also sees imports inside functions; a function-local
import is allowed only for torch-heavy or optional dependencies, never to dodge an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipefold"

BASE = {"errors", "_version", "balance", "files", "device"}
# What each part may import from pipefold, besides itself and the base.
_BELOW_RUNTIME = {"schedule", "timeline", "simulate", "plan", "model", "data", "parallel_config", "viz"}
ALLOWED: dict[str, set[str]] = {
    "schedule": set(),
    "timeline": {"schedule"},
    "simulate": {"schedule", "timeline"},
    "plan": {"schedule", "timeline", "simulate"},
    "viz": {"schedule", "timeline", "simulate"},
    "model": {"schedule", "timeline"},
    "data": set(),
    "parallel_config": {"schedule"},
    "hf": {"schedule", "timeline", "model", "data"},
    "runtime": _BELOW_RUNTIME,
    "job": _BELOW_RUNTIME | {"runtime", "hf"},
    "cli": _BELOW_RUNTIME | {"runtime", "job", "hf"},
    "__main__": {"cli"},
}
TORCH_FREE = ("schedule", "simulate", "plan", "parallel_config")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = _module_name(path)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {target for target in found if target == "pipefold" or target.startswith("pipefold.")}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = {_module_name(path): path for path in FILES}


def test_every_part_is_placed_in_a_layer():
    parts = {_part(module) for module in MODULES} - {""}
    unplaced = sorted(parts - BASE - set(ALLOWED))
    assert not unplaced, f"put {unplaced} into ALLOWED (and docs/architecture.md)"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_point_down(path):
    source = _part(_module_name(path))
    if source in BASE or source == "":
        allowed = BASE  # the base and the package root import only the base (lazily, the rest)
    else:
        allowed = ALLOWED[source] | BASE | {source}
    upward = sorted(
        target for target in _imports(path) if _part(target) and _part(target) not in allowed
    )
    if _module_name(path) == "pipefold":
        # The package root re-exports lazily (module __getattr__); only its eager imports count.
        return
    assert not upward, f"{_module_name(path)} ({source}) imports {upward}, a layer above it"


@pytest.mark.parametrize("part", TORCH_FREE)
def test_torch_free_parts_never_import_torch(part):
    for path in FILES:
        if _part(_module_name(path)) != part:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = (
                [alias.name for alias in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            assert not any(n == "torch" or n.startswith("torch.") for n in names), (
                f"{_module_name(path)} imports torch"
            )


def _resolve(target: str) -> str | None:
    """The module file an import names (a name imported from a module counts as the module)."""
    while target:
        if target in MODULES and not MODULES[target].name == "__init__.py":
            return target
        if target in MODULES:
            return None  # a package's __init__ re-exports: not a file-level edge
        target = target.rpartition(".")[0]
    return None


def test_no_import_cycles_between_modules():
    graph = {
        module: {t for t in map(_resolve, _imports(path)) if t and t != module}
        for module, path in MODULES.items()
        if path.name != "__init__.py"
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"
