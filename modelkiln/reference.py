"""The source model as a pipeline on the torch runtime, before anything is exported.

Calibration runs it to collect real inputs of every component (a prompt becomes UNet inputs
at every denoising step), and the end-to-end quality gate compares an artifact's images or
predictions with it. It is the same pipeline code an artifact runs, over TorchModuleSessions
on the source modules: the only difference between the two is the export.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modelkiln.exporters.base import export_signature
from modelkiln.runtimes.base import Session
from modelkiln.runtimes.torch import TorchModuleSession

if TYPE_CHECKING:
    from modelkiln.models.base import LoadedModel
    from modelkiln.profiles import Profile


class RecordingSession(Session):
    """Passes every call through and keeps a copy of its feeds (the calibration data)."""

    def __init__(self, inner: Session) -> None:
        super().__init__(inner.name, inner.input_specs, inner.output_specs)
        self.inner = inner
        self.feeds: list[dict[str, np.ndarray]] = []

    @property
    def info(self) -> dict[str, Any]:
        return self.inner.info

    def _run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        self.feeds.append({name: np.array(value, copy=True) for name, value in feeds.items()})
        return self.inner.run(feeds, output_names)

    def close(self) -> None:
        self.inner.close()


@contextlib.contextmanager
def reference_pipeline(
    loaded: LoadedModel,
    profile: Profile,
    wrap: Callable[[Session], Session] = lambda session: session,
) -> Iterator[Any]:
    """The task's pipeline over the source's torch modules, at the profile's export shapes.

    Every component's module is in memory while it is open (SD-1.5: 4.3 GB fp32).
    """
    sessions: dict[str, Session] = {}
    try:
        for spec in loaded.components:
            inputs, outputs = export_signature(spec, profile.for_component(spec.name))
            module = spec.module()
            sessions[spec.name] = wrap(TorchModuleSession(module, spec.name, inputs, outputs))
        with tempfile.TemporaryDirectory(prefix="kiln-reference-") as scratch:
            yield _pipeline(loaded, sessions, Path(scratch))
    finally:
        for session in sessions.values():
            session.close()


def _pipeline(loaded: LoadedModel, sessions: dict[str, Session], scratch: Path) -> Any:
    from modelkiln.preprocess import ImagePreprocessor

    info = loaded.model_info
    if loaded.task in ("text-to-image", "inpainting"):
        from modelkiln.pipelines.diffusion import DiffusionPipeline, InpaintingPipeline

        # The pipeline reads model_index.json, tokenizers and the scheduler from its root.
        for name, content in loaded.config_files.items():
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            (scratch / name).write_bytes(content)
        configs = {spec.name: json.loads(spec.config_file or b"{}") for spec in loaded.components}
        cls = InpaintingPipeline if loaded.task == "inpainting" else DiffusionPipeline
        return cls(scratch, sessions, configs, info)
    (session,) = sessions.values()
    preprocessor = ImagePreprocessor.from_dict(info["preprocessing"])
    if loaded.task == "image-classification":
        from modelkiln.pipelines.classification import ImageClassificationPipeline

        return ImageClassificationPipeline(session, preprocessor, info["labels"])
    from modelkiln.pipelines.embedding import ImageEmbeddingPipeline

    return ImageEmbeddingPipeline(session, preprocessor, int(info["num_prefix_tokens"]))


def generate(pipeline: Any, prompt: str, *, seed: int, steps: int) -> Any:
    """One image from a prompt, the same way for the reference and an artifact."""
    return generate_images(pipeline, [prompt], seed=seed, steps=steps)[0]


def generate_images(pipeline: Any, prompts: list[str], *, seed: int, steps: int) -> list[Any]:
    """One image per prompt in one batched call (a benchmark's batch size).

    An inpainting UNet cannot run text-to-image: it repaints the middle of a fixed gradient.
    """
    if getattr(pipeline, "task", None) != "inpainting":
        return list(pipeline.text_to_image(prompts, steps=steps, seed=seed))
    from PIL import Image

    height, width = pipeline.size
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    shade = np.linspace(255, 0, height, dtype=np.float32)[:, None, None]
    image = Image.fromarray(((ramp + shade) / 2 + np.zeros((1, 1, 3))).astype(np.uint8))
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return list(
        pipeline.inpaint(
            prompts, image, Image.fromarray(mask), strength=1.0, steps=steps, seed=seed
        )
    )


__all__ = ["RecordingSession", "generate", "generate_images", "reference_pipeline"]
