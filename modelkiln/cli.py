"""`kiln`: parse, call the library, print. All output, progress and exit codes live here.

Every KilnError becomes one red line on stderr and exit code 1 (a traceback only with -v);
click's usage errors exit with 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgressBar
from rich.table import Table
from rich.text import Text

from modelkiln import __version__
from modelkiln.errors import InputError, KilnError, ValidationError
from modelkiln.packaging.targets import TARGETS

err = Console(stderr=True)
out = Console()

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
RUNTIME_OPTION = click.option("--runtime", help="Run with this runtime instead of the built one.")
THREADS_OPTION = click.option("--threads", type=int, help="Threads for the runtime.")
DEVICE_OPTION = click.option("--device", help="Device for the runtime (cpu, cuda, gpu, ...).")
BATCH_OPTION = click.option("--batch-size", default=8, show_default=True, type=int)
MAX_PIXELS_OPTION = click.option(
    "--max-pixels",
    default=100_000_000,
    show_default=True,
    type=int,
    help="Refuse images with more pixels than this (0: no limit).",
)


def cells(*values: str | Text) -> list[Text]:
    """Table cells as plain text: paths and labels may contain [brackets] rich would eat."""
    return [value if isinstance(value, Text) else Text(value) for value in values]


class RichProgress:
    """The library's Progress protocol on a rich progress display (stderr)."""

    def __init__(self, display: RichProgressBar) -> None:
        self.display = display

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Any]:
        task_id = self.display.add_task(description, total=total)
        try:
            yield lambda n=1: self.display.advance(task_id, n)
        except BaseException:
            # The error line says what failed; a frozen spinner above it would only repeat it.
            self.display.remove_task(task_id)
            raise
        self.display.update(task_id, completed=total if total is not None else 1, total=total or 1)
        self.display.stop_task(task_id)


