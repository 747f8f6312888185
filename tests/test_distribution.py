"""What users install: the wheel and sdist `python -m build` makes (modelkiln is not on the
package index), and a fresh virtual environment with `pip install "WHEEL[onnxruntime]"` where
`kiln` runs from the installed package alone, not from this checkout."""

from __future__ import annotations

import configparser
import json
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_support import Outcome
from venv_support import clean_environment, fresh_venv, installed_packages

import modelkiln

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
VERSION = modelkiln.__version__
DIST_INFO = f"modelkiln-{VERSION}.dist-info"
# What an sdist may hold at its top: the rest of a checkout (bench scripts, CI files, .venv,
# artifacts/, caches) has no place in it.
SDIST_TOP = {
    "PKG-INFO",
    "pyproject.toml",
    ".gitignore",
    "README.md",
    "LICENSE",
    "CONTRIBUTING.md",
    "constraints.txt",
    "modelkiln",
    "profiles",
    "tests",
    "docs",
}
JUNK = {"__pycache__", ".venv", "artifacts", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
# pip's words when the package index cannot be reached (or lacks a package).
UNREACHABLE = (
    "No matching distribution found",
    "Could not find a version",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
)


def wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def sdist_names(sdist: Path) -> set[str]:
    """The sdist's files, without its modelkiln-VERSION/ folder."""
    with tarfile.open(sdist) as archive:
        return {
            member.name.split("/", 1)[1]
            for member in archive.getmembers()
            if member.isfile() and "/" in member.name
        }


def package_files() -> set[str]:
    """Every file of the package in this checkout, as the wheel names it."""
    return {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "modelkiln").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def bundled_profiles() -> list[str]:
    return sorted(path.name for path in (ROOT / "profiles").glob("*.toml"))


def test_the_wheel_carries_the_package_its_data_and_the_kiln_command(
    distributions: tuple[Path, Path],
) -> None:
    wheel, _ = distributions
    assert wheel.name == f"modelkiln-{VERSION}-py3-none-any.whl"
    names = wheel_names(wheel)
    # Every module and data file (the bench report schema), and the bundled profiles where
    # modelkiln.profiles looks for them in an installed package.
    expected = package_files() | {f"modelkiln/_profiles/{name}" for name in bundled_profiles()}
    assert "modelkiln/bench/report.schema.json" in expected
    assert len(bundled_profiles()) > 10
    assert sorted(expected - names) == []
    # Nothing else: no tests, no caches, no profiles/ beside the package.
    assert {name.split("/")[0] for name in names} == {"modelkiln", DIST_INFO}
    assert not [name for name in names if JUNK & set(name.split("/"))]
    with zipfile.ZipFile(wheel) as archive:
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(f"{DIST_INFO}/entry_points.txt").decode())
        metadata = archive.read(f"{DIST_INFO}/METADATA").decode()
    assert dict(entry_points["console_scripts"]) == {"kiln": "modelkiln.cli:main"}
    assert f"\nVersion: {VERSION}\n" in metadata
    assert "\nProvides-Extra: onnxruntime\n" in metadata


def test_the_sdist_holds_what_rebuilding_needs_and_nothing_of_the_checkout(
    distributions: tuple[Path, Path],
) -> None:
    _, sdist = distributions
    assert sdist.name == f"modelkiln-{VERSION}.tar.gz"
    names = sdist_names(sdist)
    assert {"pyproject.toml", "README.md", "constraints.txt", "PKG-INFO"} <= names
    if (ROOT / "LICENSE").is_file():
        assert "LICENSE" in names
    assert sorted(package_files() - names) == []
    assert sorted({f"profiles/{name}" for name in bundled_profiles()} - names) == []
    assert {name.split("/")[0] for name in names} <= SDIST_TOP
    assert not [name for name in names if JUNK & set(name.split("/"))]


