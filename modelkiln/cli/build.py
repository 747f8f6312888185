"""`kiln build` and `kiln profiles`: making artifacts, and the profiles that say how."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape
from rich.table import Table

from modelkiln.cli.console import (
    ADDRESS_OPTION,
    BUILD_CACHE_OPTION,
    EXECUTOR_OPTION,
    cells,
    describe_scores,
    err,
    out,
    progress_display,
)
from modelkiln.errors import KilnError

if TYPE_CHECKING:
    from modelkiln.build_cache import BuildCache
    from modelkiln.profiles import LoraSettings


@click.command()
@click.argument("source", required=False)
@click.option("-p", "--profile", help="Bundled profile name or a .toml path (required).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Artifact directory.")
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a profile key."
)
@click.option("--revision", help="Hub revision (branch, tag or commit).")
@click.option("--allow-pickle", is_flag=True, help="Accept pickle checkpoints (.bin/.pth/.ckpt).")
@click.option(
    "--config",
    "config",
    type=click.Path(path_type=Path),
    help="For a single-file checkpoint: a diffusers folder of its architecture (configs and "
    "tokenizers) instead of fetching them from the Hub.",
)
@click.option(
    "--lora",
    "loras",
    multiple=True,
    metavar="PATH[:SCALE]",
    help="Fuse a LoRA (.safetensors, or a peft adapter folder) at SCALE (default 1.0) before "
    "export; repeat for several. Added after the profile's [[lora]] entries.",
)
@BUILD_CACHE_OPTION
@click.option(
    "--matrix",
    type=click.Path(path_type=Path),
    help="Build the sources x profiles of this TOML file (see kiln bench --matrix) instead "
    "of SOURCE with --profile.",
)
@EXECUTOR_OPTION
@ADDRESS_OPTION
def build(
    source: str | None,
    profile: str | None,
    output: Path | None,
    overrides: tuple[str, ...],
    revision: str | None,
    allow_pickle: bool,
    config: Path | None,
    loras: tuple[str, ...],
    cache: str | None,
    matrix: Path | None,
    executor: str,
    address: str | None,
) -> None:
    """Export SOURCE (hub id, local dir, timm:NAME, single-file .safetensors) with PROFILE,
    validate, write the artifact. Or build a whole --matrix, here or on a Ray cluster."""
    from modelkiln.build_cache import open_cache
    from modelkiln.builder import build as build_artifact
    from modelkiln.loading import open_artifact

    build_cache = open_cache(cache)
    if matrix is not None:
        single = (source, profile, output, overrides, revision, allow_pickle, config, loras)
        if any(single):
            raise click.UsageError(
                "--matrix builds what its file says: drop SOURCE and the single-build options "
                "(--profile, --output, --set, --revision, --allow-pickle, --config, --lora)"
            )
        _build_matrix(matrix, executor, address, build_cache)
        return
    if source is None or profile is None:
        raise click.UsageError("give SOURCE and --profile PROFILE (or --matrix FILE)")
    if executor != "local" or address:
        raise click.UsageError("--executor and --address are for --matrix builds")
    with progress_display() as progress:
        artifact = build_artifact(
            source,
            profile,
            output,
            overrides=overrides,
            revision=revision,
            allow_pickle=allow_pickle,
            config=config,
            loras=[lora_option(text) for text in loras],
            progress=progress,
            cache=build_cache,
        )
    manifest = open_artifact(artifact).manifest
    if build_cache is not None:
        key, where = manifest.build.key, escape(build_cache.location)
        if build_cache.restored:
            out.print(f"restored from the build cache {where} (key {key})")
        elif build_cache.stored:
            out.print(f"stored in the build cache {where} (key {key})")
        else:
            err.print(f"[yellow]warning:[/] not stored in the build cache {where}")
    for name, record in manifest.components.items():
        if record.validation.not_run is not None:
            not_run = record.validation.not_run
            err.print(f"  {name}: validation not run: {not_run}", markup=False, highlight=False)
            continue
        metrics = describe_scores(record.validation.outputs)
        precision = record.runtime.get("inference_precision", "?")
        err.print(f"  {name}: {metrics} ({manifest.runtime}, {precision})", markup=False)
    out.print(f"[green]built[/] {escape(str(artifact))}")


def _build_matrix(
    matrix: Path, executor: str, address: str | None, build_cache: BuildCache | None
) -> None:
    from modelkiln.bench.matrix import plan_builds, read_matrix
    from modelkiln.cluster.executors import open_executor

    grid = read_matrix(matrix)
    with progress_display() as progress:
        jobs = plan_builds(grid)
        with open_executor(executor, address, grid.cluster, build_cache) as runner:
            paths = runner.build(jobs, progress, build_cache)
    for job, path in zip(jobs, paths, strict=True):
        out.print(f"[green]built[/] {escape(job.label)}: {escape(str(path))}")


@click.group()
def cache() -> None:
    """The build cache (kiln build --cache): list its entries, prune them."""


CACHE_OPTION = click.option(
    "--cache",
    "location",
    default="",
    help="The cache's folder or fsspec URL.  [default: $MODELKILN_CACHE/builds]",
)


@cache.command("list")
@CACHE_OPTION
def cache_list(location: str) -> None:
    """Every entry: key, source, profile, size, when it was built."""
    from modelkiln.build_cache import open_cache

    opened = open_cache(location)
    assert opened is not None
    entries = opened.entries()
    table = Table("key", "source", "profile", "size", "created", title=opened.location)
    for entry in entries:
        size = f"{entry.size_bytes / 1e6:.1f} MB"
        table.add_row(*cells(entry.key, entry.source, entry.profile, size, entry.created))
    out.print(table)
    total = sum(entry.size_bytes for entry in entries)
    out.print(f"{len(entries)} entries, {total / 1e6:.1f} MB")


@cache.command("prune")
@CACHE_OPTION
@click.option(
    "--older-than",
    "days",
    type=click.FloatRange(min=0),
    help="Remove entries built more than DAYS days ago.",
)
@click.option("--all", "everything", is_flag=True, help="Remove every entry.")
def cache_prune(location: str, days: float | None, everything: bool) -> None:
    """Remove entries: those older than --older-than DAYS, or --all."""
    from datetime import UTC, datetime, timedelta

    from modelkiln.build_cache import open_cache

    if (days is None) == (not everything):
        raise click.UsageError("give --older-than DAYS or --all (one of the two)")
    opened = open_cache(location)
    assert opened is not None
    cutoff = datetime.now(UTC) - timedelta(days=days or 0)
    removed = 0
    for entry in opened.entries():
        if everything or datetime.fromisoformat(entry.created) < cutoff:
            opened.remove(entry.key)
            removed += entry.size_bytes
            out.print(f"removed {entry.key} ({entry.source} · {entry.profile})")
    out.print(f"freed {removed / 1e6:.1f} MB")


def lora_option(text: str) -> LoraSettings:
    """PATH[:SCALE] -> a LoRA setting (the path made absolute: the manifest records it)."""
    from modelkiln.profiles import LoraSettings

    path, sep, scale = text.rpartition(":")
    if not sep or not _is_number(scale):
        path, scale = text, "1.0"
    if not path:
        raise click.BadParameter(f"'{text}': expected PATH[:SCALE]", param_hint="--lora")
    value = float(scale)
    if not math.isfinite(value):
        raise click.BadParameter(
            f"'{text}': the scale must be a finite number", param_hint="--lora"
        )
    return LoraSettings(str(Path(path).expanduser().absolute()), value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@click.group()
def profiles() -> None:
    """List, show and validate deployment profiles."""


@profiles.command("list")
@click.argument("filters", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
def profiles_list(filters: tuple[str, ...], as_json: bool) -> None:
    """The bundled profiles; with FILTERS (e.g. `sd openvino`), those matching every word:
    a part of the name, the family, format, runtime, precision or scheme."""
    import json

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
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(*PROFILE_COLUMNS)
    for row in rows:
        table.add_row(*cells(*(row[key] for key in PROFILE_COLUMNS)))
    out.print(table)


PROFILE_COLUMNS = ("name", "family", "format", "runtime", "compute", "weights", "description")


@profiles.command("show")
@click.argument("profile")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def profiles_show(profile: str, overrides: tuple[str, ...]) -> None:
    """Print PROFILE as TOML, with every default filled in."""
    from modelkiln.plan import load_profile

    click.echo(load_profile(profile, overrides).to_toml(), nl=False)


@profiles.command("validate")
@click.argument("files", nargs=-1, required=True)
def profiles_validate(files: tuple[str, ...]) -> None:
    """Check profile FILES against the schema and the support matrix."""
    from modelkiln.plan import load_profile

    failed = 0
    for file in files:
        try:
            load_profile(file)
            out.print(f"[green]ok[/] {escape(file)}")
        except KilnError as error:
            failed += 1
            err.print(f"[red]invalid[/] {escape(str(error))}")
    if failed:
        sys.exit(1)


@profiles.command("schemes")
def profiles_schemes() -> None:
    """Which format has which quantization scheme (the registered handlers)."""
    from modelkiln.quantize import SCHEMES, support

    table = support()
    formats = list(table)
    grid = Table("scheme", *formats, "what it does")
    for name in sorted({scheme for handlers in table.values() for scheme in handlers}):
        marks = ["yes" if name in table[f] else "—" for f in formats]
        grid.add_row(*cells(name, *marks, SCHEMES.get(name).summary))
    out.print(grid)


@click.command()
@click.argument("source", type=click.Path(path_type=Path, exists=True))
@click.argument("destination", type=click.Path(path_type=Path))
@click.option(
    "--config",
    type=click.Path(path_type=Path),
    help="Reading a single file: a diffusers folder of its architecture (configs and "
    "tokenizers) instead of fetching them from the Hub.",
)
@click.option("--allow-pickle", is_flag=True, help="Accept a pickle checkpoint (.ckpt/.pt).")
def convert(source: Path, destination: Path, config: Path | None, allow_pickle: bool) -> None:
    """Convert between a diffusers pipeline folder and a single-file checkpoint (the original
    layout A1111 and ComfyUI load): a folder SOURCE becomes the file DESTINATION (.safetensors),
    a file SOURCE becomes the folder DESTINATION."""
    from modelkiln.checkpoints.convert import convert_checkpoint

    with progress_display() as progress, progress.task(f"converting {source}"):
        written = convert_checkpoint(source, destination, config=config, allow_pickle=allow_pickle)
    out.print(f"[green]wrote[/] {escape(str(written))}")