class LineProgress:
    """Progress for logs and pipes: one line per finished step, none for a failed one."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Any]:
        started = time.perf_counter()
        yield lambda n=1: None
        err.print(f"✓ {escape(description)} ({time.perf_counter() - started:.1f} s)")


@contextlib.contextmanager
def progress_display() -> Iterator[RichProgress | LineProgress]:
    """Live bars on a terminal; plain lines where stderr is a file or a pipe (CI logs)."""
    if not err.is_terminal:
        yield LineProgress()
        return
    display = RichProgressBar(
        SpinnerColumn(finished_text="[green]✓[/]"),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )
    with display:
        yield RichProgress(display)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kiln")
@click.option("-v", "--verbose", is_flag=True, help="Debug logs, and tracebacks on errors.")
def cli(verbose: bool) -> None:
    """Compile diffusion and vision models for deployment, run and measure them."""
    level = logging.DEBUG if verbose else logging.WARNING
    # RichHandler prints the level itself; basicConfig's default format would repeat it.
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False, show_time=verbose)],
    )
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "timm", "nncf"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


# --- build ----------------------------------------------------------------------------------


@cli.command()
@click.argument("source")
@click.option("-p", "--profile", required=True, help="Bundled profile name or a .toml path.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Artifact directory.")
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a profile key."
)
@click.option("--revision", help="Hub revision (branch, tag or commit).")
@click.option("--allow-pickle", is_flag=True, help="Accept pickle checkpoints (.bin/.pth).")
def build(
    source: str,
    profile: str,
    output: Path | None,
    overrides: tuple[str, ...],
    revision: str | None,
    allow_pickle: bool,
) -> None:
    """Export SOURCE (hub id, local dir, timm:NAME) with PROFILE, validate, write the artifact."""
    from modelkiln.builder import build as build_artifact
    from modelkiln.loading import open_artifact

    with progress_display() as progress:
        artifact = build_artifact(
            source,
            profile,
            output,
            overrides=overrides,
            revision=revision,
            allow_pickle=allow_pickle,
            progress=progress,
        )
    manifest = open_artifact(artifact).manifest
    for name, record in manifest.components.items():
        if "not_run" in record.validation:
            not_run = record.validation["not_run"]
            err.print(f"  {name}: validation not run: {not_run}", markup=False, highlight=False)
            continue
        metrics = ", ".join(
            f"{output_name}: max-abs {m['max_abs']:.2e}, cosine {m['min_cosine']:.6f}"
            for output_name, m in record.validation["outputs"].items()
        )
        precision = record.runtime.get("inference_precision", "?")
        err.print(f"  {name}: {metrics} ({manifest.runtime}, {precision})", markup=False)
    out.print(f"[green]built[/] {escape(str(artifact))}")


# --- profiles -------------------------------------------------------------------------------


@cli.group()
def profiles() -> None:
    """List, show and validate deployment profiles."""


@profiles.command("list")
def profiles_list() -> None:
    """The bundled profiles."""
    from modelkiln.profiles import bundled_profile_names, load_profile

    table = Table("name", "family", "format", "runtime", "compute", "weights", "description")
    for name in bundled_profile_names():
        profile = load_profile(name)
        table.add_row(
            *cells(
                name,
                profile.family,
                profile.export.format,
                profile.runtime_name,
                profile.precision.compute,
                profile.precision.weights,
                profile.description.split(". ")[0],
            )
        )
    out.print(table)


@profiles.command("show")
@click.argument("profile")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def profiles_show(profile: str, overrides: tuple[str, ...]) -> None:
    """Print PROFILE as TOML, with every default filled in."""
    from modelkiln.profiles import load_profile

    click.echo(load_profile(profile, overrides).to_toml(), nl=False)


@profiles.command("validate")
@click.argument("files", nargs=-1, required=True)
def profiles_validate(files: tuple[str, ...]) -> None:
    """Check profile FILES against the schema and the support matrix."""
    from modelkiln.profiles import load_profile

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


# --- run ------------------------------------------------------------------------------------


def expand_images(images: Sequence[str]) -> list[str]:
    """Files as given; directories replaced by the image files under them, sorted."""
    expanded: list[str] = []
    for item in images:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                str(p)
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise InputError(f"directory '{item}' holds no image files")
            expanded += found
        else:
            expanded.append(item)
    return expanded


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("-k", "--top-k", default=5, show_default=True, type=int)
@BATCH_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@RUNTIME_OPTION
@THREADS_OPTION
@DEVICE_OPTION
@MAX_PIXELS_OPTION
def classify(
    artifact: Path,
    images: tuple[str, ...],
    top_k: int,
    batch_size: int,
    as_json: bool,
    runtime: str | None,
    threads: int | None,
    device: str | None,
    max_pixels: int,
) -> None:
    """Classify IMAGES (files or directories) with an image-classification ARTIFACT."""
    from modelkiln.loading import load
    from modelkiln.pipelines.classification import ImageClassificationPipeline

    paths = expand_images(images)
    with load(artifact, runtime=runtime, threads=threads, device=device) as pipeline:
        _require_task(pipeline, ImageClassificationPipeline, "kiln embed")
        results = pipeline(paths, top_k=top_k, batch_size=batch_size, max_pixels=max_pixels or None)
    if as_json:
        payload = [
            {"image": path, "predictions": [p.__dict__ for p in predictions]}
            for path, predictions in zip(paths, results, strict=True)
        ]
        click.echo(json.dumps(payload, indent=2))
        return
    table = Table("image", "rank", "label", "score")
    for path, predictions in zip(paths, results, strict=True):
        for rank, prediction in enumerate(predictions, 1):
            table.add_row(
                *cells(
                    path if rank == 1 else "",
                    str(rank),
                    prediction.label,
                    f"{prediction.score:.4f}",
                )
            )
    out.print(table)


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="A .npy file.")
@click.option(
    "--pooling",
    type=click.Choice(["auto", "cls", "mean", "pooled"]),
    default="auto",
    show_default=True,
)
@click.option("--layer", type=int, help="Embed the tokens of this transformer block (1-based).")
@click.option("--no-normalize", is_flag=True, help="Keep raw vectors (default: L2-normalised).")
@BATCH_OPTION
@RUNTIME_OPTION
@THREADS_OPTION
@DEVICE_OPTION
@MAX_PIXELS_OPTION
def embed(
    artifact: Path,
    images: tuple[str, ...],
    output: Path,
    pooling: str,
    layer: int | None,
    no_normalize: bool,
    batch_size: int,
    runtime: str | None,
    threads: int | None,
    device: str | None,
    max_pixels: int,
) -> None:
    """Embed IMAGES with an image-feature-extraction ARTIFACT into a (N, D) .npy file."""
    import numpy as np

    from modelkiln.loading import load
    from modelkiln.pipelines.embedding import ImageEmbeddingPipeline

    paths = expand_images(images)
    with load(artifact, runtime=runtime, threads=threads, device=device) as pipeline:
        _require_task(pipeline, ImageEmbeddingPipeline, "kiln classify")
        vectors = pipeline(
            paths,
            pooling=pooling,
            layer=layer,
            normalize=not no_normalize,
            batch_size=batch_size,
            max_pixels=max_pixels or None,
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    np.save(output, vectors)
    out.print(
        f"[green]wrote[/] {escape(str(output))}: {vectors.shape[0]} × {vectors.shape[1]} float32"
    )


def _require_task(pipeline: Any, expected: type, other_command: str) -> None:
    if not isinstance(pipeline, expected):
        raise InputError(
            f"this artifact was built for {pipeline.task}, not {expected.task}; use "  # type: ignore[attr-defined]
            f"`{other_command}`, or rebuild with --set model.task={expected.task}"  # type: ignore[attr-defined]
        )


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="What to draw.")
@click.option("--negative-prompt", help="What to steer away from.")
@click.option("--steps", default=25, show_default=True, type=int)
@click.option("--guidance", default=7.5, show_default=True, type=float, help="1.0: no CFG pass.")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same pixels.")
@click.option("--width", type=int, help="Default: the size the artifact was built for.")
@click.option("--height", type=int)
@click.option("--num-images", default=1, show_default=True, type=int)
@click.option("--scheduler", help="euler, euler-ancestral, dpmpp-2m, dpmpp-2m-karras, ddim, ...")
@click.option("--image", "init_image", help="Start from this image (image-to-image, inpaint).")
@click.option(
    "--strength", type=float, help="How much to change --image (default 0.8; 1.0 inpaint)."
)
@click.option("--mask", help="Inpaint where this mask is white (any size).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="OUT.png")
@RUNTIME_OPTION
@THREADS_OPTION
@DEVICE_OPTION
def generate(
    artifact: Path,
    prompt: str,
    negative_prompt: str | None,
    steps: int,
    guidance: float,
    seed: int,
    width: int | None,
    height: int | None,
    num_images: int,
    scheduler: str | None,
    init_image: str | None,
    strength: float | None,
    mask: str | None,
    output: Path,
    runtime: str | None,
    threads: int | None,
    device: str | None,
) -> None:
    """Text-to-image, image-to-image (--image) or inpainting (--image --mask) with ARTIFACT."""
    from modelkiln.loading import load
    from modelkiln.pipelines.diffusion import DiffusionPipeline

    if mask is not None and init_image is None:
        raise InputError("--mask needs --image: the image to inpaint")
    if strength is not None and init_image is None:
        raise InputError("--strength applies to --image (image-to-image or inpainting)")
    settings: dict[str, Any] = {
        "negative_prompt": negative_prompt,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "width": width,
        "height": height,
        "num_images": num_images,
        "scheduler": scheduler,
    }
    with (
        load(artifact, runtime=runtime, threads=threads, device=device) as pipeline,
        progress_display() as progress,
    ):
        if not isinstance(pipeline, DiffusionPipeline):
            raise InputError(
                f"this artifact was built for {pipeline.task}, not image generation; use "
                "`kiln classify` or `kiln embed`"
            )
        settings["progress"] = progress
        if mask is not None and init_image is not None:
            images = pipeline.inpaint(
                prompt, init_image, mask, strength=1.0 if strength is None else strength, **settings
            )
        elif init_image is not None:
            images = pipeline.image_to_image(
                prompt, init_image, strength=0.8 if strength is None else strength, **settings
            )
        else:
            images = pipeline.text_to_image(prompt, **settings)
    for path in numbered_outputs(output, len(images)):
        path.parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, numbered_outputs(output, len(images)), strict=True):
        image.save(path)
        out.print(f"[green]wrote[/] {escape(str(path))} ({image.width}×{image.height})")


def numbered_outputs(output: Path, count: int) -> list[Path]:
    """OUT.png for one image; OUT-0.png, OUT-1.png, ... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


