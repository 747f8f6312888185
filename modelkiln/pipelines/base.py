"""What every pipeline is: Sessions in, a task's results out, the same class on every backend
and on the torch reference (reference.py builds it over the source's modules).

A family names its pipelines (ModelFamily.pipelines); kiln.json records which one an artifact
runs. Besides its task's entry points, a pipeline answers what generic code asks of it:
- `evaluate(data)`: its results on real data, scored against the reference's by
  modelkiln.evaluation (the build's quality gate, `kiln bench`);
- `calibration_feeds(...)`: real inputs of its components for calibrated schemes;
- `bench_call(batch_size, steps)` and `stages`: what `kiln bench` times.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self, cast

import numpy as np

from modelkiln.datasets import image_set
from modelkiln.errors import InputError
from modelkiln.evaluation.end_to_end import ImageData, Outputs, RealData, TensorOutputs, stack
from modelkiln.images import DEFAULT_MAX_PIXELS, ImageInput, load_images
from modelkiln.preprocess import ImagePreprocessor
from modelkiln.progress import NullProgress, Progress
from modelkiln.runtimes.base import Closeable, Session
from modelkiln.runtimes.on_demand import OnDemandSession, Residency

if TYPE_CHECKING:
    from modelkiln.loading import Artifact
    from modelkiln.models.base import LoadedModel
    from modelkiln.profiles import Profile

PIXEL_VALUES = "pixel_values"
# Images per call when a pipeline runs a whole data set (evaluation).
EVALUATION_BATCH = 16
Feeds = list[dict[str, np.ndarray]]
# The model_info key of what an artifact's pipeline does to run faster than the torch
# reference (e.g. guidance stopped early): the reference pipeline runs without them, so the
# build's end-to-end gate measures what they cost.
APPROXIMATIONS = "approximations"


@dataclass(frozen=True)
class PipelineParts:
    """What a pipeline is built from, whether an artifact or the torch reference holds it."""

    root: Path  # the configs beside the models (model_index.json, tokenizer/, ...)
    sessions: dict[str, Session]
    configs: dict[str, dict[str, Any]]  # component -> its config.json ({} where none)
    info: Mapping[str, Any]  # the family's facts (kiln.json model_info)
    task: str


class Pipeline(Closeable):
    """A pipeline is safe to share between threads, like its Sessions: what a call needs of
    its own (a diffusion scheduler, tokenizers) it gets per call."""

    # session name -> the stage `kiln bench` reports its calls as (default: the name).
    stages: ClassVar[Mapping[str, str]] = {}
    # Sessions that low_memory keeps resident beside the others (a small one the pipeline
    # alternates with a large one, which would otherwise reload at every switch).
    resident_apart: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, sessions: Mapping[str, Session], task: str) -> None:
        self.sessions = dict(sessions)
        self.task = task

    @classmethod
    @abstractmethod
    def from_parts(cls, parts: PipelineParts) -> Self:
        """The pipeline over `parts`' sessions."""

    @classmethod
    def from_artifact(
        cls,
        artifact: Artifact,
        runtime: str | None = None,
        *,
        low_memory: bool = False,
        **options: Any,
    ) -> Self:
        """Open every component of `artifact` (on `runtime`, with `options`); low_memory:
        each only while the pipeline calls it (runtimes/on_demand.py)."""
        sessions: dict[str, Session] = {}
        configs: dict[str, dict[str, Any]] = {}
        manifest = artifact.manifest
        residency = Residency()
        if low_memory:
            artifact.runtime(runtime)  # a runtime that cannot run it fails now, not later
        try:
            for name, record in manifest.components.items():
                if low_memory:
                    opener = partial(artifact.session, name, runtime, **options)
                    group = Residency() if name in cls.resident_apart else residency
                    sessions[name] = OnDemandSession(
                        opener, record.name, record.inputs, record.outputs, group
                    )
                else:
                    sessions[name] = artifact.session(name, runtime, **options)
                entry = artifact.root / record.entry
                config = (entry if entry.is_dir() else entry.parent) / "config.json"
                configs[name] = (
                    json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
                )
            info, task = manifest.model_info, manifest.task
            return cls.from_parts(PipelineParts(artifact.root, sessions, configs, info, task))
        except BaseException:
            # Whatever failed (a session, a tokenizer), the opened sessions are let go.
            for session in sessions.values():
                session.close()
            raise

    @abstractmethod
    def evaluate(self, data: RealData, progress: Progress | None = None) -> Outputs:
        """What the pipeline produces on real data (the kind its family takes)."""

    @classmethod
    @abstractmethod
    def calibration_feeds(
        cls, loaded: LoadedModel, profile: Profile, components: list[str], progress: Progress
    ) -> dict[str, Feeds]:
        """Real inputs of each of `components` from the profile's [calibration] data."""

    @abstractmethod
    def bench_call(self, batch_size: int, steps: int) -> Callable[[], object]:
        """One benchmark call of `batch_size` images (`steps` denoising steps where that
        applies), ready to time."""

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()


