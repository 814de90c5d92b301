"""Import layering (issue #18): which project modules may import which, and no import cycles.

The graph is read from the source (AST), not by importing anything, so it sees function-level
imports too — those are real dependencies even when they do not run at import time. Imports under
``if TYPE_CHECKING:`` are left out (they never run). Edges go to the module named, not to its
parent packages.

Layers, lowest first: the base modules ``dynaip.geometry`` (numpy/PIL/scipy/torch only) and
``dynaip.configs`` (the one YAML → dataclass loader: standard library and PyYAML only, so every
layer may use it) and ``dynaip.dataset`` (the dataset as a consumer sees it; its ``format`` module
is standard library only) →
``dynaip.models`` →
``dynaip.adapter`` → ``dynaip.train`` / ``dynaip.inference`` / ``dynaip.eval`` / ``dynaip.serve``;
curation (``pipeline``) uses ``dynaip.models`` and ``dynaip.geometry``, and nothing in ``dynaip``
reaches into curation's stages.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dynaip", "pipeline")

# Known exceptions: (importer, imported) edges left out of the cycle check, each with its reason.
# Keep this list short; a new entry needs a reason a reviewer accepts.
ALLOWED_CYCLE_EDGES = {
    ("dynaip.inference.pipeline", "dynaip.inference.loading"):
        "DynaIPFluxPipeline.from_local/unload are built on load_dynaip/unload_dynaip, which return "
        "and detach a DynaIPFluxPipeline; both imports are function-level, so importing either "
        "module never needs the other half-initialised",
}

GEOMETRY_MAY_IMPORT = {"__future__", "math", "typing", "numpy", "PIL", "scipy", "torch"}
DATASET_FORMAT_MAY_IMPORT = {"__future__", "typing"}
CONFIGS_MAY_IMPORT = {"__future__", "collections", "dataclasses", "difflib", "enum", "pathlib", "types", "typing", "yaml"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(name: str) -> list[tuple[str, int]]:
    """Every module ``name`` imports at run time (top level and inside functions): ``[(module, line)]``.
    ``from a import b`` names ``a.b`` when that is a project module, else ``a``."""
    path = MODULES[name]
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for c in child.orelse:
                    visit_node(c)
                continue
            visit_node(child)

    def visit_node(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                full = f"{mod}.{a.name}"
                found.append((full if full in MODULES else mod, node.lineno))
        visit(node)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def project_edges() -> dict[str, dict[str, int]]:
    """``{importer: {imported project module: first line}}``."""
    edges: dict[str, dict[str, int]] = {}
    for name in MODULES:
        for target, line in imports_of(name):
            if target.split(".")[0] not in PACKAGES:
                continue
            while target not in MODULES and "." in target:  # an attribute of a module, e.g. `import a.b.c` of a non-module
                target = target.rsplit(".", 1)[0]
            if target != name:
                edges.setdefault(name, {}).setdefault(target, line)
    return edges


def _in(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(importers: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{a} imports {b} ({MODULES[a].relative_to(REPO)}:{line})"
            for a, targets in project_edges().items() if _in(a, *importers)
            for b, line in targets.items() if _in(b, *forbidden)]


def test_the_graph_sees_function_level_and_relative_imports():
    edges = project_edges()
    assert "dynaip.inference.inputs" in edges["dynaip.inference.pipeline"]  # `from .inputs import ...`
    assert "dynaip.models.sam" in edges["pipeline.stages.segment"]  # inside SegmentStage.segmenter
    assert "dynaip.inference" not in edges.get("dynaip", {})  # dynaip/__init__: only under TYPE_CHECKING


def test_nothing_in_dynaip_reaches_into_curation_stages():
    assert _violations(("dynaip",), ("pipeline.stages",)) == []


def test_models_and_geometry_sit_below_training_inference_eval_serve_and_curation():
    upper = ("dynaip.train", "dynaip.inference", "dynaip.eval", "dynaip.serve", "pipeline")
    assert _violations(("dynaip.models", "dynaip.geometry"), upper) == []


def test_geometry_depends_on_numpy_pil_scipy_torch_only():
    outside = sorted({m for m, _ in imports_of("dynaip.geometry") if m.split(".")[0] not in GEOMETRY_MAY_IMPORT})
    assert outside == [], f"dynaip.geometry imports {outside}"


def test_configs_loader_depends_on_the_standard_library_and_yaml_only():
    outside = sorted({m for m, _ in imports_of("dynaip.configs") if m.split(".")[0] not in CONFIGS_MAY_IMPORT})
    assert outside == [], f"dynaip.configs imports {outside}"


def test_dataset_format_depends_on_the_standard_library_only():
    outside = sorted({m for m, _ in imports_of("dynaip.dataset.format")
                      if m.split(".")[0] not in DATASET_FORMAT_MAY_IMPORT})
    assert outside == [], f"dynaip.dataset.format imports {outside}"


def test_the_dataset_package_is_the_one_used_by_writer_trainer_precompute_and_browser():
    edges = project_edges()
    users = ("pipeline.writer", "pipeline.cli", "dynaip.train.data", "dynaip.train.preflight",
             "dynaip.features.precompute", "dynaip.features.layout", "dynaip.serve.datasets")
    assert [u for u in users if not any(_in(m, "dynaip.dataset") for m in edges.get(u, {}))] == []
    # the dataset sits below curation and training: it imports neither
    assert _violations(("dynaip.dataset",), ("pipeline", "dynaip.train", "dynaip.features", "dynaip.serve",
                                             "dynaip.inference", "dynaip.eval", "dynaip.models", "dynaip.adapter")) == []


def test_configs_loader_is_used_by_every_config_file_kind():
    """Recipes, training configs, models.yaml and the judge config all load through dynaip.configs."""
    edges = project_edges()
    users = ("pipeline.recipe", "dynaip.train.config", "dynaip.models.config", "dynaip.eval.judge")
    assert [u for u in users if "dynaip.configs" not in edges.get(u, {})] == []


def test_adapter_does_not_import_training_or_inference():
    assert _violations(("dynaip.adapter",), ("dynaip.train", "dynaip.inference")) == []


def find_cycle(edges: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None (iterative DFS, three colours)."""
    colour: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in sorted(edges):
        if colour.get(root):
            continue
        path, stack = [root], [iter(sorted(edges.get(root, {})))]
        colour[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                colour[path.pop()] = 2
                stack.pop()
            elif colour.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not colour.get(nxt):
                colour[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(edges.get(nxt, {}))))
    return None


def test_no_import_cycles_among_project_modules():
    edges = project_edges()
    for a, b in ALLOWED_CYCLE_EDGES:
        assert b in edges.get(a, {}), f"known exception {a} → {b} no longer exists: remove it from ALLOWED_CYCLE_EDGES"
        del edges[a][b]
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " → ".join(
        f"{m} ({MODULES[m].relative_to(REPO)}:{edges[m][n]})" for m, n in zip(cycle, cycle[1:])) + f" → {cycle[-1]}"


def test_find_cycle_reports_the_path():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}}) is None