# --- inspect --------------------------------------------------------------------------------


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
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
        click.echo(
            json.dumps(
                {**manifest.to_json(), "probed": probed} if probe else manifest.to_json(), indent=2
            )
        )
        return
    summary = Table.grid(padding=(0, 2))
    summary.add_row(*cells("artifact", str(artifact)))
    summary.add_row("family / task", f"{manifest.family} / {manifest.task}")
    summary.add_row(
        "source",
        f"{manifest.source['spec']}"
        + (f" @ {manifest.source['revision']}" if manifest.source.get("revision") else ""),
    )
    summary.add_row(*cells("profile", str(manifest.profile["name"])))
    summary.add_row("format / runtime", f"{manifest.format} / {manifest.runtime}")
    summary.add_row(
        "precision",
        "compute {compute}, weights {weights}".format(**manifest.profile["precision"]),
    )
    quantized = {n: r.quantization for n, r in manifest.components.items() if r.quantization}
    if quantized:
        before = sum(q["bytes_before"] for q in quantized.values())
        after = sum(q["bytes_after"] for q in quantized.values())
        weights = sum(q["quantized_weights"] for q in quantized.values())
        schemes = ", ".join(f"{n} {q['scheme']}" for n, q in quantized.items())
        line = f"{schemes}: {weights} weights, {before / 1e6:.1f} → {after / 1e6:.1f} MB"
        if any("memory_bytes_after" in q for q in quantized.values()):
            memory = [
                sum(q.get(f"memory_bytes_{k}", 0) for q in quantized.values())
                for k in ("before", "after")
            ]
            line += f" on disk, {memory[0] / 1e6:.1f} → {memory[1] / 1e6:.1f} MB in memory"
        summary.add_row("quantization", line)
    if manifest.end_to_end:
        summary.add_row("end to end", _describe_end_to_end(manifest.end_to_end))
    size = sum(record.size for record in manifest.files.values())
    summary.add_row("files", f"{len(manifest.files)} files, {size / 1e6:.1f} MB")
    facts = manifest.build
    peak_gb = facts["peak_rss_bytes"] / 1e9
    summary.add_row(
        "built",
        f"{facts['created']} in {facts['seconds']} s, peak RSS {peak_gb:.2f} GB, "
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
        checks = (
            "\n".join(
                f"{k}: max-abs {m['max_abs']:.2e}, cos {m['min_cosine']:.6f}"
                + (f", SQNR {m['sqnr_db']:.1f} dB" if m.get("sqnr_db") is not None else "")
                + (f", top-1 {m['top1_agreement']:.3f}" if "top1_agreement" in m else "")
                for k, m in record.validation.get("outputs", {}).items()
            )
            or f"not run: {record.validation.get('not_run', 'no record')}"
        )
        used = _describe_runtime(record.runtime)
        here = [_describe_runtime(probed[name])] if probe else []
        table.add_row(*cells(name, inputs, outputs, checks, used, *here))
    out.print(table)


def _describe_end_to_end(record: dict[str, Any]) -> str:
    """The artifact's pipeline against torch fp32 on real data, as the build measured it."""
    if "not_run" in record:
        return f"not run: {record['not_run']}"
    if "psnr_db" in record:
        psnr = ", ".join("identical" if p is None else f"{p:.1f} dB" for p in record["psnr_db"])
        ssim = ", ".join(f"{s:.3f}" for s in record["ssim"])
        return f"{len(record['prompts'])} prompt(s): PSNR {psnr}; SSIM {ssim}"
    text = f"{record['images']} images of {record['data']}"
    if "accuracy" in record:
        text += (
            f": top-1 {100 * record['accuracy']:.2f} % (torch fp32 "
            f"{100 * record['reference_accuracy']:.2f} %, drop {record['accuracy_drop']:.2f})"
        )
    return text


def _describe_runtime(facts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in facts.items() if k != "runtime")


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
def verify(artifact: Path) -> None:
    """Re-hash every file of ARTIFACT (a directory, or a bundle) against its manifest."""
    from modelkiln.artifact import find_problems, read_manifest
    from modelkiln.packaging import BUNDLE_MANIFEST, is_bundle, verify_bundle

    if is_bundle(artifact):
        with progress_display() as progress, progress.task(f"checking {artifact.name}"):
            bundle = verify_bundle(artifact)
        out.print(
            f"[green]ok[/] {escape(str(artifact))}: {len(bundle.files)} files match "
            f"{BUNDLE_MANIFEST} ({bundle.format} for {bundle.target})"
        )
        return
    manifest = read_manifest(artifact)
    with progress_display() as progress, progress.task(f"hashing {len(manifest.files)} files"):
        problems = find_problems(artifact, manifest, hashes=True)
    if problems:
        for problem in problems:
            err.print(f"[red]✗[/] {escape(problem)}")
        count = len(problems)
        err.print(f"[red]error:[/] {escape(str(artifact))} failed verification: {count} problem(s)")
        sys.exit(1)
    out.print(f"[green]ok[/] {escape(str(artifact))}: {len(manifest.files)} files match kiln.json")


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
def validate(artifact: Path) -> None:
    """Run the validation a build could not (Core ML built off macOS) against the torch
    outputs saved in ARTIFACT; exit 1 when a component misses the profile's tolerance."""
    from modelkiln.loading import open_artifact
    from modelkiln.validate import check_pending

    loaded = open_artifact(artifact, verify=True)
    pending = {
        name: record.validation
        for name, record in loaded.manifest.components.items()
        if record.validation.get("passed") is None and "reference" in record.validation
    }
    if not pending:
        out.print(f"[green]ok[/] {escape(str(artifact))}: every component was validated at build")
        return
    failed = 0
    for name, record in pending.items():
        try:
            with loaded.session(name) as session:
                result = check_pending(session, record, loaded.root)
        except ValidationError as error:
            err.print(f"[red]✗[/] {escape(str(error))}")
            failed += 1
            continue
        metrics = ", ".join(
            f"{output}: max-abs {m['max_abs']:.2e}, cosine {m['min_cosine']:.6f}"
            for output, m in result["outputs"].items()
        )
        out.print(f"[green]✓[/] {name}: {metrics}", highlight=False)
    if failed:
        err.print(f"[red]error:[/] {failed} of {len(pending)} component(s) missed their tolerance")
        sys.exit(1)


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "-t",
    "--target",
    required=True,
    type=click.Choice(list(TARGETS)),
    help="Where the bundle runs; it decides which artifact formats are accepted.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="The bundle: BUNDLE.tar.gz or BUNDLE.zip.",
)
def package(artifact: Path, target: str, output: Path) -> None:
    """Pack what ARTIFACT needs to run on TARGET into one file, checked by `kiln verify`."""
    from modelkiln.packaging import package as package_artifact

    with progress_display() as progress:
        bundle = package_artifact(artifact, target, output, progress=progress)
    if bundle.left_out:
        err.print(f"  left out: {', '.join(bundle.left_out)}", markup=False, highlight=False)
    out.print(
        f"[green]packaged[/] {escape(str(bundle.path))} for {target}: "
        f"{len(bundle.manifest.files)} files, {bundle.size / 1e6:.1f} MB"
    )


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def env(as_json: bool) -> None:
    """Versions, available runtimes and CPU features (AMX, AVX-512, ...)."""
    from modelkiln.env import environment_report

    report = environment_report()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    host = report["host"]
    cpu = host["cpu"]
    out.print(
        f"[bold]{cpu['model']}[/], {cpu['usable_cores']} usable of {cpu['logical_cores']} "
        f"cores; python {host['python']} on {host['platform']}"
    )
    out.print(f"CPU features: {', '.join(cpu['features']) or 'none of interest'}")
    runtimes = Table("runtime", "installed", "version", "formats", "pip extra")
    for runtime in report["runtimes"]:
        installed = Text("yes", "green") if runtime["available"] else Text("no", "red")
        if runtime["available"] and runtime.get("cannot_run"):
            installed = Text(f"yes, cannot run here: {runtime['cannot_run']}", "yellow")
        runtimes.add_row(
            *cells(
                runtime["name"],
                installed,
                runtime["version"] or "",
                ", ".join(runtime["formats"]),
                f"modelkiln[{runtime['extra']}]",
            )
        )
    out.print(runtimes)
    if report["openvino_devices"]:
        for device, capabilities in report["openvino_devices"].items():
            out.print(f"OpenVINO {device}: {', '.join(capabilities)}")
    libraries = Table("library", "version")
    for name, version in report["libraries"].items():
        libraries.add_row(*cells(name, version))
    out.print(libraries)


