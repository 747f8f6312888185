"""`kiln build`, `kiln cache`, `kiln convert`: making artifacts, the cache of built ones, and
the checkpoint layouts a build reads."""

from __future__ import annotations

import math
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
    err,
    out,
    progress_display,
)
from modelkiln.cli.jsonout import JSON_OPTION, emit_json
from modelkiln.errors import KilnError

if TYPE_CHECKING:
    from modelkiln.build_cache import BuildCache
    from modelkiln.profiles import LoraSettings
    from modelkiln.records import Manifest


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
@JSON_OPTION
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
    as_json: bool,
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
        _build_matrix(matrix, executor, address, build_cache, as_json)
        return
    if source is None or profile is None:
        raise click.UsageError("give SOURCE and --profile PROFILE (or --matrix FILE)")
    if executor != "local" or address:
        raise click.UsageError("--executor and --address are for --matrix builds")
    replaced = _say_what_is_replaced(source, profile, overrides, output)
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
    if as_json:
        emit_json(_build_json(artifact, manifest, replaced, build_cache))
        return
    if build_cache is not None:
        key, where = manifest.build.key, escape(build_cache.location)
        if build_cache.restored:
            out.print(f"restored from the build cache {where} (key {key})")
        elif build_cache.stored:
            out.print(f"stored in the build cache {where} (key {key})")
        else:
            err.print(f"[yellow]warning:[/] not stored in the build cache {where}")
    err.print(validation_table(manifest))
    out.print(f"[green]built[/] {escape(str(artifact))}")


def validation_table(manifest: Manifest) -> Table:
    """Each component's outputs against torch, one row per output: a table shrinks to the
    terminal where a line of every output's scores wrapped mid-record."""
    table = Table(title="validation against torch", title_justify="left")
    for column in ("component", "output", "max-abs", "cosine", "runs as"):
        numeric = column in ("max-abs", "cosine")
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    for name, record in manifest.components.items():
        validation = record.validation
        if validation.not_run is not None:
            table.add_row(*cells(name, "—", "—", "—", f"not run: {validation.not_run}"))
            continue
        precision = record.runtime.get("inference_precision", "?")
        for output, score in validation.outputs.items():
            table.add_row(
                *cells(
                    name,
                    output,
                    f"{score.max_abs:.2e}",
                    f"{score.min_cosine:.6f}",
                    f"{manifest.runtime}, {precision}",
                )
            )
    return table


def _say_what_is_replaced(
    source: str, profile: str, overrides: tuple[str, ...], output: Path | None
) -> bool:
    """Whether the build's output holds an artifact, which the build will replace; said on
    stderr before minutes of building. A folder that is not an artifact is left to the build
    (it fills an empty one and refuses the user's files)."""
    from modelkiln.artifact import MANIFEST_NAME, read_manifest
    from modelkiln.builder import default_output
    from modelkiln.plan import load_profile

    # Where the builder writes without -o (its source spec is the text given).
    target = (
        output if output is not None else default_output(source, load_profile(profile, overrides))
    )
    if not (target / MANIFEST_NAME).is_file():
        return False
    try:
        earlier = read_manifest(target)  # JSON and its digest; no file is hashed
    except (KilnError, OSError) as error:
        what = f"a damaged one: {error}"
    else:
        what = f"{earlier.profile.name}, built {_when(earlier.build.created)}"
    err.print(
        f"replacing the artifact at {target} ({what})",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return True


def _when(created: str) -> str:
    """kiln.json's ISO 8601 UTC time to the minute, as a reader tells two builds apart."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(created).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return created


def _build_json(
    artifact: Path, manifest: Manifest, replaced: bool, build_cache: BuildCache | None
) -> dict[str, object]:
    document = manifest.to_json()
    cache = None
    if build_cache is not None:
        cache = {
            "location": build_cache.location,
            "key": manifest.build.key,
            "restored": bool(build_cache.restored),
            "stored": bool(build_cache.stored),
        }
    return {
        "artifact": str(artifact),
        "replaced": replaced,
        "profile": manifest.profile.name,
        "format": manifest.format,
        "runtime": manifest.runtime,
        "validation": {name: c["validation"] for name, c in document["components"].items()},
        "end_to_end": document["end_to_end"] or None,
        "cache": cache,
    }


def _build_matrix(
    matrix: Path,
    executor: str,
    address: str | None,
    build_cache: BuildCache | None,
    as_json: bool,
) -> None:
    from modelkiln.bench.matrix import plan_builds, read_matrix
    from modelkiln.cluster.executors import open_executor

    grid = read_matrix(matrix)
    with progress_display() as progress:
        jobs = plan_builds(grid)
        with open_executor(executor, address, grid.cluster, build_cache) as runner:
            paths = runner.build(jobs, progress, build_cache)
    if as_json:
        pairs = zip(jobs, paths, strict=True)
        built = [{"label": job.label, "artifact": str(path)} for job, path in pairs]
        emit_json({"artifacts": built})
        return
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
@JSON_OPTION
def cache_list(location: str, as_json: bool) -> None:
    """Every entry: key, source, profile, size, when it was built."""
    from dataclasses import asdict

    from modelkiln.build_cache import open_cache

    opened = open_cache(location)
    assert opened is not None
    entries = opened.entries()
    if as_json:
        emit_json(
            {
                "cache": opened.location,
                "entries": [asdict(entry) for entry in entries],
                "size_bytes": sum(entry.size_bytes for entry in entries),
            }
        )
        return
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
@JSON_OPTION
def cache_prune(location: str, days: float | None, everything: bool, as_json: bool) -> None:
    """Remove entries: those older than --older-than DAYS, or --all."""
    from dataclasses import asdict
    from datetime import UTC, datetime, timedelta

    from modelkiln.build_cache import open_cache

    if (days is None) == (not everything):
        raise click.UsageError("give --older-than DAYS or --all (one of the two)")
    opened = open_cache(location)
    assert opened is not None
    cutoff = datetime.now(UTC) - timedelta(days=days or 0)
    removed = []
    for entry in opened.entries():
        if everything or datetime.fromisoformat(entry.created) < cutoff:
            opened.remove(entry.key)
            removed.append(entry)
            if not as_json:  # as it goes: what an error midway leaves removed is said
                out.print(f"removed {entry.key} ({entry.source} · {entry.profile})")
    freed = sum(entry.size_bytes for entry in removed)
    if as_json:
        removed_json = [asdict(entry) for entry in removed]
        emit_json({"cache": opened.location, "removed": removed_json, "freed_bytes": freed})
        return
    out.print(f"freed {freed / 1e6:.1f} MB")


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
@JSON_OPTION
def convert(
    source: Path, destination: Path, config: Path | None, allow_pickle: bool, as_json: bool
) -> None:
    """Convert between a diffusers pipeline folder and a single-file checkpoint (the original
    layout A1111 and ComfyUI load): a folder SOURCE becomes the file DESTINATION (.safetensors),
    a file SOURCE becomes the folder DESTINATION."""
    from modelkiln.checkpoints.convert import convert_checkpoint

    with progress_display() as progress, progress.task(f"converting {source}"):
        written = convert_checkpoint(source, destination, config=config, allow_pickle=allow_pickle)
    if as_json:
        emit_json({"source": str(source), "files": [str(written)]})
        return
    out.print(f"[green]wrote[/] {escape(str(written))}")