def test_pip_builds_the_same_wheel_from_the_sdist(
    distributions: tuple[Path, Path], tmp_path: Path
) -> None:
    """What `pip install modelkiln-VERSION.tar.gz` does first (pip's build, not PyPA build's)."""
    wheel, sdist = distributions
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", tmp_path, sdist],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    if done.returncode != 0 and any(words in done.stderr for words in UNREACHABLE):
        pytest.skip(f"cannot install the build backend here: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr
    assert wheel_names(tmp_path / wheel.name) == wheel_names(wheel)


# --- a fresh venv with the wheel and its onnxruntime extra ------------------------------------


@pytest.fixture(scope="module")
def installed(distributions: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin folder of a venv made with `pip install "WHEEL[onnxruntime]"`, nothing else."""
    wheel, _ = distributions
    python = fresh_venv(
        tmp_path_factory.mktemp("wheel-venv"), f"{wheel}[onnxruntime]", what=wheel.name
    )
    packages = installed_packages(python)
    assert {"modelkiln", "onnxruntime", "numpy", "pillow", "click", "rich"} <= packages
    assert not packages & {"torch", "transformers", "diffusers", "onnx", "openvino", "scipy"}
    return python.parent


def run_installed(installed: Path, cwd: Path, *args: object) -> subprocess.CompletedProcess[str]:
    """A command of the venv, run outside the checkout (so `import modelkiln` can't find it)."""
    done = subprocess.run(
        [str(installed / str(args[0])), *map(str, args[1:])],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=clean_environment(),
    )
    assert done.returncode == 0, (args, done.stderr)
    return done


def test_the_installed_package_is_the_wheel_with_its_bundled_profiles(
    installed: Path, tmp_path: Path
) -> None:
    done = run_installed(
        installed,
        tmp_path,
        "python",
        "-c",
        "import json, modelkiln, modelkiln.profiles as p; print(json.dumps("
        "[modelkiln.__file__, modelkiln.__version__, str(p.bundled_profiles_dir())]))",
    )
    module, version, profiles = json.loads(done.stdout)
    site = installed.parent / "lib"
    assert Path(module).is_relative_to(site)
    assert version == VERSION
    assert Path(profiles).is_relative_to(site)
    assert Path(profiles).name == "_profiles"
    assert sorted(p.name for p in Path(profiles).glob("*.toml")) == bundled_profiles()


def test_kiln_version(installed: Path, tmp_path: Path) -> None:
    done = run_installed(installed, tmp_path, "kiln", "--version")
    assert done.stdout.strip() == f"kiln, version {VERSION}"


def test_kiln_profiles_list_reads_the_profiles_in_the_wheel(
    installed: Path, tmp_path: Path, kiln_main: Callable[..., Outcome]
) -> None:
    args = ("profiles", "list", "vit", "onnxruntime", "--json")
    listed = json.loads(run_installed(installed, tmp_path, "kiln", *args).stdout)
    assert listed
    assert "vit-onnxruntime-fp32" in {profile["name"] for profile in listed}
    assert listed == json.loads(kiln_main(*args).out)


@pytest.mark.torch
@pytest.mark.onnxruntime
def test_kiln_classify_gives_the_predictions_of_this_environment(
    installed: Path,
    tmp_path: Path,
    built: Callable[..., Path],
    kiln_main: Callable[..., Outcome],
) -> None:
    from PIL import Image

    artifact = built("hf-classifier", "vit-onnxruntime-fp32")
    image = tmp_path / "image.png"
    Image.new("RGB", (50, 40), (60, 120, 200)).save(image)
    args = ("classify", artifact, image, "--top-k", "1000", "--json")
    made = json.loads(run_installed(installed, tmp_path, "kiln", *args).stdout)
    expected = json.loads(kiln_main(*args).out)
    assert [entry["image"] for entry in made] == [entry["image"] for entry in expected]
    for got, want in zip(made, expected, strict=True):
        scores = {p["index"]: (p["label"], p["score"]) for p in got["predictions"]}
        wanted = {p["index"]: (p["label"], p["score"]) for p in want["predictions"]}
        assert len(scores) > 1
        assert scores.keys() == wanted.keys()
        for index, (label, score) in wanted.items():
            assert scores[index][0] == label
            assert scores[index][1] == pytest.approx(score, abs=1e-5)