@cli.command()
@click.option(
    "-w",
    "--work-dir",
    default=Path("artifacts/demo"),
    show_default=True,
    type=click.Path(path_type=Path),
)
@click.option(
    "--runs", default=100, show_default=True, type=int, help="Timed batch-1 runs per backend."
)
@THREADS_OPTION
def demo(work_dir: Path, runs: int, threads: int | None) -> None:
    """Train (or reuse) a ViT on scikit-learn's digits, build it for every CPU backend, compare."""
    from modelkiln.demo import run_demo

    with progress_display() as progress:
        result = run_demo(work_dir, runs=runs, threads=threads, progress=progress)
    table = Table(
        "backend",
        "profile",
        "top-1",
        "agrees w/ torch",
        "p50 ms",
        "p90 ms",
        "vs torch",
        "MB",
        title=f"digits ViT: {result.test_images} held-out images, batch-1 latency",
    )
    reference = result.reference
    for row in result.rows:
        table.add_row(
            *cells(
                row.backend,
                row.profile,
                f"{row.accuracy:.2f} %",
                f"{row.agreement:.2f} %",
                f"{row.median_ms:.3f}",
                f"{row.p90_ms:.3f}",
                f"{reference.median_ms / row.median_ms:.2f}×",
                f"{row.size_mb:.2f}",
            )
        )
    out.print(table)
    from modelkiln.env import cpu_info

    cpu = cpu_info()
    out.print(
        f"{cpu['model']}, threads: {threads or 'runtime default'}; model: {result.model_dir}; "
        f"artifacts: {work_dir}"
    )
    out.print("[green]every backend is within 0.5 points of PyTorch's accuracy[/]")


