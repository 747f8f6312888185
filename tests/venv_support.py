"""Fresh virtual environments for the install tests: made, filled by pip and run without the
checkout on the path, so they test what a user's `pip install` gives."""

from __future__ import annotations

import json
import os
import subprocess
import venv
from pathlib import Path

import pytest


def clean_environment() -> dict[str, str]:
    """This process's environment without anything that would put the checkout on the path."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def fresh_venv(folder: Path, *requirements: str, what: str, no_deps: bool = False) -> Path:
    """A venv in `folder` with `requirements` installed by pip; its python. Skips (naming
    `what`) when pip cannot install them here, e.g. with no package index."""
    venv.EnvBuilder(with_pip=True).create(folder)
    python = folder / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", *(["--no-deps"] * no_deps), *requirements],
        capture_output=True,
        text=True,
        timeout=900,
        env=clean_environment(),
    )
    if install.returncode != 0:
        pytest.skip(f"cannot install {what} here: {install.stderr.strip()[-300:]}")
    return python


def installed_packages(python: Path) -> set[str]:
    """The lower-cased names of the packages in `python`'s environment."""
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
        env=clean_environment(),
    )
    return {package["name"].lower() for package in json.loads(listed.stdout)}
