"""The folder layout is the architecture: the sub-packages depend on each other one way only."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "expertflow"
SUBPACKAGES = ("quant", "wire", "tiers", "pipeline", "model", "services", "serving", "lab")


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


#: Top-level modules of the runtime, nodes of the graph like the sub-packages.
TOP_LEVEL = ("_version", "errors", "config", "core", "aio", "assemble", "threads", "devices")
#: Front ends: they parse, print and dispatch, to the runtime and to the lab alike.
FRONT_ENDS = ("__init__", "cli", "demo", "__main__")
NODES = (*SUBPACKAGES, *TOP_LEVEL)


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in NODES else None


def _node_files(node: str) -> list[Path]:
    return sorted((PACKAGE / node).rglob("*.py")) if node in SUBPACKAGES else [PACKAGE / f"{node}.py"]


def _package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {p: set() for p in NODES}
    for node in NODES:
        for path in _node_files(node):
            for module in _imports(path):
                target = _part(module)
                if target is not None and target != node:
                    graph[node].add(target)
    return graph


def test_every_module_is_a_node_of_the_graph_or_a_front_end() -> None:
    loose = {p.stem for p in PACKAGE.glob("*.py")} - set(TOP_LEVEL) - set(FRONT_ENDS)
    assert not loose, f"top-level modules outside the architecture test: {sorted(loose)}"
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(SUBPACKAGES)


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

    for node in NODES:
        visit(node, [])


def test_dependencies_point_the_documented_way() -> None:
    graph = _package_graph()
    base = {
        "core",
        "errors",
        "config",
        "aio",
        "_version",
    }  # the shared vocabulary, importing nothing above it
    assert graph["quant"] <= base, "quantization schemes and kernels are the bottom level"
    assert graph["wire"] <= base, "the protocol and the client: what both ends of a connection share"
    assert graph["tiers"] <= {"quant", "wire", *base}, "storage tiers know nothing of the pipeline or models"
    assert graph["pipeline"] <= {"quant", "tiers", *base}
    assert graph["services"] <= {"pipeline", "tiers", "quant", "wire", *base}
    assert graph["model"] <= {"pipeline", "tiers", "quant", "assemble", "devices", *base}
    assert graph["serving"] <= {"model", "pipeline", *base}, "serving sits on loaded models"
    assert graph["devices"] <= {"errors"}


def test_among_the_tiers_only_the_remote_one_knows_the_network() -> None:
    talks = sorted(p.name for p in (PACKAGE / "tiers").glob("*.py") if any(".wire" in m for m in _imports(p)))
    assert talks == ["remote.py"]


def test_the_runtime_never_imports_the_lab() -> None:
    """Benchmarks, the trace simulator, Belady, the eval grid and reports live in ``expertflow.lab``; nothing
    but the front ends (the CLI, the demo) reaches into it, not even lazily."""
    graph = _package_graph()
    assert [node for node in NODES if node != "lab" and "lab" in graph[node]] == []


def test_the_bottom_modules_import_nothing_above_them() -> None:
    graph = _package_graph()
    assert graph["errors"] == set() and graph["_version"] == set() and graph["aio"] == set()
    assert graph["config"] <= {"errors"}
    assert graph["core"] <= {"errors"}


def test_core_imports_nothing_of_expertflow_but_its_errors() -> None:
    assert _imports(PACKAGE / "core.py") <= {"expertflow.errors", "expertflow.errors.CheckpointError"}
