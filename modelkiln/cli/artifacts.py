"""`kiln info`, `kiln verify`, `kiln validate`, `kiln package`, `kiln clean`: what an artifact
holds, whether it is intact and valid, its bundles, and what killed builds left."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape
from rich.table import Table

from modelkiln.cli.console import (
    RUNTIME_OPTION,
    cells,
    describe_scores,
    err,
    out,
    progress_display,
)
from modelkiln.cli.exit_codes import CHECK_FAILED
from modelkiln.cli.jsonout import JSON_OPTION, emit_json, paths
from modelkiln.errors import IntegrityError, ValidationError

if TYPE_CHECKING:
    from modelkiln.records import EndToEndRecord, QuantizationRecord


class TargetChoice(click.Choice):
    """The deployment targets the backends declare, read when first needed (not at import)."""

    def __init__(self) -> None:
        super().__init__([])

    @property  # type: ignore[override]
    def choices(self) -> list[str]:
        from modelkiln.packaging import deployment_targets

        return list(deployment_targets())

    @choices.setter
    def choices(self, value: object) -> None:
        pass

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """An alias (linux-arm64) becomes the target's own name (linux-aarch64)."""
        from modelkiln.packaging.targets import canonical_target

        return super().convert(
            canonical_target(value) if isinstance(value, str) else value, param, ctx
        )


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@JSON_OPTION
@click.option(
    "--probe", is_flag=True, help="Also open each component here and report what the runtime uses."
)
@RUNTIME_OPTION
def info(artifact: Path, as_json: bool, probe: bool, runtime: str | None) -> None:
    """What ARTIFACT holds: source, profile, IO, validation, precision the runtime used."""
    from modelkiln.loading import open_artifact

    opened = open_artifact(artifact)
    manifest = opened.manifest
    probed = {}
    if probe:
        for name in manifest.components:
            with opened.session(name, runtime) as session:
                probed[name] = session.info
    if as_json:
        emit_json({**manifest.to_json(), "probed": probed} if probe else manifest.to_json())
        return
    summary = Table.grid(padding=(0, 2))
    summary.add_row(*cells("artifact", str(artifact)))
    summary.add_row("family / task", f"{manifest.family} / {manifest.task}")
    source = manifest.source
    summary.add_row("source", source.spec + (f" @ {source.revision}" if source.revision else ""))
    if source.single_file is not None:
        single = source.single_file
        described = (
            f"{single.pipeline} ({single.model_type}, {single.dtype}), configs {single.config}"
        )
        summary.add_row(*cells("single file", described))
    for lora in source.loras:
        summary.add_row(*cells("LoRA", f"{lora.path} × {lora.scale:g} ({lora.layout})"))
    summary.add_row(*cells("profile", manifest.profile.name))
    summary.add_row("format / runtime", f"{manifest.format} / {manifest.runtime}")
    precision = manifest.profile.precision
    summary.add_row("precision", f"compute {precision.compute}, weights {precision.weights}")
    quantized = {n: r.quantization for n, r in manifest.components.items() if r.quantization}
    if quantized:
        summary.add_row("quantization", _describe_quantization(quantized))
    if manifest.end_to_end:
        summary.add_row("end to end", _describe_end_to_end(manifest.end_to_end))
    summary.add_row("files", f"{len(manifest.files)} files, {manifest.size_bytes / 1e6:.1f} MB")
    facts = manifest.build
    summary.add_row(
        "built",
        f"{facts.created} in {facts.seconds} s, peak RSS {facts.peak_rss_bytes / 1e9:.2f} GB, "
        f"modelkiln {manifest.modelkiln_version}",
    )
    out.print(summary)
    table = Table(
        "component",
        "inputs",
        "outputs",
        "validation",
        "runtime used (at build)",
        *(["runtime here"] if probe else []),
    )
    for name, record in manifest.components.items():
        inputs = "\n".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in record.inputs.items())
        outputs = "\n".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in record.outputs.items())
        checks = describe_scores(record.validation.outputs, full=True, sep="\n") or (
            f"not run: {record.validation.not_run or 'no record'}"
        )
        used = _describe_runtime(record.runtime)
        here = [_describe_runtime(probed[name])] if probe else []
        table.add_row(*cells(name, inputs, outputs, checks, used, *here))
    out.print(table)


