"""OpenVINO calibrated schemes (int8-static, int8-hybrid) called directly on exported IRs: what
nncf put in the graph, what the record says, and how close OpenVINO's CPU run stays to fp32.

The floors leave margin below what these tiny random-weight models measure on random feeds
(lowest cosine, SQNR): ViT static 0.998, 31 dB; ViT hybrid 0.9998, 37 dB; UNet hybrid 0.9987,
26 dB. The UNet test needs the whole sd-openvino-fp32 build (shared with tests/models).
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelkiln.errors import QuantizationError
from modelkiln.quantize import quantize
from modelkiln.quantize.openvino import int8_hybrid, int8_static
from modelkiln.quantize.schemes import SCHEMES, Int8Hybrid, Int8Static

pytestmark = [pytest.mark.torch, pytest.mark.openvino]

Feeds = list[dict[str, np.ndarray]]
Quantized = tuple[Path, dict[str, Any]]
# The tiny ViT: 2 blocks x 6 linears + the classifier, and the patch-embedding convolution.
VIT_MATMULS, VIT_CONVS = 13, 1
# The tiny UNet: every linear (its 4 GEGLU projections as two each: models/geglu_split.py)
# and every convolution (13 of its 33 are 1x1).
UNET_MATMULS, UNET_CONVS = 54, 33


@pytest.fixture(scope="module")
def vit_ir(built: Callable[..., Path]) -> Path:
    return built("hf-classifier", "vit-openvino-fp32") / "openvino_model.xml"


@pytest.fixture(scope="module")
def unet_ir(built: Callable[..., Path]) -> Path:
    return built("sd", "sd-openvino-fp32") / "unet" / "openvino_model.xml"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Quantized]:
    """quantized(ir, scheme, feeds) -> (the quantized copy of `ir`, its record); once each."""
    cache: dict[tuple[Path, str, bool], Quantized] = {}

    def get(ir: Path, scheme: str, feeds: Feeds, symmetric: bool = False) -> Quantized:
        key = (ir, scheme, symmetric)
        if key not in cache:
            entry = _copy(ir, tmp_path_factory.mktemp(scheme))
            settings = SCHEMES.get(scheme)(symmetric=symmetric)
            function = int8_static if scheme == "int8-static" else int8_hybrid
            cache[key] = entry, function(entry, settings, feeds)
        return cache[key]

    return get


def test_int8_static_quantizes_every_weight_and_the_activations(
    vit_ir: Path, quantized: Callable[..., Quantized]
) -> None:
    entry, record = quantized(vit_ir, "int8-static", _feeds(vit_ir, 8, batch=4))
    ops, weights = _ops(entry), _weight_types(entry)
    assert weights == {"i8": VIT_MATMULS + VIT_CONVS}  # symmetric int8, nothing in fp32
    assert record["quantized_weights"] == VIT_MATMULS + VIT_CONVS
    assert record["weight_types"] == weights
    assert ops["FakeQuantize"] >= VIT_MATMULS  # at least one per weighted op's input
    assert record["ops"] == {"FakeQuantize": ops["FakeQuantize"]}
    # Every weighted MatMul runs on quantized activations.
    assert _on_quantized_activations(entry, "MatMul") == VIT_MATMULS
    assert record["preset"] == "mixed" and record["model_type"] == "transformer"
    assert record["calibration_batches"] == 8
    # The weights are stored in int8 (a quarter of the fp32 .bin plus the scales); on the
    # tiny model the FakeQuantize nodes make the .xml grow nearly as much.
    bin_bytes = entry.with_suffix(".bin").stat().st_size
    assert bin_bytes < 0.4 * vit_ir.with_suffix(".bin").stat().st_size
    assert record["bytes_after"] < record["bytes_before"]
    assert sorted(p.name for p in entry.parent.iterdir()) == [
        "openvino_model.bin",
        "openvino_model.xml",
    ]


def test_int8_hybrid_keeps_matmul_activations_in_floating_point(
    vit_ir: Path, quantized: Callable[..., Quantized]
) -> None:
    entry, record = quantized(vit_ir, "int8-hybrid", _feeds(vit_ir, 8, batch=4))
    # MatMul weights compressed (asymmetric: u8 + zero point), the convolution quantized in
    # full (i8 weights and a FakeQuantize on its input).
    assert _weight_types(entry) == {"u8": VIT_MATMULS, "i8": VIT_CONVS}
    assert record["weight_types"] == {"u8": VIT_MATMULS, "i8": VIT_CONVS}
    assert record["quantized_weights"] == VIT_MATMULS + VIT_CONVS
    assert record["weight_only_ops"] == VIT_MATMULS and record["nncf_mode"] == "int8_asym"
    assert _on_quantized_activations(entry, "MatMul") == 0
    assert 1 <= record["ops"]["FakeQuantize"] == _ops(entry)["FakeQuantize"] < VIT_MATMULS
    assert (
        entry.with_suffix(".bin").stat().st_size < 0.4 * vit_ir.with_suffix(".bin").stat().st_size
    )


def test_int8_hybrid_with_float_matmul_weights_quantizes_only_the_rest(
    vit_ir: Path, tmp_path: Path
) -> None:
    entry = _copy(vit_ir, tmp_path)
    feeds = _feeds(vit_ir, 8, batch=4)
    record = int8_hybrid(entry, Int8Hybrid(matmul_weights="float"), feeds)
    # The convolution quantized in full; the MatMuls keep their fp32 weights and activations.
    assert _weight_types(entry) == record["weight_types"] == {"i8": VIT_CONVS}
    assert record["matmul_weights"] == "float" and record["float_ops"] == VIT_MATMULS
    assert record["weight_only_ops"] == 0 and record["quantized_weights"] == VIT_CONVS
    assert _on_quantized_activations(entry, "MatMul") == 0
    assert record["ops"]["FakeQuantize"] >= VIT_CONVS
    assert record["bytes_after"] > 0.9 * record["bytes_before"]  # only the conv shrank
    cosine, sqnr = _closeness(vit_ir, entry, _feeds(vit_ir, 2, batch=3, seed=1))
    assert cosine >= 0.9999 and 30 <= sqnr < 80, (cosine, sqnr)


def test_symmetric_hybrid_stores_signed_weights_and_prints_nothing(
    vit_ir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    entry = _copy(vit_ir, tmp_path)
    settings = Int8Hybrid(symmetric=True)
    record = int8_hybrid(entry, settings, _feeds(vit_ir, 4, batch=2))
    assert capfd.readouterr().out == ""  # nncf's progress bars and tables went to the log
    assert _weight_types(entry) == {"i8": VIT_MATMULS + VIT_CONVS}  # no zero points
    assert record["nncf_mode"] == "int8_sym" and record["preset"] == "performance"


@pytest.mark.parametrize(
    ("scheme", "min_cosine", "min_sqnr_db"),
    [("int8-static", 0.995, 22.0), ("int8-hybrid", 0.999, 30.0)],
)
def test_quantized_vit_runs_on_cpu_close_to_fp32(
    scheme: str,
    min_cosine: float,
    min_sqnr_db: float,
    vit_ir: Path,
    quantized: Callable[..., Quantized],
) -> None:
    entry, _ = quantized(vit_ir, scheme, _feeds(vit_ir, 8, batch=4))
    # Another batch size than the calibration's: the batch dimension stayed dynamic.
    cosine, sqnr = _closeness(vit_ir, entry, _feeds(vit_ir, 2, batch=3, seed=1))
    assert cosine >= min_cosine and sqnr >= min_sqnr_db, (cosine, sqnr)
    assert sqnr < 80, "quantization must change the numbers"


@pytest.mark.slow
def test_int8_hybrid_on_a_unet_quantizes_every_convolution_in_full(
    unet_ir: Path, quantized: Callable[..., Quantized]
) -> None:
    entry, record = quantized(unet_ir, "int8-hybrid", _feeds(unet_ir, 8, batch=2))
    assert _weight_types(entry) == {"u8": UNET_MATMULS, "i8": UNET_CONVS}
    assert record["quantized_weights"] == UNET_MATMULS + UNET_CONVS
    assert record["weight_only_ops"] == UNET_MATMULS
    assert _on_quantized_activations(entry, "MatMul") == 0
    # The 8 others (the 1x1 proj_in/proj_out around each attention block) take theirs
    # through a Reshape or Transpose.
    assert _on_quantized_activations(entry, "Convolution") >= UNET_CONVS - 8
    assert record["ops"]["FakeQuantize"] == _ops(entry)["FakeQuantize"] >= UNET_CONVS
    # The UNet is mostly convolution weights: the whole IR shrinks to well under half.
    assert record["bytes_after"] < 0.5 * record["bytes_before"]
    for batch in (1, 2):
        cosine, sqnr = _closeness(unet_ir, entry, _feeds(unet_ir, 2, batch=batch, seed=1))
        assert cosine >= 0.99 and sqnr >= 20, (batch, cosine, sqnr)
        assert sqnr < 80, "quantization must change the numbers"


@pytest.mark.parametrize("scheme", ["int8-static", "int8-hybrid"])
def test_calibrated_schemes_without_calibration_fail_and_leave_the_ir(
    scheme: str, vit_ir: Path, tmp_path: Path
) -> None:
    entry = _copy(vit_ir, tmp_path)
    before = entry.read_bytes()
    with pytest.raises(
        QuantizationError,
        match=rf"^vision_model: {scheme} needs calibration data: set \[calibration\] data",
    ):
        quantize(entry, "openvino", SCHEMES.get(scheme)(), "vision_model", [])
    assert entry.read_bytes() == before


def test_feeds_must_fit_the_ir_before_nncf_runs(vit_ir: Path, tmp_path: Path) -> None:
    import openvino as ov

    entry = _copy(vit_ir, tmp_path)
    static = ov.Core().read_model(entry)
    static.reshape({"pixel_values": [1, 3, 32, 32]})
    ov.save_model(static, str(tmp_path / "static.xml"), compress_to_fp16=False)
    settings = Int8Static()
    with pytest.raises(
        QuantizationError,
        match=re.escape(
            "calibration feed 0: input 'pixel_values' has shape [4, 3, 32, 32] but the model "
            "takes [1,3,32,32]: export with shapes.dynamic_batch = true"
        ),
    ):
        int8_static(tmp_path / "static.xml", settings, _feeds(vit_ir, 2, batch=4))
    with pytest.raises(QuantizationError, match=r"has inputs \['pixels'\] but the model takes"):
        int8_static(entry, settings, [{"pixels": np.zeros((1, 3, 32, 32), np.float32)}])


def _feeds(ir: Path, count: int, *, batch: int, seed: int = 0) -> Feeds:
    """Random feeds of the IR's inputs; dynamic dimensions (the batch) take `batch`."""
    import openvino as ov

    rng = np.random.default_rng(seed)
    inputs = ov.Core().read_model(ir).inputs
    feeds = []
    for _ in range(count):
        feed = {}
        for port in inputs:
            shape = [batch if d.is_dynamic else d.get_length() for d in port.get_partial_shape()]
            dtype = np.dtype(port.get_element_type().to_dtype())
            name = port.get_any_name()
            if name == "timestep":  # a diffusion step number, in the IR's type
                feed[name] = rng.integers(0, 1000, size=shape).astype(dtype)
            else:
                feed[name] = rng.standard_normal(shape).astype(dtype)
        feeds.append(feed)
    return feeds