def as_image_list(images: ImageInput | Sequence[ImageInput]) -> tuple[list[ImageInput], bool]:
    """A list of images, and whether a single image (not a list) was given."""
    if isinstance(images, list | tuple):
        if not images:
            raise InputError("no images given")
        return list(images), False
    return [cast(ImageInput, images)], True


class ImagePipeline(Pipeline):
    """Owns one vision Session and its preprocessing; subclasses interpret the outputs."""

    def __init__(self, session: Session, preprocessor: ImagePreprocessor, task: str) -> None:
        super().__init__({session.name: session}, task)
        self.session = session
        self.preprocessor = preprocessor
        batch = session.input_specs[PIXEL_VALUES].shape[0]
        # A static-batch export accepts exactly that batch: short chunks are padded.
        self.fixed_batch = batch if isinstance(batch, int) else None

    def batches(
        self,
        images: list[ImageInput],
        outputs: list[str],
        batch_size: int,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Load, preprocess and run images chunk by chunk (memory stays bounded)."""
        if batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {batch_size}")
        step = self.fixed_batch or min(batch_size, self.session.max_batch or batch_size)
        for start in range(0, len(images), step):
            chunk = load_images(images[start : start + step], max_pixels=max_pixels)
            pixels = self.preprocessor(chunk)
            count = len(pixels)
            if self.fixed_batch and count < self.fixed_batch:
                padding = np.zeros((self.fixed_batch - count, *pixels.shape[1:]), pixels.dtype)
                pixels = np.concatenate([pixels, padding])
            results = self.session.run({PIXEL_VALUES: pixels}, outputs)
            yield {name: value[:count] for name, value in results.items()}

    def concatenated(
        self,
        images: ImageInput | Sequence[ImageInput],
        output: str,
        batch_size: int,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> np.ndarray:
        """One output for every image, run batch by batch: (number of images, ...)."""
        image_list, _ = as_image_list(images)
        parts = [out[output] for out in self.batches(image_list, [output], batch_size, max_pixels)]
        return np.concatenate(parts)

    def labels_for_evaluation(self) -> list[str] | None:
        """The class names its logits score (None: it does not classify)."""
        return None

    def evaluate(self, data: RealData, progress: Progress | None = None) -> Outputs:
        if not isinstance(data, ImageData):
            raise InputError(f"a {self.task} model runs on images, not prompts")
        names = list(self.session.output_specs)
        logits = frozenset(n for n, spec in self.session.output_specs.items() if spec.is_logits)
        progress = progress or NullProgress()
        with progress.task(f"{len(data.images)} images of {data.source}"):
            batches = list(self.batches(data.images.images, names, EVALUATION_BATCH))
        return TensorOutputs(stack(batches), logits, self.labels_for_evaluation())

    @classmethod
    def calibration_feeds(
        cls, loaded: LoadedModel, profile: Profile, components: list[str], progress: Progress
    ) -> dict[str, Feeds]:
        """Images from [calibration] data (a folder, or the digits set's training split),
        preprocessed as the artifact will preprocess them, `batch_size` per feed (the
        export's batch for a static one)."""
        settings = profile.calibration
        if settings.data is None:
            raise InputError("calibration from images needs [calibration] data")
        images = image_set(settings.data, "calibration.data", "train").subset(
            settings.size, settings.seed
        )
        preprocess = ImagePreprocessor.from_dict(loaded.model_info["preprocessing"])
        (spec,) = loaded.components
        (input_name,) = spec.inputs
        shapes = profile.shapes
        batch = shapes.batch_size if not shapes.dynamic_batch else settings.batch_size
        # A dynamic batch takes the last, smaller batch too; a static one only whole ones.
        stop = len(images) if shapes.dynamic_batch else len(images) - batch + 1
        if stop <= 0:
            raise InputError(
                f"calibration.data = '{settings.data}' has {len(images)} image(s), fewer than "
                f"the static export's batch of {batch}; add images, or build with "
                "shapes.dynamic_batch=true"
            )
        feeds: Feeds = []
        with progress.task(f"preprocessing {len(images)} calibration images") as advance:
            for start in range(0, stop, batch):
                chunk = images.images[start : start + batch]
                feeds.append({input_name: preprocess(load_images(chunk))})
                advance(len(chunk))
        return {name: feeds for name in components}

    def bench_call(self, batch_size: int, steps: int) -> Callable[[], object]:
        from PIL import Image

        fixed = self.fixed_batch
        if fixed is not None and batch_size != fixed:
            raise InputError(
                f"this artifact was built for a fixed batch of {fixed} (profile [shapes]); "
                f"bench it with --batch-size {fixed}, or rebuild it with a dynamic batch"
            )
        # A real preprocessed image, whatever size the profile's preprocessing makes.
        noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
        pixels = self.preprocessor([Image.fromarray(noise)])
        feed = {PIXEL_VALUES: np.repeat(pixels, batch_size, axis=0)}
        return lambda: self.session.run(feed)


def one_session(parts: PipelineParts) -> Session:
    """The only session of a one-component model."""
    (session,) = parts.sessions.values()
    return session


def preprocessor_of(parts: PipelineParts) -> ImagePreprocessor:
    return ImagePreprocessor.from_dict(parts.info["preprocessing"])


def run_padded(
    session: Session,
    feeds: dict[str, np.ndarray],
    unbatched: frozenset[str] = frozenset(),
) -> dict[str, np.ndarray]:
    """Run a session; a static batch axis gets the feed in chunks, the last one zero-padded,
    and a bounded dynamic one (Session.max_batch) in chunks of at most its bound.

    The batch is the first axis of every input of rank 2 or more but those in `unbatched`
    (Flux's token positions) and optional ones (a run-time LoRA's matrices); a one-element
    vector (a UNet's timestep, shape (1,)) is not batched.
    """
    batched = {
        name: spec.shape[0]
        for name, spec in session.input_specs.items()
        if len(spec.shape) >= 2 and name not in unbatched and not spec.optional and name in feeds
    }
    static = [size for size in batched.values() if isinstance(size, int)]
    size = static[0] if static else session.max_batch
    count = next((len(feeds[name]) for name in batched), 0)
    if size is None or (not static and count <= size):
        return session.run(feeds)
    parts = []
    for start in range(0, count, size):
        chunk = {}
        for name, value in feeds.items():
            if name in batched:
                piece = value[start : start + size]
                short = size - len(piece) if static else 0
                padding = np.zeros((short, *piece.shape[1:]), piece.dtype)
                chunk[name] = np.concatenate([piece, padding]) if short else piece
            else:
                chunk[name] = value
        taken = min(size, count - start)
        parts.append({k: v[:taken] for k, v in session.run(chunk).items()})
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
