"""The layering the README promises, asserted from the modules' own imports (ast, function-level
imports included): command line -> grid -> stages -> core; analysis reads results only.

Pure and fast (no tbr_ray module is imported to build the graph):
    pytest tests/test_layers.py -q
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tbr_ray import benchmarks, judges, vocab
from tbr_ray.keys import content_key

REPO = Path(__file__).resolve().parent.parent
# Core: what every stage may read; it imports no stage and no scheduler.
CORE = {"tbr_ray", "tbr_ray.config", "tbr_ray.models", "tbr_ray.results", "tbr_ray.vocab"}
CORE |= {"tbr_ray.keys", "tbr_ray.prompts", "tbr_ray.labels", "tbr_ray.redact"}
# The run folder's layout, writes and locks: every stage writes through it, so it is core (it
# once imported tbr_ray.preflight for the Ray job id, issue 22 point 9).
CORE |= {"tbr_ray.rundir"}
# Leaves: pure data and helpers that import nothing of tbr_ray at all.
LEAVES = {
    "tbr_ray.vocab",
    "tbr_ray.keys",
    "tbr_ray.prompts",
    "tbr_ray.plan.power",
    "tbr_ray.redact",
}
# What analysis/ may import of tbr_ray: the results schema and reader, the vocabulary, the
# registry, and the judges' labels side by side (pure functions over results frames). Not a
# stage: analysis reads results, it runs nothing (tbr_ray.judges is the judging stage).
ANALYSIS_MAY_IMPORT = {"tbr_ray", "tbr_ray.results", "tbr_ray.vocab", "tbr_ray.models"}
ANALYSIS_MAY_IMPORT |= {"tbr_ray.labels"}
# ... and the paired design's power arithmetic (a leaf: the dry run states it before a run,
# the report applies it to the run's own pairs).
ANALYSIS_MAY_IMPORT |= {"tbr_ray.plan.power"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """Modules of `known` that the file imports anywhere (top level or inside functions)."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # `from pkg import mod` imports pkg.mod when that is a module.
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name}


def import_graph(roots: tuple[str, ...] = ("tbr_ray", "analysis")) -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    files = [p for root in roots for p in sorted((REPO / root).rglob("*.py"))]
    known = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, known) for p in files}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


GRAPH = import_graph()


def test_graph_parser_sees_function_level_and_relative_imports():
    # The parser must see the kinds of import the rules are about, or the rules pass vacuously.
    assert "tbr_ray.data" in GRAPH["tbr_ray.preflight"]  # a function-level import
    assert "tbr_ray.plan" in GRAPH["tbr_ray.train"]
    assert "tbr_ray.plan.cost" in GRAPH["tbr_ray.plan"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_core_imports_no_stage():
    stage_edges = {(m, d) for m in CORE & set(GRAPH) for d in GRAPH[m] if d not in CORE}
    assert stage_edges == set()


def test_leaves_import_nothing_of_tbr_ray():
    assert {m: GRAPH[m] for m in LEAVES if GRAPH[m]} == {}


def test_nothing_imports_in_a_circle():
    assert circles(GRAPH) == []


def test_planner_imports_only_the_core():
    # The plan is pure (README "The plan before the rent"): benchmark sizes, kinds and shots
    # come from the vocabulary, not from the benchmark loaders.
    plan = {m for m in GRAPH if m.startswith("tbr_ray.plan")}
    outside = {(m, d) for m in plan for d in GRAPH[m] if d not in CORE | plan}
    assert outside == set()


def test_analysis_reads_results_only_through_the_results_module():
    reach = {
        (m, d)
        for m, deps in GRAPH.items()
        if m.startswith("analysis")
        for d in deps
        if d.startswith("tbr_ray") and d not in ANALYSIS_MAY_IMPORT
    }
    assert reach == set()


@pytest.mark.parametrize(
    ("registry", "names"),
    [
        (list(judges.RULE_JUDGES), list(vocab.RULE_JUDGE_NAMES)),
        (list(benchmarks.BENCHMARKS), list(vocab.BENCHMARK_KINDS)),
    ],
    ids=["rule-judges", "benchmarks"],
)
def test_stage_registries_are_keyed_by_the_vocabulary(registry, names):
    assert registry == names


def test_benchmark_facts_match_the_vocabulary():
    specs = benchmarks.BENCHMARKS.values()
    assert {s.name: s.kind for s in specs} == vocab.BENCHMARK_KINDS
    assert {s.name: s.max_shots for s in specs if s.max_shots} == vocab.SHOT_POOLS
    assert tuple(benchmarks.USER_FILES) == vocab.USER_FILE_BENCHMARKS
    shipped = {s.name: s.size for s in specs if not s.user_file}
    assert shipped == {n: v for n, v in vocab.BENCHMARK_SIZES.items() if n in shipped}
    assert set(vocab.BENCHMARK_SIZES) == set(benchmarks.BENCHMARKS)
    assert tuple(s.name for s in specs if s.mode == "choice") == vocab.CHOICE_BENCHMARKS
    assert {s.name: s.default_shots for s in specs if s.default_shots} == vocab.DEFAULT_SHOTS


def test_content_key_is_sorted_json_sha256_prefix():
    assert content_key({"b": 1, "a": [1, 2]}) == content_key({"a": [1, 2], "b": 1})
    assert len(content_key({"a": 1}, 12)) == 12
    # The config hash's recipe (compact JSON) keeps run-directory names of earlier runs.
    assert content_key({"a": 1}, 12, compact=True) == "015abd7f5cc5"
    assert content_key({"a": 1}) != content_key({"a": 2})


def test_paper_tables_name_registry_models():
    # analysis.paper's docstring promises the published tables use the registry's names.
    from analysis.paper import paper_table1, paper_table3
    from tbr_ray.models import CHAT_MODELS, PAPER_MODELS

    assert set(paper_table1()["model"]) == set(CHAT_MODELS)
    assert set(paper_table3()["model"]) == set(PAPER_MODELS)
