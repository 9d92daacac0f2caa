"""The installed package, as a cluster user gets it: a wheel (not editable) in a fresh virtual environment puts one
import name, `redi`, at the top of site-packages, and its command and version work."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLEAN = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the venv alone decides what `redi` is


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only our wheel; its dependencies are read from this environment's site-packages through
    a .pth line (installing torch again would take minutes), after the venv's own site-packages."""
    root = tmp_path_factory.mktemp("package")
    source = root / "source"  # a copy, so the build's build/ and *.egg-info never land in the checkout
    shutil.copytree(REPO / "redi", source / "redi", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)],
                   check=True, capture_output=True, cwd=root, env=CLEAN)
    env = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", *map(str, (root / "dist").glob("*.whl"))],
                   check=True, capture_output=True, cwd=root, env=CLEAN)  # (a redi.egg-info on PYTHONPATH: "installed")
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env


def _top_level(env: Path) -> set[str]:
    site = next((env / "lib").glob("python*/site-packages"))
    return {p.name for p in site.iterdir() if p.name not in ("zz_dependencies.pth", "__pycache__")}


def test_the_wheel_installs_one_import_name(installed: Path) -> None:
    from redi import __version__

    assert _top_level(installed) == {"redi", f"redi-{__version__}.dist-info"}


def test_the_installed_command_and_module_report_the_version(installed: Path, tmp_path: Path) -> None:
    from redi import __version__

    command = subprocess.run([str(installed / "bin" / "redi"), "--version"], capture_output=True, text=True,
                             cwd=tmp_path, env=CLEAN, check=True)
    assert command.stdout == f"redi {__version__}\n"
    code = "import redi, redi.cli; print(redi.__version__, redi.cli.__file__)"
    module = subprocess.run([str(installed / "bin" / "python"), "-c", code], capture_output=True, text=True,
                            cwd=tmp_path, env=CLEAN, check=True)
    version, where = module.stdout.split()
    assert version == __version__ and Path(where).is_relative_to(installed)  # the wheel's code, not the checkout's
