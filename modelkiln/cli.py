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
from modelkiln.errors import InputError, KilnError

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
        checks = "\n".join(
            f"{k}: max-abs {m['max_abs']:.2e}, cos {m['min_cosine']:.6f}"
            + (f", SQNR {m['sqnr_db']:.1f} dB" if m.get("sqnr_db") is not None else "")
            + (f", top-1 {m['top1_agreement']:.3f}" if "top1_agreement" in m else "")
            for k, m in record.validation.get("outputs", {}).items()
        )
        used = _describe_runtime(record.runtime)
        here = [_describe_runtime(probed[name])] if probe else []
        table.add_row(*cells(name, inputs, outputs, checks, used, *here))
    out.print(table)


def _describe_end_to_end(record: dict[str, Any]) -> str:
    """The artifact's pipeline against torch fp32 on real data, as the build measured it."""
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
    """Re-hash every file of ARTIFACT against its manifest."""
    from modelkiln.artifact import find_problems, read_manifest

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
        runtimes.add_row(
            *cells(
                runtime["name"],
                Text("yes", "green") if runtime["available"] else Text("no", "red"),
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
