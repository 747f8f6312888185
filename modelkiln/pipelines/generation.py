"""Image generators: text-to-image, image-to-image and inpainting, whatever the family.

`kiln generate` and every generic user (evaluation, calibration, benchmarks) speak to this
interface; a family's pipeline (pipelines/diffusion.py for SD and SDXL) implements it.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from modelkiln.errors import InputError, UnsupportedError
from modelkiln.evaluation.end_to_end import GeneratedImages, Outputs, PromptData, RealData
from modelkiln.pipelines.base import Feeds, Pipeline
from modelkiln.progress import NullProgress, Progress
from modelkiln.runtimes.base import Session

if TYPE_CHECKING:
    from pathlib import Path

    from PIL import Image

    from modelkiln.images import ImageInput
    from modelkiln.models.base import LoadedModel
    from modelkiln.profiles import Profile

# A fixed prompt: every artifact a benchmark times generates the same thing.
BENCH_PROMPT = "a photograph of an astronaut riding a horse"


class ImageGenerator(Pipeline):
    @abstractmethod
    def text_to_image(self, prompt: str | Sequence[str], **settings: Any) -> list[Image.Image]:
        """Images from prompts (steps, guidance, seed, negative_prompt, ...)."""

    @abstractmethod
    def image_to_image(
        self,
        prompt: str | Sequence[str],
        image: ImageInput,
        *,
        strength: float | None = None,
        **settings: Any,
    ) -> list[Image.Image]:
        """`image` changed towards the prompts, by `strength` (default: the family's)."""

    @abstractmethod
    def inpaint(
        self,
        prompt: str | Sequence[str],
        image: ImageInput,
        mask: ImageInput,
        *,
        strength: float | None = None,
        **settings: Any,
    ) -> list[Image.Image]:
        """`image` repainted where `mask` is white (strength: default the family's)."""

    def set_loras(self, loras: Sequence[tuple[str | Path, float]]) -> None:
        """Apply LoRAs (path, scale) to the calls that follow without a rebuild, where the
        artifact has run-time LoRA slots; this family's have none."""
        raise UnsupportedError(
            f"{type(self).__name__} has no run-time LoRA slots (SD 1.x/2.x and SDXL artifacts "
            "built with [runtime_lora] have); fuse LoRAs at build (kiln build --lora)"
        )

    @property
    @abstractmethod
    def size(self) -> tuple[int, int]:
        """The (height, width) the artifact was built for."""

    @property
    def inpainting_only(self) -> bool:
        """A model that can only inpaint (SD's 9-channel inpainting UNet)."""
        return False

    def generate(self, prompts: list[str], *, seed: int, steps: int) -> list[Image.Image]:
        """One image per prompt in one batched call: how evaluation, calibration and benchmarks
        generate. A model that only inpaints repaints the middle of a fixed gradient."""
        if not self.inpainting_only:
            return list(self.text_to_image(prompts, steps=steps, seed=seed))
        from PIL import Image

        height, width = self.size
        ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
        shade = np.linspace(255, 0, height, dtype=np.float32)[:, None, None]
        image = Image.fromarray(((ramp + shade) / 2 + np.zeros((1, 1, 3))).astype(np.uint8))
        mask = np.zeros((height, width), np.uint8)
        mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
        images = self.inpaint(
            prompts, image, Image.fromarray(mask), strength=1.0, steps=steps, seed=seed
        )
        return list(images)

    def exercise(self, prompt: str, *, seed: int, steps: int) -> Image.Image:
        """One generation that runs every component on real inputs (calibration records
        them); a family whose generation skips a component (an encoder) runs it here too."""
        return self.generate([prompt], seed=seed, steps=steps)[0]

    def evaluate(self, data: RealData, progress: Progress | None = None) -> Outputs:
        if not isinstance(data, PromptData):
            raise InputError(f"a {self.task} model generates from prompts, not images")
        progress = progress or NullProgress()
        images = []
        description = f"images for {len(data.prompts)} prompts ({data.steps} steps)"
        with progress.task(description, total=len(data.prompts)) as advance:
            for index, prompt in enumerate(data.prompts):
                images += self.generate([prompt], seed=data.seed + index, steps=data.steps)
                advance(1)
        return GeneratedImages(images)

    @classmethod
    def calibration_feeds(
        cls, loaded: LoadedModel, profile: Profile, components: list[str], progress: Progress
    ) -> dict[str, Feeds]:
        """What each of `components` received while the torch pipeline generated from the
        calibration prompts (`calibration.size` runs, cycling through them), as the artifact
        will run it (its approximations made: DeepCache's shallow UNet gets inputs too)."""
        from modelkiln.reference import RecordingSession, reference_pipeline

        settings = profile.calibration
        recorders: dict[str, RecordingSession] = {}

        def record(session: Session) -> Session:
            if session.name not in components:
                return session
            recorders[session.name] = RecordingSession(session)
            return recorders[session.name]

        prompts = [settings.prompts[i % len(settings.prompts)] for i in range(settings.size)]
        description = f"calibrating on {len(prompts)} prompts ({settings.steps} steps each)"
        with (
            reference_pipeline(loaded, profile, wrap=record, exact=False) as pipeline,
            progress.task(description, total=len(prompts)) as advance,
        ):
            assert isinstance(pipeline, ImageGenerator)  # the class this method belongs to
            for index, prompt in enumerate(prompts):
                pipeline.exercise(prompt, seed=settings.seed + index, steps=settings.steps)
                advance(1)
        return {name: recorder.feeds for name, recorder in recorders.items()}

    def bench_call(self, batch_size: int, steps: int) -> Callable[[], object]:
        prompts = [BENCH_PROMPT] * batch_size
        return lambda: self.generate(prompts, seed=0, steps=steps)


__all__ = ["BENCH_PROMPT", "ImageGenerator"]