# --- bench ----------------------------------------------------------------------------------


def _batch_sizes(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        sizes = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(size < 1 for size in sizes):
        raise click.BadParameter(f"'{value}': give positive integers separated by commas, e.g. 1,8")
    return sizes


def _read_prompts(path: Path | None) -> tuple[str, ...] | None:
    if path is None:
        return None
    prompts = tuple(
        line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    )
    if not prompts:
        raise InputError(f"--prompts {path} holds no prompts: write one prompt per line")
    return prompts


@cli.command()
@click.argument("artifacts", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for report.json, report.md and the plots.",
)
@click.option(
    "--matrix",
    type=click.Path(path_type=Path),
    help="Build (if needed) and bench the sources x profiles of this TOML file.",
)
@RUNTIME_OPTION
@click.option(
    "--batch-size",
    "batch_sizes",
    callback=_batch_sizes,
    help="Batch sizes, comma-separated.  [default: 1]",
)
@click.option("--warmup", type=click.IntRange(min=0), help="Untimed calls first.  [default: 3]")
@click.option(
    "--runs", type=click.IntRange(min=1), help="Timed calls per batch size.  [default: 20]"
)
@click.option(
    "--duration",
    "duration_s",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds of timed calls per batch size, instead of --runs.",
)
@THREADS_OPTION
@click.option("--data", help='Image folder (ImageFolder layout: top-1/top-5) or "digits".')
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Diffusion: a text file, one prompt per line (PSNR/SSIM vs torch fp32).",
)
@click.option(
    "--steps", type=click.IntRange(min=1), help="Denoising steps per image.  [default: 4]"
)
@click.option(
    "--isolate/--no-isolate",
    default=None,
    help="Measure each artifact in its own process (own memory and threads).  [default: isolate]",
)
@click.option("--reference", help="Load the torch reference from here instead of the source.")
@click.option("--no-reference", is_flag=True, help="Skip the torch reference (no agreement).")
def bench(
    artifacts: tuple[Path, ...],
    output: Path,
    matrix: Path | None,
    runtime: str | None,
    batch_sizes: tuple[int, ...] | None,
    warmup: int | None,
    runs: int | None,
    duration_s: float | None,
    threads: int | None,
    data: str | None,
    prompts_file: Path | None,
    steps: int | None,
    isolate: bool | None,
    reference: str | None,
    no_reference: bool,
) -> None:
    """Measure built artifacts: latency, throughput, memory, size and accuracy.

    Writes OUTPUT/report.json (schema: modelkiln/bench/report.schema.json), report.md and
    PNG plots. Gate CI on it with `kiln compare BASELINE.json CURRENT.json`.
    """
    from modelkiln.bench.harness import run
    from modelkiln.bench.matrix import build_matrix, read_matrix
    from modelkiln.bench.settings import BenchSettings

    if bool(artifacts) == bool(matrix):
        raise click.UsageError("give artifact directories or --matrix FILE (one of the two)")
    given: dict[str, Any] = {
        "batch_sizes": batch_sizes,
        "warmup": warmup,
        "runs": runs,
        "duration_s": duration_s,
        "threads": threads,
        "runtime": runtime,
        "data": data,
        "prompts": _read_prompts(prompts_file),
        "steps": steps,
        "isolate": isolate,
        "reference": reference,
        "use_reference": False if no_reference else None,
    }
    chosen = {key: value for key, value in given.items() if value is not None}
    with progress_display() as progress:
        if matrix is not None:
            grid = read_matrix(matrix)
            chosen = {**grid.bench, **chosen}
            artifacts = tuple(build_matrix(grid, progress))
        settings = BenchSettings(**chosen)
        report = run(artifacts, settings, output=output, progress=progress)
    _print_bench(report)
    out.print(f"report: {output / 'report.json'}, {output / 'report.md'} and plots in {output}")


