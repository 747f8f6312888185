"""Loading and running an ONNX or OpenVINO artifact must not need torch or transformers.

Two checks: a subprocess where importing the build-side libraries fails (fast, always), and a
real virtual environment with only numpy, pillow, click, rich and onnxruntime (slow).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from venv_support import clean_environment, fresh_venv, installed_packages

from modelkiln import load

pytestmark = pytest.mark.torch

BLOCKED = (
    "torch",
    "torchvision",
    "transformers",
    "timm",
    "diffusers",
    "safetensors",
    "huggingface_hub",
)

# Makes the build-side libraries unimportable, as if they were not installed.
BLOCKER = f"""
import importlib.abc, sys

BLOCKED = {BLOCKED!r}

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
"""

SCRIPT = """
import json, sys
import numpy as np
import modelkiln

images = [np.full((40, 50, 3), 60, np.uint8), np.full((20, 30, 3), 200, np.uint8)]
classifier = modelkiln.load({classifier!r}, runtime={runtime!r})
logits = classifier.logits(images).tolist()
top = classifier(images, top_k=1)
embedder = modelkiln.load({embedder!r}, runtime={runtime!r})
vectors = embedder(images).tolist()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r})
print(json.dumps({{"logits": logits, "labels": [p[0].label for p in top], "vectors": vectors, "loaded": loaded}}))
"""

IMAGES = [np.full((40, 50, 3), 60, np.uint8), np.full((20, 30, 3), 200, np.uint8)]


@pytest.mark.parametrize(
    ("profile", "runtime"),
    [
        pytest.param("vit-onnxruntime-fp32", "onnxruntime", marks=pytest.mark.onnxruntime),
        pytest.param(
            "vit-onnxruntime-fp32",
            "openvino",
            marks=[pytest.mark.onnxruntime, pytest.mark.openvino],
        ),
        pytest.param("vit-openvino-fp32", "openvino", marks=pytest.mark.openvino),
    ],
)
def test_load_and_run_with_torch_and_transformers_unimportable(
    profile: str, runtime: str, built: Callable[..., Path]
) -> None:
    classifier = built("timm-classifier", profile)
    embedder = built("hf-backbone", profile)
    script = BLOCKER + SCRIPT.format(
        blocked=BLOCKED, classifier=str(classifier), embedder=str(embedder), runtime=runtime
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    # Same numbers as the same artifacts loaded in this process, where torch is importable.
    np.testing.assert_allclose(
        report["logits"], load(classifier, runtime=runtime).logits(IMAGES), atol=1e-6
    )
    np.testing.assert_allclose(
        report["vectors"], load(embedder, runtime=runtime)(IMAGES), atol=1e-6
    )
    assert report["labels"][0].startswith("LABEL_")


@pytest.mark.slow
@pytest.mark.onnxruntime
def test_a_venv_with_only_numpy_pillow_and_onnxruntime_runs_an_artifact(
    built: Callable[..., Path], wheel: Path, tmp_path: Path
) -> None:
    runtime = ("numpy", "pillow", "click", "rich", "onnxruntime")
    python = fresh_venv(tmp_path / "venv", *runtime, what="the runtime-only environment")
    # Our wheel, without its dependencies (not even tokenizers): nothing else may come along.
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env=clean_environment(),
    )
    artifact = built("hf-classifier", "vit-onnxruntime-fp32")
    script = textwrap.dedent(
        f"""
        import importlib.util, json, sys, numpy as np, modelkiln
        assert importlib.util.find_spec("torch") is None
        assert modelkiln.__file__.startswith(sys.prefix), modelkiln.__file__
        images = [np.full((40, 50, 3), 60, np.uint8)]
        print(json.dumps(modelkiln.load({str(artifact)!r}).logits(images).tolist()))
        """
    )
    result = subprocess.run(
        [str(python), "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the source tree: the installed package runs
        env=clean_environment(),
    )
    assert result.returncode == 0, result.stderr
    expected = load(artifact).logits([np.full((40, 50, 3), 60, np.uint8)])
    np.testing.assert_allclose(json.loads(result.stdout), expected, atol=1e-6)


# --- diffusion: the numpy pipeline with nothing of the build side ----------------------------

# Generates each mode from each artifact (or bundle) and saves the pixels; prints which of the
# blocked modules got imported.
DIFFUSION_SCRIPT = """
import json, sys
import numpy as np
from PIL import Image
import modelkiln

