"""Imports flow one way: no module of factory/, train/ or eval/ imports itself back through others.

The training engine (``train.finetune`` and below) imports only factory's building blocks; the stages that
pick what to train (``factory.base_model``, ``train.m_step``, ``factory.loop``) import the engine, never
the other way round. Lazy imports inside functions count too: they hide a cycle, they do not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("factory", "train", "eval")

# None left: a new cycle fails the test (add one here only with the reason and the work that breaks it).
KNOWN_CYCLES: list[set[str]] = []


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file (module level or in a function)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from factory import base_model` imports the module factory.base_model.
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            graph[name].update(t for t in map(resolve, targets) if t and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_among_the_project_modules():
    graph = import_graph()
    assert {"train.finetune", "factory.base_model", "eval.evaluate"} <= set(graph)
    assert "factory.stage_inputs" in graph["eval.evaluate"]  # the scan sees imports inside functions
    new = [sorted(c) for c in cycles(graph) if c not in KNOWN_CYCLES]
    assert not new, f"import cycles: {new}"


def test_the_training_engine_imports_no_stage():
    """train/ below the M-step stage imports only factory's building blocks (config, rundir, models,
    tokens, faults), so any stage can call it."""
    graph = import_graph()
    engine = [m for m in graph if m.startswith("train.") and m != "train.m_step"]
    stages = {"factory.base_model", "factory.loop", "factory.sample", "train.m_step", "eval.evaluate"}
    assert {m: sorted(graph[m] & stages) for m in engine if graph[m] & stages} == {}
