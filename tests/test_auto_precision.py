"""[precision] compute = "auto": bf16 where the CPU computes bf16 natively (AVX512-BF16 or
AMX) and the runtime uses it, fp32 elsewhere; decided when the artifact is opened."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from modelkiln import load
from modelkiln.errors import UnsupportedError
from modelkiln.loading import open_artifact
from modelkiln.plan import load_plan
from modelkiln.runtimes import base
from modelkiln.runtimes.onnxruntime import OnnxRuntime
from modelkiln.runtimes.openvino import OpenVINORuntime
from modelkiln.runtimes.torch import TorchRuntime

# What each runtime reports for a precision (Session.info's inference_precision).
REPORTED = {"bf16": "bf16", "fp32": "f32"}
NATIVE_HERE = bool(base.cpu_features() & base.NATIVE_BF16)


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        ({"avx512f", "avx512_vnni", "avx512_bf16"}, "bf16"),  # AMD EPYC (Zen 4)
        ({"avx512f", "amx_bf16"}, "bf16"),  # Intel Sapphire Rapids
        ({"avx2", "fma", "avx512f", "avx512_vnni"}, "fp32"),  # no bf16 dot products
    ],
)
def test_auto_is_bf16_only_where_the_cpu_computes_it(features: set[str], expected: str) -> None:
    for runtime in (OpenVINORuntime, TorchRuntime):
        assert base.resolve_compute("auto", runtime, features) == expected
    # ONNX Runtime computes in the stored types: auto has nothing to pick there.
    assert base.resolve_compute("auto", OnnxRuntime, features) == "fp32"
    assert base.resolve_compute("fp16", OpenVINORuntime, features) == "fp16"


def test_a_runtime_without_a_native_bf16_path_refuses_auto() -> None:
    with pytest.raises(UnsupportedError) as raised:
        load_plan("vit-onnxruntime-fp32", ["precision.compute=auto"])
    assert (
        "compute 'auto' picks bf16 or fp32 for the CPU the artifact runs on, and runtime "
        "'onnxruntime' has no native bf16 path to pick; set compute to one of: "
    ) in str(raised.value)
    assert load_plan("vit-openvino-fp32", ["precision.compute=auto"]).profile.precision.compute == (
        "auto"
    )


# The bf16 profile's tolerances: auto may compute in bf16 on the build machine.
BF16_GATE = ("validation.atol=0.05", "validation.min_cosine=0.999")


@pytest.mark.parametrize("profile", ["vit-openvino-bf16", "vit-torch-fp32"])
def test_an_auto_build_computes_in_what_the_cpu_it_is_opened_on_has(
    built: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, profile: str
) -> None:
    artifact = built("hf-classifier", profile, "precision.compute=auto", *BF16_GATE)
    manifest = open_artifact(artifact).manifest
    assert manifest.profile.precision.compute == "auto"
    here = "bf16" if NATIVE_HERE else "fp32"
    # validated in what auto picked on the build machine (this one)
    (record,) = manifest.components.values()
    assert record.runtime["inference_precision"] == REPORTED[here]
    assert record.validation.passed
    with load(artifact) as pipeline:
        assert pipeline.session.info["inference_precision"] == REPORTED[here]
    monkeypatch.setattr(base, "cpu_features", lambda: frozenset({"avx2", "fma", "avx512f"}))
    with load(artifact) as pipeline:
        assert pipeline.session.info["inference_precision"] == "f32"
    if NATIVE_HERE:  # asking for bf16 on a CPU without it is OpenVINO's f32 anyway
        monkeypatch.setattr(base, "cpu_features", lambda: frozenset({"amx_bf16"}))
        with load(artifact, compute_precision="fp32") as pipeline:  # a load override wins
            assert pipeline.session.info["inference_precision"] == "f32"
        with load(artifact) as pipeline:
            assert pipeline.session.info["inference_precision"] == "bf16"
