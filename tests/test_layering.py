"""Import layering (issues #18, #25): which project modules may import which, no import cycles, no
long files.

The graph is read from the source (AST), not by importing anything, so it sees function-level
imports too — those are real dependencies even when they do not run at import time. Imports under
``if TYPE_CHECKING:`` are left out of the layer rules (they never run) but count for cycles. Edges go
to the module named, not to its parent packages.

Layers, lowest first (``LAYERS``; docs/ARCHITECTURE.md, "Layers"): a module imports its own layer
and those below, never one above:

0. base: ``dynaip.geometry`` (numpy/PIL/scipy/torch only), ``dynaip.configs`` (the one YAML →
   dataclass loader: standard library and PyYAML only), ``dynaip.atomic``, ``dynaip.console``,
   ``dynaip.progress`` (driver-side progress lines), ``dynaip.dataset.format`` (standard library only);
1. ``dynaip.dataset`` (the dataset as a consumer sees it), ``dynaip.cluster`` (Ray access),
   ``dynaip.run_lock`` (one run per output directory), ``dynaip.models``;
2. ``dynaip.adapter``; the benchmark readers and scorers of ``dynaip.eval`` (``BENCHMARK_MODULES``);
3. curation (``pipeline``), training (``dynaip.train``, ``dynaip.features``), ``dynaip.inference``;
   side by side: nothing in ``dynaip`` but the entry points imports ``pipeline``, curation imports
   none of the others, inference neither training nor curation;
4. ``dynaip.eval``, ``dynaip.serve``;
5. entry points: the ``dynaip`` package's lazy exports, ``dynaip.cli``, ``dynaip.demo``.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dynaip", "pipeline")

GEOMETRY_MAY_IMPORT = {"__future__", "math", "typing", "numpy", "PIL", "scipy", "torch"}
DATASET_FORMAT_MAY_IMPORT = {"__future__", "re", "typing"}
CONFIGS_MAY_IMPORT = {
    "__future__",
    "collections",
    "dataclasses",
    "difflib",
    "enum",
    "pathlib",
    "types",
    "typing",
    "yaml",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


@functools.cache  # every test walks the same graph: parse each file once
def imports_of(name: str, type_checking: bool = False) -> list[tuple[str, int]]:
    """Every module ``name`` imports at run time (top level and inside functions): ``[(module, line)]``;
    with ``type_checking`` also those under ``if TYPE_CHECKING:``. ``from a import b`` names ``a.b``
    when that is a project module, else ``a``."""
    path = MODULES[name]
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child) and not type_checking:
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
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                full = f"{mod}.{a.name}"
                found.append((full if full in MODULES else mod, node.lineno))
        visit(node)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def project_edges(type_checking: bool = False) -> dict[str, dict[str, int]]:
    """``{importer: {imported project module: first line}}`` (``type_checking``: see ``imports_of``)."""
    edges: dict[str, dict[str, int]] = {}
    for name in MODULES:
        for target, line in imports_of(name, type_checking):
            if target.split(".")[0] not in PACKAGES:
                continue
            while (
                target not in MODULES and "." in target
            ):  # an attribute of a module, e.g. `import a.b.c` of a non-module
                target = target.rsplit(".", 1)[0]
            if target != name:
                edges.setdefault(name, {}).setdefault(target, line)
    return edges


def _in(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(importers: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{a} imports {b} ({MODULES[a].relative_to(REPO)}:{line})"
        for a, targets in project_edges().items()
        if _in(a, *importers)
        for b, line in targets.items()
        if _in(b, *forbidden)
    ]


BENCHMARK_MODULES = tuple(
    f"dynaip.eval.{m}" for m in ("cases", "bench_single", "bench_multi", "metrics", "judge", "judge_http", "score")
)
"""The benchmark readers and scorers of ``dynaip.eval`` (no model pipeline): training's fidelity evaluation
(dynaip/train/fidelity.py) reads cases and scores images with them."""
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "base",
        (
            "dynaip.geometry",
            "dynaip.configs",
            "dynaip.atomic",
            "dynaip.console",
            "dynaip.progress",
            "dynaip.dataset.format",
        ),
    ),
    ("dataset, cluster, models", ("dynaip.dataset", "dynaip.cluster", "dynaip.run_lock", "dynaip.models")),
    ("adapter, benchmark cases and scorers", ("dynaip.adapter", *BENCHMARK_MODULES)),
    ("curation, training, inference", ("pipeline", "dynaip.train", "dynaip.features", "dynaip.inference")),
    ("eval, serve", ("dynaip.eval", "dynaip.serve")),
    ("entry points", ("dynaip.cli", "dynaip.demo")),
]
ENTRY_POINTS = ("dynaip.cli", "dynaip.demo")
MAX_LINES = 750  # lines as `ruff format` writes them (one argument per line when a call is long): the 600 of the denser hand style before


def layer_of(module: str) -> int:
    """Index in ``LAYERS`` of the longest prefix naming ``module``; the package ``dynaip`` itself (its
    lazy exports) is an entry point."""
    if module == "dynaip":
        return len(LAYERS) - 1
    best, found = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if _in(module, p) and len(p) > best:
                best, found = len(p), i
    assert found is not None, f'{module} is in no layer: add it to LAYERS (and docs/ARCHITECTURE.md, "Layers")'
    return found


def test_every_module_sits_in_a_layer_and_imports_none_above_it():
    upward = [
        f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]}) ({MODULES[a].relative_to(REPO)}:{line})"
        for a, targets in project_edges().items()
        for b, line in targets.items()
        if layer_of(b) > layer_of(a)
    ]
    assert upward == []


def test_layer_of_takes_the_longest_prefix():
    assert [
        layer_of(m)
        for m in (
            "dynaip.dataset.format",
            "dynaip.dataset.inspect",
            "pipeline.sources.opens2v.cross",
            "dynaip",
            "dynaip.cli",
        )
    ] == [0, 1, 3, 5, 5]


def test_only_the_entry_points_import_curation():
    """The dataset, Ray access and the models sit below curation: training, precompute, inference, eval
    and serve never need ``pipeline``."""
    below = tuple(m for m in MODULES if _in(m, "dynaip") and m != "dynaip" and not _in(m, *ENTRY_POINTS))
    assert "dynaip.train.data" in below and "dynaip.cli" not in below
    assert _violations(below, ("pipeline",)) == []


def test_curation_and_inference_stay_out_of_their_neighbours():
    assert _violations(("pipeline",), ("dynaip.train", "dynaip.features", "dynaip.inference")) == []
    assert _violations(("dynaip.inference",), ("dynaip.train", "dynaip.features", "pipeline")) == []


def test_the_rules_catch_a_violation():
    """The checks above are not vacuous: the real graph has the edges they look at."""
    edges = project_edges()
    assert "pipeline.cli" in edges["dynaip.cli"] and layer_of("dynaip.cli") > layer_of("pipeline.cli")
    assert any(_in(b, "dynaip.dataset") for b in edges["pipeline.writer"])


def test_no_file_over_750_lines_in_dynaip_or_pipeline():
    long = {str(p.relative_to(REPO)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these along their seams (docs/ARCHITECTURE.md): {long}"


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
    outside = sorted(
        {m for m, _ in imports_of("dynaip.dataset.format") if m.split(".")[0] not in DATASET_FORMAT_MAY_IMPORT}
    )
    assert outside == [], f"dynaip.dataset.format imports {outside}"


def test_the_dataset_package_is_the_one_used_by_writer_trainer_precompute_and_browser():
    edges = project_edges()
    users = (
        "pipeline.writer",
        "pipeline.cli",
        "dynaip.train.data",
        "dynaip.train.preflight",
        "dynaip.features.precompute",
        "dynaip.features.layout",
        "dynaip.serve.datasets",
    )
    assert [u for u in users if not any(_in(m, "dynaip.dataset") for m in edges.get(u, {}))] == []
    # the dataset sits below curation and training: it imports neither
    assert (
        _violations(
            ("dynaip.dataset",),
            (
                "pipeline",
                "dynaip.train",
                "dynaip.features",
                "dynaip.serve",
                "dynaip.inference",
                "dynaip.eval",
                "dynaip.models",
                "dynaip.adapter",
            ),
        )
        == []
    )


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
                return path[path.index(nxt) :] + [nxt]
            elif not colour.get(nxt):
                colour[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(edges.get(nxt, {}))))
    return None


def test_no_import_cycles_among_project_modules():
    """None at all: function-level imports and imports only for type checking count too."""
    edges = project_edges(type_checking=True)
    cycle = find_cycle(edges)
    assert cycle is None, (
        "import cycle: "
        + " → ".join(f"{m} ({MODULES[m].relative_to(REPO)}:{edges[m][n]})" for m, n in zip(cycle, cycle[1:]))
        + f" → {cycle[-1]}"
    )


def test_find_cycle_reports_the_path():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}}) is None