def _closeness(reference: Path, candidate: Path, feeds: Feeds) -> tuple[float, float]:
    """Lowest per-sample cosine and the SQNR (dB) of the first output over all feeds, both
    IRs compiled by OpenVINO for the CPU in f32 (no bf16 on AMX machines)."""
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    ours = core.compile_model(str(candidate), "CPU", config)
    theirs = core.compile_model(str(reference), "CPU", config)
    a = np.concatenate([_flat(theirs(feed)[0]) for feed in feeds])
    b = np.concatenate([_flat(ours(feed)[0]) for feed in feeds])
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    sqnr = 10 * np.log10((a**2).sum() / max(((a - b) ** 2).sum(), 1e-30))
    return float(cosine.min()), float(sqnr)


def _flat(output: Any) -> np.ndarray:
    array = np.asarray(output, dtype=np.float64)
    return array.reshape(len(array), -1)


def _copy(ir: Path, directory: Path) -> Path:
    entry = directory / ir.name
    shutil.copyfile(ir, entry)
    shutil.copyfile(ir.with_suffix(".bin"), entry.with_suffix(".bin"))
    return entry


def _model(entry: Path) -> Any:
    import openvino as ov

    return ov.Core().read_model(entry)


def _ops(entry: Path) -> Counter[str]:
    return Counter(op.get_type_name() for op in _model(entry).get_ops())


