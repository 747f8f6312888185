"""Loading and running an ONNX or OpenVINO artifact must not need torch or transformers.

Two checks: a subprocess where importing the build-side libraries fails (fast, always), and a
real virtual environment with only numpy, pillow, click, rich and onnxruntime (slow).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import venv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from modelkiln import load

pytestmark = pytest.mark.torch
ROOT = Path(__file__).resolve().parents[1]

BLOCKED = (
    "torch",
    "torchvision",
    "transformers",
    "timm",
    "diffusers",
    "safetensors",
    "huggingface_hub",
)

SCRIPT = """
import importlib.abc, json, sys

BLOCKED = {blocked!r}

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())

import numpy as np
import modelkiln

images = [np.full((40, 50, 3), 60, np.uint8), np.full((20, 30, 3), 200, np.uint8)]
classifier = modelkiln.load({classifier!r}, runtime={runtime!r})
logits = classifier.logits(images).tolist()
top = classifier(images, top_k=1)
embedder = modelkiln.load({embedder!r}, runtime={runtime!r})
vectors = embedder(images).tolist()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
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
    script = SCRIPT.format(
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
    built: Callable[..., Path], tmp_path: Path
) -> None:
    environment = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(environment)
    python = environment / "bin" / "python"
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "numpy",
            "pillow",
            "click",
            "rich",
            "onnxruntime",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if install.returncode != 0:
        pytest.skip(
            f"cannot install the runtime-only environment here: {install.stderr.strip()[-300:]}"
        )
    # Our package from the source tree, without its dependencies: nothing else may come along.
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "modelkiln-source.pth").write_text(str(ROOT) + "\n")
    artifact = built("hf-classifier", "vit-onnxruntime-fp32")
    script = textwrap.dedent(
        f"""
        import importlib.util, json, numpy as np, modelkiln
        assert importlib.util.find_spec("torch") is None
        images = [np.full((40, 50, 3), 60, np.uint8)]
        print(json.dumps(modelkiln.load({str(artifact)!r}).logits(images).tolist()))
        """
    )
    result = subprocess.run(
        [str(python), "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    expected = load(artifact).logits([np.full((40, 50, 3), 60, np.uint8)])
    np.testing.assert_allclose(json.loads(result.stdout), expected, atol=1e-6)
