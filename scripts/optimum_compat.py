"""Check that optimum's ORT/OV classes load our artifacts and agree with modelkiln.

optimum-onnx pins transformers < 4.58, which cannot live beside our pins, so this runs in two
environments (see `make compat`):

    .venv/bin/python scripts/optimum_compat.py build artifacts/compat
    .venv-optimum/bin/python scripts/optimum_compat.py check artifacts/compat

`build` writes tiny HF and timm ViTs (classification and feature extraction) as ONNX and
OpenVINO artifacts; `check` loads each with optimum and with modelkiln (torch-free, from this
source tree) on the same pixels and fails when the outputs differ by more than 1e-5.
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
    return 1 if failures else 0


if __name__ == "__main__":
    command, directory = sys.argv[1], Path(sys.argv[2])
    if command == "build":
        build(directory)
    elif command == "check":
        sys.exit(check(directory))
    else:
        sys.exit(f"unknown command {command!r}: use build or check")