def _describe_quantization(quantized: Mapping[str, QuantizationRecord]) -> str:
    records = quantized.values()
    before = sum(q.bytes_before for q in records)
    after = sum(q.bytes_after for q in records)
    weights = sum(q.quantized_weights for q in records)
    schemes = ", ".join(f"{n} {q.scheme}" for n, q in quantized.items())
    line = f"{schemes}: {weights} weights, {before / 1e6:.1f} → {after / 1e6:.1f} MB"
    if any(q.memory_bytes_after is not None for q in records):
        memory_before = sum(q.memory_bytes_before or 0 for q in records)
        memory_after = sum(q.memory_bytes_after or 0 for q in records)
        line += f" on disk, {memory_before / 1e6:.1f} → {memory_after / 1e6:.1f} MB in memory"
    return line


def _describe_end_to_end(record: EndToEndRecord) -> str:
    """The artifact's pipeline against torch fp32 on real data, as the build measured it."""
    if record.not_run is not None:
        return f"not run: {record.not_run}"
    if record.prompts:
        psnr = ", ".join("identical" if p is None else f"{p:.1f} dB" for p in record.psnr_db)
        ssim = ", ".join(f"{s:.3f}" for s in record.ssim)
        return f"{len(record.prompts)} prompt(s): PSNR {psnr}; SSIM {ssim}"
    text = f"{record.images} images of {record.data}"
    if record.accuracy is not None and record.reference_accuracy is not None:
        text += (
            f": top-1 {100 * record.accuracy:.2f} % (torch fp32 "
            f"{100 * record.reference_accuracy:.2f} %, drop {record.accuracy_drop:.2f})"
        )
    return text


def _describe_runtime(facts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in facts.items() if k != "runtime")


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@JSON_OPTION
def verify(artifact: Path, as_json: bool) -> None:
    """Re-hash every file of ARTIFACT (a directory, or a bundle) against its manifest; exit 1
    when one does not match."""
    from modelkiln.packaging import is_bundle

    if is_bundle(artifact):
        _verify_bundle(artifact, as_json)
        return
    from modelkiln.artifact import find_problems, read_manifest

    manifest = read_manifest(artifact)
    with progress_display() as progress, progress.task(f"hashing {len(manifest.files)} files"):
        problems = find_problems(artifact, manifest, hashes=True)
    if as_json:
        _emit_verified(artifact, len(manifest.files), problems, bundle=False)
    elif problems:
        for problem in problems:
            err.print(f"[red]✗[/] {escape(problem)}")
        count = len(problems)
        err.print(f"[red]error:[/] {escape(str(artifact))} failed verification: {count} problem(s)")
    else:
        count = len(manifest.files)
        out.print(f"[green]ok[/] {escape(str(artifact))}: {count} files match kiln.json")
    if problems:
        sys.exit(CHECK_FAILED)


