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
