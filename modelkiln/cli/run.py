"""`kiln classify`, `kiln embed`, `kiln generate`: running an artifact's pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from modelkiln.cli.console import (
    BATCH_OPTION,
    DEVICE_OPTION,
    MAX_PIXELS_OPTION,
    RUNTIME_OPTION,
    THREADS_OPTION,
    cells,
    expand_images,
    out,
)
from modelkiln.cli.jsonout import JSON_OPTION, emit_json
from modelkiln.errors import InputError
from modelkiln.outputs import atomic_file, check_writable


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option(
    "-k",
    "--top-k",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Predictions per image, best first (at most the model's number of labels).",
)
@BATCH_OPTION
@JSON_OPTION
@RUNTIME_OPTION
@THREADS_OPTION
@DEVICE_OPTION
@MAX_PIXELS_OPTION
@click.option(
    "--labels",
    help='Zero-shot (a CLIP artifact): the candidate labels, comma-separated ("a cat,a dog").',
)
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
    labels: str | None,
) -> None:
    """Classify IMAGES (files or directories) with an image-classification ARTIFACT, or
    with a zero-shot CLIP ARTIFACT against --labels."""
    from modelkiln.loading import load
    from modelkiln.pipelines.classification import ImageClassificationPipeline
    from modelkiln.pipelines.zero_shot import ZeroShotImageClassificationPipeline

    paths = expand_images(images)
    with load(artifact, runtime=runtime, threads=threads, device=device) as pipeline:
        settings: dict[str, Any] = {
            "top_k": top_k,
            "batch_size": batch_size,
            "max_pixels": max_pixels or None,
        }
        if isinstance(pipeline, ZeroShotImageClassificationPipeline):
            if labels is None:
                raise InputError(
                    'this artifact classifies against labels you give: pass --labels "a cat,a dog"'
                )
            results = pipeline(paths, labels=labels.split(","), **settings)
        else:
            _require_task(pipeline, ImageClassificationPipeline)
            if labels is not None:
                raise InputError(
                    "--labels is for zero-shot (CLIP) artifacts; this classifier has its own "
                    "labels: drop --labels"
                )
            results = pipeline(paths, **settings)
    if as_json:
        payload = [
            {"image": path, "predictions": [p.__dict__ for p in predictions]}
            for path, predictions in zip(paths, results, strict=True)
        ]
        emit_json(payload)
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


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="The .npy file to write (.npy is added to a name without it).",
)
@click.option(
    "--pooling",
    type=click.Choice(["auto", "cls", "mean", "pooled"]),
    default="auto",
    show_default=True,
    help="How a vector is made from the tokens: the class token, their mean, the model's "
    "pooled output, or auto (what the model was trained with).",
)
@click.option("--layer", type=int, help="Embed the tokens of this transformer block (1-based).")
@click.option("--no-normalize", is_flag=True, help="Keep raw vectors (default: L2-normalised).")
@BATCH_OPTION
@RUNTIME_OPTION
@THREADS_OPTION
@DEVICE_OPTION
@MAX_PIXELS_OPTION
@JSON_OPTION
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
    as_json: bool,
) -> None:
    """Embed IMAGES with an image-feature-extraction ARTIFACT into a (N, D) .npy file."""
    import numpy as np

    from modelkiln.loading import load
    from modelkiln.pipelines.embedding import ImageEmbeddingPipeline

    # np.save's own rule: a name without .npy gets it; said below as the file written.
    if output.suffix != ".npy":
        output = output.with_name(output.name + ".npy")
    check_writable(output, folder=False)
    paths = expand_images(images)
    with load(artifact, runtime=runtime, threads=threads, device=device) as pipeline:
        _require_task(pipeline, ImageEmbeddingPipeline)
        vectors = pipeline(
            paths,
            pooling=pooling,
            layer=layer,
            normalize=not no_normalize,
            batch_size=batch_size,
            max_pixels=max_pixels or None,
        )
    with atomic_file(output) as staged, staged.open("wb") as file:
        np.save(file, vectors)
    if as_json:
        emit_json(
            {
                "files": [str(output)],
                "images": paths,  # row i is the vector of images[i]
                "shape": list(vectors.shape),
                "dtype": str(vectors.dtype),
                "normalized": not no_normalize,
            }
        )
        return
    out.print(
        f"[green]wrote[/] {escape(str(output))}: {vectors.shape[0]} × {vectors.shape[1]} float32"
    )


# The command that runs each task's artifacts.
COMMANDS = {
    "image-classification": "kiln classify",
    "image-feature-extraction": "kiln embed",
    "zero-shot-image-classification": 'kiln classify --labels "a cat,a dog"',
}


def _require_task(pipeline: Any, expected: type) -> None:
    if isinstance(pipeline, expected):
        return
    from modelkiln.pipelines.generation import ImageGenerator

    task: str = expected.TASK  # type: ignore[attr-defined]
    if isinstance(pipeline, ImageGenerator):
        # A diffusion model cannot be rebuilt for classification: no rebuild hint.
        raise InputError(
            f"this artifact generates images ({pipeline.task}); it cannot do {task}: "
            "use `kiln generate`"
        )
    command = COMMANDS.get(pipeline.task, "modelkiln.load() in Python")
    raise InputError(
        f"this artifact was built for {pipeline.task}, not {task}; use `{command}`, "
        f"or rebuild with --set model.task={task}"
    )
