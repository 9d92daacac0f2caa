"""pyproject.toml declares every distribution the code imports: at module level in `dependencies`, inside a function
(a lazy import, such as faiss for `redi eval`) in `dependencies` or an extra."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normal(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0))  # type: ignore[union-attr]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level import name, imported at module level) of every absolute import in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name.split(".")[0], id(node) not in nested) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], id(node) not in nested))
    return found


def test_every_imported_distribution_is_declared() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = {_requirement_name(r) for r in project["dependencies"]}
    optional = {_requirement_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    distributions = importlib.metadata.packages_distributions()
    files = sorted((REPO / "redi").rglob("*.py"))
    missing: list[str] = []
    for path in files:
        for name, module_level in _imports(path):
            if name in sys.stdlib_module_names or name == "redi":
                continue
            dists = {_normal(d) for d in distributions.get(name, [])}
            if not dists and not module_level and _normal(name) in optional:
                continue  # a lazy import of an extra this environment did not install (e.g. wandb)
            assert dists, f"{path.relative_to(REPO)} imports {name}, which no installed distribution provides"
            declared = required if module_level else required | optional
            if not dists & declared:
                where = "dependencies" if module_level else "dependencies or an extra"
                missing.append(f"{path.relative_to(REPO)}: {name} ({', '.join(sorted(dists))}) is not in {where}")
    assert not missing, "\n".join(missing)
