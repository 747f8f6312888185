"""`kiln tune`: the fastest build of a model inside a quality budget on this machine."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from modelkiln.cli.console import THREADS_OPTION, cells, err, out, progress_display
from modelkiln.cli.exit_codes import CHECK_FAILED
from modelkiln.cli.jsonout import JSON_OPTION, emit_json
from modelkiln.cli.measure import read_prompts


@click.command()
@click.argument("source")
@click.option(
    "--budget",
    required=True,
    help="The quality a faster build may cost, as the build's end-to-end gate: "
    "top1-drop=POINTS (classifiers, with --data), psnr=DB and/or ssim=S (generators, "
    "against the fp32 torch pipeline's images), cosine=C; comma-separated.",
)
@click.option(
    "--target",
    "targets",
    multiple=True,
    help="Runtime to search (onnxruntime, openvino, executorch, torch, ...); repeat for "
    "several.  [default: auto, every runtime installed that runs here]",
)
@click.option(
    "-p",
    "--profile",
    "profiles",
    multiple=True,
    help="Start from these profiles instead of every bundled one of the family; repeat.",
)
@click.option(
    "--bundled-only",
    is_flag=True,
    help="Measure the starting profiles as they are, without their one-knob variants.",
)
@click.option("--data", help='Labelled images for a top-1 budget: an ImageFolder or "digits".')
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Generators: a text file, one prompt per line.  [default: each profile's own]",
)
@click.option(
    "--steps", type=click.IntRange(1, 1000), help="Denoising steps per image (gate and timing)."
)
@click.option(
    "--batch-size", default=1, show_default=True, type=click.IntRange(1), help="Images per call."
)
@click.option(
    "--rounds", default=5, show_default=True, type=click.IntRange(1), help="Timing rounds."
)
@THREADS_OPTION
@click.option(
    "--work",
    default=Path("artifacts/tune"),
    show_default=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Where the candidates' artifacts, the build cache and the results go.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The winning profile file.  [default: WORK/tuned.toml]",
)
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override for every candidate."
)
@JSON_OPTION
def tune(
    source: str,
    budget: str,
    targets: tuple[str, ...],
    profiles: tuple[str, ...],
    bundled_only: bool,
    data: str | None,
    prompts_file: Path | None,
    steps: int | None,
    batch_size: int,
    rounds: int,
    threads: int | None,
    work: Path,
    output: Path | None,
    overrides: tuple[str, ...],
    as_json: bool,
) -> None:
    """Build SOURCE with every candidate profile under --budget, time the ones inside it
    interleaved, and write the fastest as a profile (WORK/tune.md lists what was tried)."""
    from modelkiln.tune import TuneSettings, parse_budget
    from modelkiln.tune import tune as run_tune
    from modelkiln.tune.tuner import outcome_text, size_text

    settings = TuneSettings(
        budget=parse_budget(budget),
        data=data,
        prompts=read_prompts(prompts_file) or (),
        steps=steps,
        batch=batch_size,
        threads=threads,
        rounds=rounds,
        overrides=overrides,
    )
    runtimes = None if not targets or "auto" in targets else list(targets)
    with progress_display() as progress:
        result = run_tune(
            source,
            settings,
            work,
            runtimes=runtimes,
            profiles=profiles,
            wide=not bundled_only,
            profile_out=output,
            progress=progress,
        )
    if as_json:
        emit_json(result.to_json())
    else:
        columns = ("candidate", "status", "quality, or why not", "size", "latency")
        table = Table(*columns, title=result.machine)
        for tried in result.ranked():
            latency = "" if tried.latency_s is None else f"{tried.latency_s * 1000:.1f} ms"
            winner = tried is result.winner
            label = f"{tried.candidate.label} (winner)" if winner else tried.candidate.label
            row = (label, tried.status, outcome_text(tried), size_text(tried), latency)
            table.add_row(*cells(*row))
        out.print(table)
        out.print(f"results: {work / 'tune.md'}")
        if result.profile_file is not None:
            out.print(f"winning profile: {result.profile_file}")
    if result.winner is None:
        err.print(
            f"[red]no candidate is inside the budget {settings.budget.text}[/]: loosen "
            "--budget, or add profiles (--profile) with milder schemes"
        )
        raise SystemExit(CHECK_FAILED)
