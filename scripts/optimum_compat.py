"""Check that optimum's ORT/OV classes load our artifacts and agree with modelkiln.

optimum-onnx pins transformers < 4.58, which cannot live beside our pins, so this runs in two
environments (see `make compat`):

    .venv/bin/python scripts/optimum_compat.py build artifacts/compat
    .venv-optimum/bin/python scripts/optimum_compat.py check artifacts/compat

`build` writes tiny HF and timm ViTs (classification and feature extraction) as ONNX and
OpenVINO artifacts; `check` loads each with optimum and with modelkiln (torch-free, from this
source tree) on the same pixels and fails when the outputs differ by more than 1e-5.

Diffusion: `build` also writes tiny SD and SDXL artifacts (ONNX and OpenVINO) and the images
modelkiln generates from them (text-to-image and image-to-image, fixed seed); `check` loads
each artifact with optimum's ORT/OV diffusion pipelines, generates the same images and fails
when one differs from ours by less than 35 dB PSNR.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {
    # name: (tiny builder arguments, task)
    "hf-classifier": ("hf", {"classifier": True}),
    "hf-backbone": ("hf", {"classifier": False}),
    "timm-classifier": ("timm", {}),
}
PROFILES = ("vit-onnxruntime-fp32", "vit-openvino-fp32")
TOLERANCE = 1e-5
DIFFUSION = {"sd": "tiny_sd", "sdxl": "tiny_sdxl"}
DIFFUSION_FORMATS = ("onnxruntime-fp32", "openvino-fp32")
PROMPT = "a photo of a cat"
STEPS, SEED, GUIDANCE, STRENGTH = 3, 0, 7.5, 0.7
MIN_PSNR = 35.0


def init_image(size: int = 32) -> object:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def psnr(a: object, b: object) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    error = float(((x - y) ** 2).mean())
    return float("inf") if error == 0 else 10 * float(np.log10(255.0**2 / error))


def build(out: Path) -> None:
    import modelkiln
    from modelkiln.testing import tiny_hf_vit, tiny_timm_vit

    with tempfile.TemporaryDirectory() as scratch:
        for name, (library, kwargs) in CASES.items():
            maker = tiny_hf_vit if library == "hf" else tiny_timm_vit
            source = maker(Path(scratch) / name, **kwargs)
            for profile in PROFILES:
                artifact = modelkiln.build(source, profile, out / f"{name}-{profile}")
                print(f"built {artifact}")
        build_diffusion(out / "diffusion", Path(scratch))


def build_diffusion(out: Path, scratch: Path) -> None:
    """Artifacts, and the images modelkiln makes with them (what optimum must reproduce)."""
    import modelkiln
    from modelkiln import testing

    for family, maker in DIFFUSION.items():
        source = getattr(testing, maker)(scratch / family)
        for suffix in DIFFUSION_FORMATS:
            profile = f"{family}-{suffix}"
            artifact = modelkiln.build(source, profile, out / profile)
            with modelkiln.load(artifact) as pipeline:
                settings = {"steps": STEPS, "seed": SEED, "guidance": GUIDANCE}
                text = pipeline.text_to_image(PROMPT, **settings)[0]
                image = pipeline.image_to_image(PROMPT, init_image(), strength=STRENGTH, **settings)
            text.save(out / f"{profile}.text.png")
            image[0].save(out / f"{profile}.image.png")
            print(f"built {artifact} and its reference images")


def check_diffusion(out: Path) -> int:
    """optimum's pipelines on our artifacts, same seed and settings as modelkiln's images."""
    import torch
    from optimum.intel import OVPipelineForImage2Image, OVPipelineForText2Image
    from optimum.onnxruntime import ORTPipelineForImage2Image, ORTPipelineForText2Image
    from PIL import Image

    failures = 0
    for artifact in sorted(p for p in out.iterdir() if (p / "kiln.json").is_file()):
        onnx = "onnxruntime" in artifact.name
        for mode in ("text", "image"):
            if onnx:
                cls = ORTPipelineForText2Image if mode == "text" else ORTPipelineForImage2Image
                pipeline = cls.from_pretrained(artifact)
            else:
                cls = OVPipelineForText2Image if mode == "text" else OVPipelineForImage2Image
                pipeline = cls.from_pretrained(
                    artifact, ov_config={"INFERENCE_PRECISION_HINT": "f32"}
                )
            pipeline.set_progress_bar_config(disable=True)
            extra = {"image": init_image(), "strength": STRENGTH} if mode == "image" else {}
            theirs = pipeline(
                PROMPT,
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                generator=torch.Generator().manual_seed(SEED),
                **extra,
            ).images[0]
            ours = Image.open(out / f"{artifact.name}.{mode}.png")
            value = psnr(theirs, ours)
            verdict = "ok" if value >= MIN_PSNR else "MISMATCH"
            failures += verdict != "ok"
            print(f"{verdict:8} {artifact.name:40} {cls.__name__:32} {mode}: PSNR {value:.1f} dB")
    return failures


def check(out: Path) -> int:
    import torch
    from optimum.intel import OVModelForCustomTasks, OVModelForImageClassification
    from optimum.onnxruntime import ORTModelForCustomTasks, ORTModelForImageClassification

    import modelkiln

    pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    failures = 0
    for artifact in sorted(p for p in out.iterdir() if (p / "kiln.json").is_file()):
        ours = modelkiln.load(artifact).session.run({"pixel_values": pixels})
        onnx = "onnxruntime" in artifact.name
        classifier = "classifier" in artifact.name
        if onnx:
            cls = ORTModelForImageClassification if classifier else ORTModelForCustomTasks
            model = cls.from_pretrained(artifact)
        else:
            cls = OVModelForImageClassification if classifier else OVModelForCustomTasks
            model = cls.from_pretrained(artifact, ov_config={"INFERENCE_PRECISION_HINT": "f32"})
        theirs = model(pixel_values=torch.from_numpy(pixels))
        for name, value in ours.items():
            other = theirs[name]
            other = other.detach().numpy() if hasattr(other, "detach") else np.asarray(other)
            diff = float(np.abs(other - value).max())
            verdict = "ok" if diff <= TOLERANCE else "MISMATCH"
            failures += verdict != "ok"
            print(f"{verdict:8} {artifact.name:40} {cls.__name__:32} {name}: max-abs {diff:.2e}")
    failures += check_diffusion(out / "diffusion")
    return 1 if failures else 0


if __name__ == "__main__":
    command, directory = sys.argv[1], Path(sys.argv[2])
    if command == "build":
        build(directory)
    elif command == "check":
        sys.exit(check(directory))
    else:
        sys.exit(f"unknown command {command!r}: use build or check")
