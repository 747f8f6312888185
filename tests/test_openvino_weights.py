"""[openvino] decompress_weights: weight-only MatMuls get float weights at load, which give
the dequantized weights' logits, and "auto" does it only where it was measured faster."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from modelkiln import load
from modelkiln.errors import ProfileError

pytestmark = pytest.mark.openvino

AMX = ("avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
AVX512_BF16 = ("avx512f", "avx512_vnni", "avx512_bf16")  # the AMD EPYC seen: not measured
# The builds tests/quantize/test_quantize.py makes too (shared): groups that divide the tiny
# ViT's widths, calibration on a few digits.
OVERRIDES = {
    "vit-openvino-int8": (),
    "vit-openvino-int4": ("quantization.group_size=16",),
    "vit-openvino-int8-static": (
        'calibration.data="digits"',
        "calibration.size=16",
        "calibration.batch_size=4",
    ),
}


@pytest.mark.parametrize(
    ("profile", "setting", "decompressed"),
    [
        ("vit-openvino-int8", "int8", 13),  # every MatMul: the tiny ViT's 12 and its head
        ("vit-openvino-int4", "int8", 1),  # the int8 head; the int4 MatMuls stay compressed
        ("vit-openvino-int4", "all", 13),
        # Its MatMuls' activations are quantized: they run int8 kernels, weights untouched.
        ("vit-openvino-int8-static", "all", 0),
    ],
)
def test_decompressed_weights_compute_what_the_dequantized_weights_compute(
    profile: str, setting: str, decompressed: int, built: Callable[..., Path]
) -> None:
    import openvino as ov

    artifact = built("hf-classifier", profile, *OVERRIDES[profile])
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with load(artifact, decompress_weights=setting, compute_precision="fp32") as loaded:
        assert loaded.session.info.get("decompressed_matmul_weights", 0) == decompressed
        got = loaded.session.run({"pixel_values": pixels})["logits"]
    # The compressed kernels without their dynamic int8 activations (on by default on this
    # CPU's fp32 and bf16) compute with the same dequantized weights: the same logits.
    config = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
    compressed = ov.Core().compile_model(str(artifact / "openvino_model.xml"), "CPU", config)
    np.testing.assert_allclose(got, compressed(pixels)[0], atol=1e-6, rtol=0)
    with load(artifact, decompress_weights="none") as kept:
        assert "decompressed_matmul_weights" not in kept.session.info


def test_auto_decompresses_int8_only_on_amx_in_bf16_when_memory_allows(
    built: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import openvino as ov

    from modelkiln import memory_budget
    from modelkiln.runtimes.openvino_weights import decompress_at_load

    ir = built("hf-classifier", "vit-openvino-int8") / "openvino_model.xml"
    int4 = (
        built("hf-classifier", "vit-openvino-int4", *OVERRIDES["vit-openvino-int4"])
        / "openvino_model.xml"
    )

    def auto(path: Path, device: str, precision: str, features: tuple[str, ...]) -> int:
        return decompress_at_load(ov.Core().read_model(path), "auto", device, precision, features)

    assert auto(ir, "CPU", "bf16", AMX) == 13
    assert auto(int4, "CPU", "bf16", AMX) == 1  # int4 is kept for its memory
    assert auto(ir, "CPU", "bf16", AVX512_BF16) == 0
    assert auto(ir, "CPU", "fp32", AMX) == 0
    assert auto(ir, "GPU", "bf16", AMX) == 0
    # Its weights in bf16 would take over a quarter of the machine's memory: kept compressed.
    monkeypatch.setattr(memory_budget, "machine_memory_bytes", lambda: 4096)
    assert auto(ir, "CPU", "bf16", AMX) == 0


def test_an_unknown_setting_is_named(built: Callable[..., Path]) -> None:
    artifact = built("hf-classifier", "vit-openvino-int8")
    with pytest.raises(ProfileError, match=r"openvino\.decompress_weights = 'int5' is not one of"):
        load(artifact, decompress_weights="int5")
