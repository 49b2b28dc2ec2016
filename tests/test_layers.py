"""The package layering docs/architecture.md promises, checked on the source: no import cycle among acf's modules
(imports inside functions count: a lazy import only hides a cycle), no private (`_name`) name imported from
another module, and the packages in one order: a package imports only packages below it (`LAYERS`), lazy imports
included. Pure AST reading, no imports executed."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> list[tuple[str, list[str]]]:
    """(imported acf module, names taken from it) for every import statement in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("acf")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("acf"):
                continue
            names = [a.name for a in node.names]
            # `from . import pipeline` imports the module acf.coordinator.pipeline
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules]
            out += [(s, []) for s in subs] + [(mod, [n for n in names if f"{mod}.{n}" not in modules])]
    return out


#: acf's packages from the bottom up; a package imports only packages in lower rows (packages in one row are peers
#: and do not import each other). `acf` is the root package (`__version__`).
LAYERS: list[set[str]] = [
    {"acf"},
    {"core"},          # errors, atomic files, provenance, intervals, instruments: nothing of models or tasks
    {"models"},        # resolving and loading models, shapes, the tokenization rule, the GGUF file format
    {"tasks"},         # items, prompts, answers
    {"evaluation"},    # measuring a model on a task: quality, fidelity, cost; the baseline sanity check
    {"methods"},       # compression methods and running a strategy's steps
    {"search"},        # the search space, recipes, surrogate, aim, pareto, reward
    {"planner"},       # the optional LLM planner
    {"coordinator"},   # one run: the episode engine, the graph, the study
    {"distributed", "reports"},  # workers on one shared study; reports over a run's files
    {"lifecycle"},     # registry, adapter loop, extraction, export (reads reports' markdown, the frontier file)
    {"cli"},
]

#: imports that still go up, each with why; the list may only shrink (`test_known_upward_imports_still_exist`)
KNOWN_UPWARD: set[tuple[str, str]] = {
    # a task's own metrics call evaluation's engines (generation, multiple choice scoring, the sandbox)
    ("acf.tasks.bbh", "acf.evaluation.quality"),
    ("acf.tasks.bbh", "acf.evaluation.multiple_choice"),
    ("acf.tasks.humaneval", "acf.evaluation.sandbox"),
    ("acf.tasks.humaneval", "acf.evaluation.generate"),
    ("acf.tasks.mc", "acf.evaluation.multiple_choice"),
    ("acf.tasks.truthfulqa", "acf.evaluation.multiple_choice"),
    # the frontier file's schema (state) and the agent cards (subagents) live in coordinator, above the planner that
    # reads them; they import nothing of coordinator and could move below the planner
    ("acf.planner.core", "acf.coordinator.state"),
    ("acf.planner.prompt", "acf.coordinator.subagents"),
}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _rank(package: str) -> int:
    return next(i for i, row in enumerate(LAYERS) if package in row)


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    files = sorted((SRC / "acf").rglob("*.py"))
    modules = {_module_name(f) for f in files}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for f in files:
        me = _module_name(f)
        for mod, names in _imports(f, modules):
            if mod in modules and mod != me:
                edges[me].add(mod)
            private += [f"{me} imports {mod}.{n}" for n in names if n.startswith("_") and n != "__version__"
                        and mod != me]
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _without_package_inits(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ re-exporting its modules, imported by those modules' siblings through the package
    name, is not a cycle between modules: edges into a package are redirected to nothing it re-exports."""
    packages = {m for m in edges if (SRC / Path(*m.split(".")) / "__init__.py").is_file()}
    return {m: ({w for w in ws if w not in packages or not m.startswith(w + ".")}
                if m not in packages else ws) for m, ws in edges.items()}


def test_no_import_cycle():
    edges, _ = _graph()
    assert _cycles(_without_package_inits(edges)) == []


def test_no_private_name_crosses_modules():
    _, private = _graph()
    assert private == []


def test_the_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _upward(edges: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(m, w) for m, ws in edges.items() for w in ws
            if _package(m) != _package(w) and _rank(_package(w)) >= _rank(_package(m))}


def test_every_package_has_a_layer():
    packages = {_package(m) for m in _graph()[0]}
    assert packages - set().union(*LAYERS) == set()
    assert set().union(*LAYERS) - packages == set()


def test_packages_import_only_downward():
    """A package imports only the packages below it in `LAYERS`, lazy imports included."""
    edges, _ = _graph()
    assert sorted(_upward(edges) - KNOWN_UPWARD) == []


def test_known_upward_imports_still_exist():
    """An exception that is gone (the import moved or goes down now) leaves the list."""
    edges, _ = _graph()
    assert sorted(KNOWN_UPWARD - _upward(edges)) == []


def test_the_checker_finds_an_upward_import():
    assert _upward({"acf.models.x": {"acf.methods.y", "acf.core.z"}, "acf.cli.a": {"acf.models.x"},
                    "acf.distributed.b": {"acf.reports.c"}}) == {("acf.models.x", "acf.methods.y"),
                                                                  ("acf.distributed.b", "acf.reports.c")}


#: the packages whose every module must import without torch: commands (`acf --help`, `acf report`), the notebook's
#: frames and the coordinator start in about a second; their function-local imports are what keeps it so (below
#: `evaluation`, a function-local import keeps torch or another heavy library out of an otherwise light module)
LIGHT = ("cli", "coordinator", "distributed", "planner", "search", "reports", "lifecycle")


def test_upper_packages_import_without_torch():
    """Every module of LIGHT imported in one fresh interpreter leaves torch unimported: the function-local imports
    there are checked to do their job, not only said to."""
    import os
    import subprocess
    import sys

    mods = sorted(m for m in _graph()[0] if _package(m) in LIGHT and not m.endswith("__main__"))
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "heavy = [n for n in ('torch', 'transformers', 'llmcompressor') if n in sys.modules]\n"
            "print(','.join(heavy))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(SRC)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(mods) > 50 and r.stdout.strip() == "", f"imported at module level: {r.stdout.strip()}"
