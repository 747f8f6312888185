"""`kiln profiles`: the deployment profiles that say how to build, listed, shown and checked."""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from modelkiln.cli.console import cells, err, out
from modelkiln.cli.exit_codes import CHECK_FAILED
from modelkiln.cli.jsonout import JSON_OPTION, emit_json
from modelkiln.errors import KilnError

PROFILE_COLUMNS = ("name", "family", "format", "runtime", "compute", "weights", "description")


@click.group()
def profiles() -> None:
    """List, show and validate deployment profiles."""


@profiles.command("list")
@click.argument("filters", nargs=-1)
@JSON_OPTION
def profiles_list(filters: tuple[str, ...], as_json: bool) -> None:
    """The bundled profiles; with FILTERS (e.g. `sd openvino`), those matching every word:
    a part of the name, the family, format, runtime, precision or scheme."""
    from modelkiln.errors import InputError
    from modelkiln.plan import load_profile
    from modelkiln.profiles import bundled_profile_names

    rows = []
    for name in bundled_profile_names():
        profile = load_profile(name)
        row = {
            "name": name,
            "family": profile.family,
            "format": profile.export.format,
            "runtime": profile.runtime.name,
            "compute": profile.precision.compute,
            "weights": profile.precision.weights,
            "scheme": profile.quantization.scheme,
            "description": profile.description.split(". ")[0],
        }
        words = {*name.split("-"), *(str(v) for k, v in row.items() if k != "description")}
        if all(word.lower() in words for word in filters):
            rows.append(row)
    if not rows:
        raise InputError(
            f"no bundled profile matches {' '.join(filters)!r}; `kiln profiles list` shows them all"
        )
    if as_json:
        emit_json(rows)
        return
    table = Table(*PROFILE_COLUMNS)
    for row in rows:
        table.add_row(*cells(*(row[key] for key in PROFILE_COLUMNS)))
    out.print(table)


@profiles.command("show")
@click.argument("profile")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a profile key (as kiln build --set), e.g. runtime.threads=2; repeat for "
    "several.",
)
@JSON_OPTION
def profiles_show(profile: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Print PROFILE (a bundled name or a .toml path) as TOML, with every default filled in."""
    from modelkiln.plan import load_profile

    loaded = load_profile(profile, overrides)
    if as_json:
        emit_json(loaded.to_dict())
        return
    click.echo(loaded.to_toml(), nl=False)


@profiles.command("validate")
@click.argument("files", nargs=-1, required=True)
@JSON_OPTION
def profiles_validate(files: tuple[str, ...], as_json: bool) -> None:
    """Check profile FILES against the schema and the support matrix; exit 1 when one is
    invalid."""
    from modelkiln.plan import load_profile

    checked: list[dict[str, Any]] = []
    for file in files:
        try:
            name: str | None = load_profile(file).name
            error: str | None = None
        except KilnError as invalid:
            name, error = None, str(invalid)
        checked.append({"file": file, "name": name, "passed": error is None, "error": error})
        if as_json:
            continue
        if error is None:
            out.print(f"[green]ok[/] {escape(file)}")
        else:
            err.print(f"[red]invalid[/] {escape(error)}")
    passed = all(item["passed"] for item in checked)
    if as_json:
        emit_json({"passed": passed, "profiles": checked})
    if not passed:
        sys.exit(CHECK_FAILED)


@profiles.command("schemes")
@JSON_OPTION
def profiles_schemes(as_json: bool) -> None:
    """Which format has which quantization scheme (the registered handlers)."""
    from modelkiln.quantize import SCHEMES, support

    table = support()
    formats = list(table)
    names = sorted({scheme for handlers in table.values() for scheme in handlers})
    if as_json:
        schemes = [
            {
                "name": name,
                "formats": [f for f in formats if name in table[f]],
                "summary": SCHEMES.get(name).summary,
            }
            for name in names
        ]
        emit_json({"formats": formats, "schemes": schemes})
        return
    grid = Table("scheme", *formats, "what it does")
    for name in names:
        marks = ["yes" if name in table[f] else "—" for f in formats]
        grid.add_row(*cells(name, *marks, SCHEMES.get(name).summary))
    out.print(grid)
