"""Running kiln in tests: in-process through click or main(), or as a real process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from click.testing import CliRunner, Result

from modelkiln.cli import GLOBAL_FLAGS, cli
from modelkiln.cli.exit_codes import USER_ERROR

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


def parse_command_line(words: list[str]) -> click.Context:
    """`kiln ...` as the CLI parses it, subcommands of groups included, without running it:
    an unknown command or option raises (README and CI recipe lines are checked this way)."""
    assert words[0] == "kiln", words
    args = [word for word in words[1:] if word not in GLOBAL_FLAGS]
    command: click.Command = cli
    while isinstance(command, click.Group):
        name, args = args[0], args[1:]
        found = command.commands.get(name)
        assert found is not None, f"kiln has no command {name!r}: {words}"
        command = found
    return command.make_context(command.name, args)


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
    """Exit 2 (the user can fix it), no traceback, and stderr is one `error:` line (after
    progress lines if allowed)."""
    assert outcome.code == USER_ERROR, outcome.err
    assert "Traceback" not in outcome.err
    lines = outcome.err_lines
    assert lines and lines[-1].startswith("error: "), outcome.err
    others = lines[:-1]
    # Progress lines: steps done (✓), and the steps the error ended (✗).
    steps_only = all(line.startswith(("✓ ", "✗ ")) for line in others)
    assert not others or (progress and steps_only), outcome.err
    line = lines[-1]
    for fragment in fragments:
        assert fragment in line, line
    return line


# --- --json and docs/cli.md ---------------------------------------------------------------

CLI_DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def documented_fields() -> dict[str, list[str]]:
    """Each `### \\`kiln COMMAND\\`` section of docs/cli.md -> the fields its table lists."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in CLI_DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            heading = re.fullmatch(r"### `kiln (.+)`", line)
            current = sections.setdefault(heading[1], []) if heading else None
        elif current is not None and (row := re.match(r"\| `([^`]+)` \|", line)):
            current.append(row[1])
    return sections


def missing_fields(document: Any, fields: list[str]) -> list[str]:
    """The fields (`a.b`, `a[].b`: every item of list a, `a{}.b`: every value of object a)
    that `document`, or an item of it when it is a list, lacks."""
    items = document if isinstance(document, list) else [document]
    return [field for field in fields if not all(_has(item, field.split(".")) for item in items)]


def _has(node: Any, parts: list[str]) -> bool:
    if not parts:
        return True
    part, rest = parts[0], parts[1:]
    name = part.removesuffix("[]").removesuffix("{}")
    if not isinstance(node, dict) or name not in node:
        return False
    value = node[name]
    if part.endswith("[]"):
        return isinstance(value, list) and all(_has(item, rest) for item in value)
    if part.endswith("{}"):
        return isinstance(value, dict) and all(_has(item, rest) for item in value.values())
    return _has(value, rest)


def kiln_json(section: str, *args: object, code: int = 0) -> Any:
    """Run `kiln *args --json` in-process: exit `code`, stdout one JSON document holding every
    field that docs/cli.md lists for `section` (e.g. "profiles list")."""
    return json_result(section, *args, code=code)[0]


def json_result(section: str, *args: object, code: int = 0) -> tuple[Any, Result]:
    """kiln_json's document, and the run's result (its stderr)."""
    result = invoke(*args, "--json")
    assert result.exit_code == code, (result.output, result.exception)
    document = json.loads(result.stdout)  # nothing else on stdout
    fields = documented_fields()[section]
    assert fields, f"docs/cli.md lists no field for kiln {section}"
    assert missing_fields(document, fields) == [], (section, document)
    return document, result