def _print_bench(report: dict[str, Any]) -> None:
    table = Table(title=f"{report['machine']['cpu']['model']}")
    for column in (
        "artifact",
        "runtime",
        "batch",
        "p50",
        "p90",
        "p99",
        "throughput",
        "peak RSS",
        "size",
        "accuracy",
    ):
        left = column in ("artifact", "runtime")
        # Artifact names are what the reader looks for: wrap them rather than cut them.
        table.add_column(column, justify="left" if left else "right", overflow="fold")
    for entry in report["entries"]:
        latency = entry["latency"]
        accuracy = entry["accuracy"]
        score = "—"
        if accuracy is not None:
            value = accuracy["score"]
            unit = " dB" if accuracy["metric"] == "psnr_db" else " %"
            score = "identical" if value is None else f"{value:.2f}{unit} ({accuracy['metric']})"
        rss = entry["peak_rss_bytes"]
        table.add_row(
            *cells(
                entry["name"],
                entry["runtime"],
                str(entry["batch_size"]),
                *(f"{1e3 * latency[k]:.1f} ms" for k in ("p50_s", "p90_s", "p99_s")),
                f"{entry['throughput_per_s']:.1f}/s",
                "—" if rss is None else f"{rss / 1e6:.0f} MB",
                f"{entry['size_bytes'] / 1e6:.1f} MB",
                score,
            )
        )
    out.print(table)