def _verify_bundle(bundle: Path, as_json: bool) -> None:
    from modelkiln.packaging import BUNDLE_MANIFEST, verify_bundle

    try:
        with progress_display() as progress, progress.task(f"checking {bundle.name}"):
            manifest = verify_bundle(bundle)
    except IntegrityError as error:  # a finding, not a failure to run: exit 1, as for folders
        if as_json:
            _emit_verified(bundle, None, [str(error)], bundle=True)
        else:
            err.print(f"[red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(CHECK_FAILED)
    if as_json:
        _emit_verified(bundle, len(manifest.files), [], bundle=True)
        return
    out.print(
        f"[green]ok[/] {escape(str(bundle))}: {len(manifest.files)} files match "
        f"{BUNDLE_MANIFEST} ({manifest.format} for {manifest.target})"
    )


def _emit_verified(path: Path, checked: int | None, problems: list[str], *, bundle: bool) -> None:
    emit_json(
        {
            "artifact": str(path),
            "bundle": bundle,
            "passed": not problems,
            "checked": checked,
            "problems": problems,
        }
    )


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@JSON_OPTION
def validate(artifact: Path, as_json: bool) -> None:
    """Run the validation a build could not (Core ML built off macOS) against the torch
    outputs saved in ARTIFACT; exit 1 when a component misses the profile's tolerance."""
    from modelkiln.evaluation.components import check_pending
    from modelkiln.loading import open_artifact

    loaded = open_artifact(artifact, verify=True)
    pending = {
        name: record.validation
        for name, record in loaded.manifest.components.items()
        if record.validation.passed is None and record.validation.reference is not None
    }
    if not pending and not as_json:
        out.print(f"[green]ok[/] {escape(str(artifact))}: every component was validated at build")
        return
    failed = 0
    results: dict[str, dict[str, Any]] = {}
    for name, record in pending.items():
        try:
            with loaded.session(name) as session:
                result = check_pending(session, record, loaded.root)
        except ValidationError as error:
            results[name] = {"passed": False, "error": str(error)}
            failed += 1
            if not as_json:
                err.print(f"[red]✗[/] {escape(str(error))}")
            continue
        results[name] = result.to_json()
        if not as_json:
            out.print(f"[green]✓[/] {name}: {describe_scores(result.outputs)}", highlight=False)
    if as_json:
        emit_json({"artifact": str(artifact), "passed": not failed, "components": results})
    elif failed:
        err.print(f"[red]error:[/] {failed} of {len(pending)} component(s) missed their tolerance")
    if failed:
        sys.exit(CHECK_FAILED)


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "-t",
    "--target",
    required=True,
    type=TargetChoice(),
    help="Where the bundle runs (linux-arm64 is linux-aarch64); it decides which artifact "
    "formats are accepted.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="The bundle: BUNDLE.tar.gz or BUNDLE.zip.",
)
@JSON_OPTION
def package(artifact: Path, target: str, output: Path, as_json: bool) -> None:
    """Pack what ARTIFACT needs to run on TARGET into one file, checked by `kiln verify`."""
    from modelkiln.packaging import package as package_artifact

    with progress_display() as progress:
        bundle = package_artifact(artifact, target, output, progress=progress)
    if as_json:
        emit_json(
            {
                "artifact": str(artifact),
                "target": target,
                "files": [str(bundle.path)],
                "size_bytes": bundle.size,
                "left_out": list(bundle.left_out),
                "manifest": bundle.manifest.to_json(),
            }
        )
        return
    if bundle.left_out:
        err.print(f"  left out: {', '.join(bundle.left_out)}", markup=False, highlight=False)
    out.print(
        f"[green]packaged[/] {escape(str(bundle.path))} for {target}: "
        f"{len(bundle.manifest.files)} files, {bundle.size / 1e6:.1f} MB"
    )


@click.command()
@click.argument("directories", nargs=-1, type=click.Path(path_type=Path, file_okay=False))
@JSON_OPTION
def clean(directories: tuple[Path, ...], as_json: bool) -> None:
    """Remove what killed builds left in DIRECTORIES (default: artifacts/ and the cache).

    Staging folders of builds and unpacks that no live process owns are removed, and an
    artifact that a kill left moved aside is put back. Runs in progress are left alone.
    """
    from modelkiln.builder import DEFAULT_OUTPUT_ROOT
    from modelkiln.env import cache_home
    from modelkiln.outputs import clean as clear_directory
    from modelkiln.packaging.unpack import cache_root

    chosen = directories or (DEFAULT_OUTPUT_ROOT, cache_home(), cache_root())
    done: list[dict[str, Any]] = []
    for directory in chosen:
        if not directory.is_dir():
            if directories:
                err.print(f"[yellow]skipped[/] {escape(str(directory))}: no such folder")
            continue
        cleared = clear_directory(directory)
        done.append(
            {
                "directory": str(directory),
                "removed": paths(cleared.removed),
                "restored": paths(cleared.restored),
                "freed_bytes": cleared.freed_bytes,
            }
        )
        if as_json:
            continue
        for path in cleared.restored:
            out.print(f"[green]restored[/] {escape(str(path))}")
        out.print(
            f"{escape(str(directory))}: removed {len(cleared.removed)} leftover folder(s), "
            f"{cleared.freed_bytes / 1e6:.1f} MB"
        )
    if as_json:
        emit_json({"directories": done})