def _weight_types(entry: Path) -> dict[str, int]:
    """Integer weight constants by type; zero points (Convert -> Subtract's second input, the
    same type and, for 1x1 convolutions, the same trailing 1) aside."""
    types: Counter[str] = Counter()
    for op in _model(entry).get_ops():
        if op.get_type_name() != "Constant":
            continue
        kind = op.get_element_type().get_type_name()
        if kind not in ("i8", "u8"):
            continue
        uses = [
            (use.get_node().get_type_name(), use.get_index())
            for convert in op.output(0).get_target_inputs()
            for use in convert.get_node().output(0).get_target_inputs()
        ]
        if ("Subtract", 1) not in uses and len(op.get_output_shape(0)) >= 2:
            types[kind] += 1
    return dict(types)


def _on_quantized_activations(entry: Path, kind: str) -> int:
    """Ops of `kind` with constant weights (input 1, through their decompression) whose
    activation input (0) comes straight from a FakeQuantize."""
    count = 0
    for op in _model(entry).get_ops():
        if op.get_type_name() != kind:
            continue
        weights = op.input_value(1).get_node()
        while weights.get_type_name() in ("Multiply", "Subtract", "Convert", "Reshape"):
            weights = weights.input_value(0).get_node()
        activation = op.input_value(0).get_node().get_type_name()
        count += weights.get_type_name() == "Constant" and activation == "FakeQuantize"
    return count
