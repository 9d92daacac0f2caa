"""DESIGN's direction of imports: sampler/ imports the network from trainer/, never the other way round."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "redi"


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    return {name.split(".")[1] for name in names if name.startswith("redi.")}  # our packages: redi.X


def test_trainer_never_imports_sampler() -> None:
    offenders = sorted(p.name for p in (ROOT / "trainer").glob("*.py") if "sampler" in imported_packages(p))
    assert offenders == []


def test_common_imports_no_package_of_ours() -> None:
    ours = {"pipeline", "trainer", "sampler", "benchmarks", "cli"}
    offenders = sorted(p.name for p in (ROOT / "common").glob("*.py") if imported_packages(p) & ours)
    assert offenders == []


def module_name(path: Path) -> str:
    """redi/sampler/sample.py → redi.sampler.sample; a package's __init__.py → the package."""
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each of our modules → the modules of ours it imports anywhere in the file: at the top, inside a function (a lazy
    import) or under TYPE_CHECKING; `from redi.x import y` counts as redi.x and, where y is a module, redi.x.y."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: each set of modules that reach one another (strongly connected, more than one module)."""
    reach = {m: set() for m in graph}
    for start in graph:
        todo = list(graph[start])
        while todo:
            m = todo.pop()
            if m not in reach[start]:
                reach[start].add(m)
                todo += graph[m]
    circles = {frozenset([m, *(o for o in reach[m] if m in reach[o])]) for m in graph if m in reach[m]}
    return sorted(sorted(c) for c in circles)


def test_the_import_graph_check_finds_a_circle_through_a_lazy_import() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_our_modules() -> None:
    """Each package reads as layers: a module imports only modules below it, lazily or not."""
    graph = import_graph()
    assert "redi.trainer.train" in graph["redi.cli"]  # the CLI imports the loop inside its command: a lazy import counts
    assert cycles(graph) == []


def test_pipeline_imports_nothing_above_it() -> None:
    """pipeline/ (the data layer) imports common/ and itself only: `redi info`, which reads runs too, is redi/info.py."""
    graph = import_graph()
    above = {m: sorted(i for i in imported if i.startswith(("redi.trainer", "redi.sampler", "redi.benchmarks", "redi.cli",
                                                             "redi.info")))
             for m, imported in graph.items() if m.startswith("redi.pipeline")}
    assert {m: i for m, i in above.items() if i} == {}
