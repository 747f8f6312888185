"""Running kiln in tests: in-process through click or main(), or as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from click.testing import CliRunner, Result

from modelkiln.cli import cli

# Wide enough that rich never wraps a tmp path or a profile name inside a table cell.
WIDE = {"COLUMNS": "1000"}


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def invoke(*args: object) -> Result:
    """The click group in-process: a KilnError ends up in result.exception, exit code 1."""
    return CliRunner(env=WIDE).invoke(cli, [str(a) for a in args])


def kiln(*args: object) -> Outcome:
    """A real `python -m modelkiln` process."""
    done = subprocess.run(
        [sys.executable, "-m", "modelkiln", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **WIDE},
        check=False,
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


def assert_one_line_error(outcome: Outcome, *fragments: str, progress: bool = False) -> str:
    """Exit 1, no traceback, and stderr is one `error:` line (after progress lines if allowed)."""
    assert outcome.code == 1, outcome.err
    assert "Traceback" not in outcome.err
    lines = outcome.err_lines
    assert lines and lines[-1].startswith("error: "), outcome.err
    others = lines[:-1]
    assert not others or (progress and all(line.startswith("✓ ") for line in others)), outcome.err
    line = lines[-1]
    for fragment in fragments:
        assert fragment in line, line
    return line
