"""The folder layout is the architecture: the sub-packages depend on each other one way only."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "expertflow"
SUBPACKAGES = ("quant", "tiers", "pipeline", "model", "services", "bench")


def _imports(path: Path) -> set[str]:
    """Every ``expertflow.*`` module ``path`` imports, at any depth (lazy imports count too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("expertflow"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("expertflow"))
    return out


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else None


def _package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {p: set() for p in SUBPACKAGES}
    for sub in SUBPACKAGES:
        for path in (PACKAGE / sub).rglob("*.py"):
            for module in _imports(path):
                target = _part(module)
                if target is not None and target != sub:
                    graph[sub].add(target)
    return graph


def test_subpackages_form_no_import_cycle() -> None:
    graph = _package_graph()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        assert node not in path, f"import cycle: {' -> '.join([*path, node])}"
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, [*path, node])
        done.add(node)

    for node in SUBPACKAGES:
        visit(node, [])


def test_dependencies_point_the_documented_way() -> None:
    graph = _package_graph()
    assert graph["quant"] == set(), "quantization schemes and kernels are the bottom level"
    assert graph["tiers"] <= {"quant"}, "storage tiers know nothing of the pipeline, models or the network"
    assert graph["pipeline"] <= {"quant", "tiers"}
    assert "model" not in graph["services"] and "bench" not in graph["services"]


def test_core_imports_nothing_of_expertflow_but_its_errors() -> None:
    assert _imports(PACKAGE / "core.py") <= {"expertflow.errors", "expertflow.errors.CheckpointError"}