# --- compare --------------------------------------------------------------------------------


class Percent(click.ParamType):
    """'10%' or '10' -> 0.10: the bounds of kiln compare."""

    name = "percent"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):  # already converted (click may convert twice)
            return value
        text = str(value).strip()
        try:
            number = float(text.removesuffix("%").strip())
        except ValueError:
            self.fail(f"{value!r} is not a percentage (write e.g. 10% or 10)", param, ctx)
        if not number >= 0 or number == float("inf"):
            self.fail(f"{value!r} must be a finite percentage >= 0", param, ctx)
        return number / 100


STATUS_STYLES = {
    "regressed": "bold red",
    "improved": "green",
    "noise": "yellow",
    "not comparable": "dim",
    "new": "cyan",
    "missing": "magenta",
}


@cli.command()
@click.argument("baseline", type=click.Path(path_type=Path))
@click.argument("current", type=click.Path(path_type=Path))
@click.option(
    "--max-latency-regression",
    type=Percent(),
    default="10%",
    show_default=True,
    help="p50 latency growth allowed.",
)
@click.option(
    "--max-throughput-drop", type=Percent(), default="10%", show_default=True, help="Drop allowed."
)
@click.option(
    "--max-accuracy-drop",
    type=click.FloatRange(min=0),
    default=0.5,
    show_default=True,
    help="Score drop allowed: percentage points (dB for PSNR).",
)
@click.option(
    "--max-memory-growth", type=Percent(), default="20%", show_default=True, help="Peak RSS growth."
)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.05,
    show_default=True,
    help="Significance level of the latency test (one-sided Mann-Whitney U).",
)
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), help="Write JUnit XML.")
@click.option(
    "--markdown", type=click.Path(dir_okay=False, path_type=Path), help="Write a Markdown summary."
)
@click.option(
    "--allow-different-machine", is_flag=True, help="Compare reports from different machines."
)
def compare(
    baseline: Path,
    current: Path,
    max_latency_regression: float,
    max_throughput_drop: float,
    max_accuracy_drop: float,
    max_memory_growth: float,
    alpha: float,
    junit: Path | None,
    markdown: Path | None,
    allow_different_machine: bool,
) -> None:
    """Compare CURRENT bench report with BASELINE: exit 1 on a regression, 2 on unusable input."""
    from modelkiln.bench.compare import COLUMNS, Bounds, compare_files
    from modelkiln.errors import ReportError

    bounds = Bounds(
        max_latency_regression=max_latency_regression,
        max_throughput_drop=max_throughput_drop,
        max_accuracy_drop=max_accuracy_drop,
        max_memory_growth=max_memory_growth,
        alpha=alpha,
    )
    try:
        comparison = compare_files(
            baseline, current, bounds, allow_different_machine=allow_different_machine
        )
    except ReportError as error:
        # Unusable input is not a regression: CI tells the two apart by exit code.
        err.print(f"[red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    if comparison.different_machine:
        err.print(f"[yellow]warning:[/] {escape(comparison.machine_warning)}", soft_wrap=True)
    # One table per entry key, the key as its title: a key column would take half the width.
    by_key: dict[str, list[Any]] = {}
    for row in comparison.compared:
        by_key.setdefault(row.key, []).append(row)
    for key, rows in by_key.items():
        table = Table(*COLUMNS, title=Text(key, "bold"), title_justify="left")
        for row in rows:
            *texts, status, note = row.cells()
            styled = Text(status, STATUS_STYLES.get(status, ""))
            table.add_row(*cells(*texts, styled, note))
        out.print(table)
    for label, keys, style in (
        ("new (only in current)", comparison.new, "cyan"),
        ("missing (only in baseline)", comparison.missing, "magenta"),
    ):
        for key in keys:
            out.print(Text.assemble((label, style), f": {key}"))
    for path, write in (
        (junit, comparison.write_junit),
        (markdown, lambda p: p.write_text(comparison.to_markdown(), encoding="utf-8")),
    ):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
            out.print(f"[green]wrote[/] {escape(str(path))}")
    style = "bold red" if comparison.failed else "bold green"
    out.print(Text(comparison.verdict, style))
    if comparison.failed:
        sys.exit(1)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in args)
    if not verbose:
        # transformers logs config chatter through its own handler; the CLI owns the terminal.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not sys.stdout.isatty():
        # Piped output (CI logs, `| less`) is not squeezed into rich's 80-column default.
        os.environ.setdefault("COLUMNS", "120")
    try:
        cli.main(args=args, prog_name="kiln", standalone_mode=True)
    except KilnError as error:
        if verbose:
            err.print_exception()
        err.print(f"[red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        sys.exit(130)
    except Exception as error:  # a bug: still one line, the traceback with -v
        if verbose:
            err.print_exception()
        err.print(
            f"[red]internal error:[/] {type(error).__name__}: {escape(str(error))} "
            "(run with -v for the traceback and please report it)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