artifacts, out = json.loads(sys.argv[1]), sys.argv[2]
pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
image = Image.fromarray(pixels)
mask = np.zeros((32, 32), np.uint8)
mask[8:24, 8:24] = 255
mask = Image.fromarray(mask)
for index, path in enumerate(artifacts):
    with modelkiln.load(path) as pipeline:
        settings = {"steps": 3, "seed": 1}
        images = {
            "text": pipeline.text_to_image("a photo of a cat", **settings)[0],
            "image": pipeline.image_to_image("a photo of a cat", image, strength=0.7, **settings)[0],
            "inpaint": pipeline.inpaint("a photo of a cat", image, mask, strength=0.9, **settings)[0],
        }
    for mode, result in images.items():
        result.save(f"{out}/{index}-{mode}.png")
build_side = {"torch", "diffusers", "transformers", "huggingface_hub", "safetensors"}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in build_side)))
"""
DIFFUSION_MODES = ("text", "image", "inpaint")


def diffusion_artifacts(built: Callable[..., Path], profile: str, tmp_path: Path) -> list[Path]:
    """Tiny SD and SDXL artifacts of `profile`'s backend, and an SD bundle for linux."""
    from modelkiln.packaging import package

    family_profile = profile.replace("sd-", "sdxl-")
    sd, sdxl = built("sd", profile), built("sdxl", family_profile)
    bundle = package(sd, "linux-x86_64", tmp_path / "sd-bundle.tar.gz").path
    return [sd, sdxl, bundle]


def full_environment_images(artifacts: list[Path]) -> dict[str, object]:
    """The same script's images, made in this process (torch and diffusers importable)."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    image, mask_image = Image.fromarray(pixels), Image.fromarray(mask)
    images: dict[str, object] = {}
    for index, path in enumerate(artifacts):
        with load(path) as pipeline:
            settings: dict[str, object] = {"steps": 3, "seed": 1}
            prompt = "a photo of a cat"
            images[f"{index}-text"] = pipeline.text_to_image(prompt, **settings)[0]
            images[f"{index}-image"] = pipeline.image_to_image(
                prompt, image, strength=0.7, **settings
            )[0]
            images[f"{index}-inpaint"] = pipeline.inpaint(
                prompt, image, mask_image, strength=0.9, **settings
            )[0]
    return images


def assert_same_images(folder: Path, expected: dict[str, object]) -> None:
    from PIL import Image

    for name, image in expected.items():
        made = np.asarray(Image.open(folder / f"{name}.png"), np.float64)
        error = ((made - np.asarray(image, np.float64)) ** 2).mean()
        psnr = float("inf") if error == 0 else 10 * np.log10(255.0**2 / error)
        assert psnr >= 40, (name, psnr)


@pytest.mark.slow
@pytest.mark.onnxruntime
def test_diffusion_runs_with_torch_diffusers_and_transformers_unimportable(
    built: Callable[..., Path], tmp_path: Path
) -> None:
    artifacts = diffusion_artifacts(built, "sd-onnxruntime-fp32", tmp_path)
    out = tmp_path / "images"
    out.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCKER + DIFFUSION_SCRIPT,
            json.dumps(list(map(str, artifacts))),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    assert_same_images(out, full_environment_images(artifacts))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "profile"),
    [
        pytest.param("onnxruntime", "sd-onnxruntime-fp32", marks=pytest.mark.onnxruntime),
        pytest.param("openvino", "sd-openvino-fp32", marks=pytest.mark.openvino),
    ],
)
def test_a_venv_with_only_the_runtime_extra_generates_diffusers_images(
    extra: str, profile: str, built: Callable[..., Path], wheel: Path, tmp_path: Path
) -> None:
    """`pip install "modelkiln-VERSION-py3-none-any.whl[EXTRA]"`, nothing else: SD and SDXL
    artifacts and a bundle generate the images the full environment makes, and torch never
    comes along."""
    python = fresh_venv(tmp_path / "venv", f"{wheel}[{extra}]", what=f"modelkiln[{extra}]")
    installed = installed_packages(python)
    assert not installed & {"torch", "diffusers", "transformers", "onnx", "nncf", "scipy"}
    artifacts = diffusion_artifacts(built, profile, tmp_path)
    out = tmp_path / "images"
    out.mkdir()
    result = subprocess.run(
        [str(python), "-c", DIFFUSION_SCRIPT, json.dumps(list(map(str, artifacts))), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # not the source tree: the installed package runs
        env=clean_environment(),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    assert_same_images(out, full_environment_images(artifacts))
    # The bundle's README commands, as written, with only that extra installed.
    bundle = artifacts[-1]
    for command in readme_commands(bundle):
        done = subprocess.run(
            command,
            shell=True,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=bundle.parent,
            env={"PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(tmp_path)},
        )
        assert done.returncode == 0, (command, done.stderr)
    assert (bundle.parent / "image.png").is_file()


def readme_commands(bundle: Path) -> list[str]:
    """The shell commands of the README packed in `bundle`."""
    import tarfile

    with tarfile.open(bundle) as archive:
        member = archive.extractfile("README.md")
        assert member is not None
        text = member.read().decode("utf-8")
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]
