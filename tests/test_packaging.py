"""The sdist and wheel build, pass ``twine check``, and hold exactly the package and its metadata.

The build runs once per session, on a copy of the working tree (so it leaves no ``build/`` or
``*.egg-info`` behind), with ``python -m build --no-isolation``: the venv's setuptools builds it
and nothing is downloaded.
"""

import email.parser
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.message import Message
from pathlib import Path

import pytest

import sae_losses

ROOT = Path(__file__).resolve().parent.parent
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "out", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)
WHEEL_FILES = re.compile(
    r"sae_losses/[A-Za-z_][A-Za-z0-9_]*\.py"  # the package's modules
    r"|sae_losses/py\.typed"  # the typing marker
    r"|sae_losses-[^/]+\.dist-info/.+"  # the metadata
)
CLASSIFIERS = {
    "Programming Language :: Python :: 3.10",
    "Programming Language :: Python :: 3.11",
    "Programming Language :: Python :: 3.12",
    "Programming Language :: Python :: 3.13",
    "Typing :: Typed",
    "Topic :: Scientific/Engineering :: Artificial Intelligence",
}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build the sdist, then the wheel from it, as ``python -m build`` does by default."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    out = tmp / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def wheel_metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(archive.read(name).decode())


def test_twine_check_passes_on_both(dist: dict[str, Path]) -> None:
    files = [str(path) for path in dist.values()]
    result = subprocess.run(
        [sys.executable, "-m", "twine", "--no-color", "check", "--strict", *files],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "1000"},  # twine wraps its lines at the terminal width
    )
    assert result.returncode == 0, result.stdout + result.stderr
    output = "".join(result.stdout.split())  # in case it wrapped anyway (no spaces in the paths)
    for file in files:
        assert f"Checking{file}:PASSED" in output, result.stdout


def test_wheel_holds_exactly_the_package_and_metadata(dist: dict[str, Path]) -> None:
    names = wheel_names(dist["wheel"])
    assert [n for n in names if not WHEEL_FILES.fullmatch(n)] == []
    modules = {f"sae_losses/{p.name}" for p in (ROOT / "sae_losses").glob("*.py")}
    assert modules <= set(names), modules - set(names)
    assert not any(n.startswith(("tests/", "benchmarks/", "examples/", "docs/")) for n in names)


def test_wheel_ships_py_typed_and_license(dist: dict[str, Path]) -> None:
    names = wheel_names(dist["wheel"])
    assert "sae_losses/py.typed" in names
    assert any(re.fullmatch(r"sae_losses-[^/]+\.dist-info/licenses/LICENSE", n) for n in names)


def test_metadata_license_classifiers_and_version(dist: dict[str, Path]) -> None:
    metadata = wheel_metadata(dist["wheel"])
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    classifiers = set(metadata.get_all("Classifier") or [])
    assert classifiers >= CLASSIFIERS, CLASSIFIERS - classifiers
    # PEP 639: a License-Expression replaces the license classifiers (setuptools rejects both).
    assert not [c for c in classifiers if c.startswith("License ::")]
    assert "sparse autoencoder" in metadata["Summary"]
    assert "sparse autoencoder" in metadata["Keywords"].split(",")
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert any(r.startswith("torch>=") for r in metadata.get_all("Requires-Dist") or [])
    # One version, written once in pyproject.toml: the built metadata, the installed metadata and
    # sae_losses.__version__ all read it.
    assert metadata["Version"] == sae_losses.__version__
    assert importlib.metadata.version("sae_losses") == sae_losses.__version__


def test_sdist_holds_the_package_license_and_no_tests(dist: dict[str, Path]) -> None:
    with tarfile.open(dist["sdist"]) as archive:
        names = [n.split("/", 1)[1] for n in archive.getnames() if "/" in n]
    assert {"LICENSE", "README.md", "pyproject.toml", "PKG-INFO", "sae_losses/py.typed"} <= set(
        names
    )
    assert not any(n.startswith(("tests/", "benchmarks/", "examples/", ".venv/")) for n in names)


def test_installed_wheel_reports_its_own_version(dist: dict[str, Path], tmp_path: Path) -> None:
    """Installed from the wheel (not this checkout), the package finds its version and marker."""
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
    subprocess.run(
        [*pip, "--target", str(target), str(dist["wheel"])],
        check=True,
        timeout=120,
    )
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import sae_losses, pathlib; "
        "print(sae_losses.__file__); print(sae_losses.__version__); "
        "print((pathlib.Path(sae_losses.__file__).parent / 'py.typed').is_file())"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(target)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    file, version, typed = result.stdout.split()
    assert Path(file).is_relative_to(target)
    assert version == wheel_metadata(dist["wheel"])["Version"]
    assert typed == "True"
