"""onnxruntime quantization schemes and the fp16 conversion, called directly on the tiny ViT's
exported model.onnx: the ops they produce, the export's file layout kept, the size, and the
logits of ORT CPU against fp32 (cosine and SQNR floors measured over 6 seeds, with margin)."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest

from modelkiln.errors import QuantizationError
from modelkiln.quantize import onnx as schemes
from modelkiln.quantize import onnx_calibration as calibration
from modelkiln.quantize.schemes import (
    Int4Weights,
    Int8Dynamic,
    Int8Static,
    NF4Weights,
    SchemeConfig,
)

pytestmark = [pytest.mark.torch, pytest.mark.onnxruntime]

# The tiny ViT: 2 blocks x 6 linears as MatMuls with a weight (q, k, v, out, fc1, fc2), 2 x 2
# attention MatMuls of two activations, the patch Conv and the classifier Gemm.
WEIGHT_MATMULS = 12
ACTIVATION_MATMULS = 4
# Input channels (K) of the weight MatMuls: 32 (hidden) for 10 of them, 64 for fc2.
K_BELOW_64 = 10


def _pixels(batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"pixel_values": rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)}


CALIBRATION = [_pixels(4, seed) for seed in range(4)]
TEST_FEED = _pixels(16, seed=100)


@pytest.fixture(scope="module")
def exported(built: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fp32 export's model.onnx (weights inline), exported once for the module, without
    ONNX Runtime's fusions: what the int8-static / int4 / nf4 profiles quantize."""
    folder = tmp_path_factory.mktemp("fp32")
    plain = built("hf-classifier", "vit-onnxruntime-fp32", "onnxruntime.fusions=none")
    shutil.copy(plain / "model.onnx", folder)
    return folder / "model.onnx"


@pytest.fixture(scope="module")
def reference(exported: Path) -> np.ndarray:
    return _logits(exported)


@pytest.fixture(scope="module")
def minmax_scales(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The activation scales of int8-static's default: minmax, per-tensor, asymmetric."""
    path = Path(shutil.copy(exported, tmp_path_factory.mktemp("minmax") / "model.onnx"))
    schemes.int8_static(path, Int8Static(), CALIBRATION)
    return _activation_scales(path)


@pytest.fixture
def model(exported: Path, tmp_path: Path) -> Path:
    """A fresh copy of the export to rewrite in place."""
    return Path(shutil.copy(exported, tmp_path / "model.onnx"))


@pytest.fixture
def external_model(exported: Path, tmp_path: Path) -> Path:
    """The same export with its weights in one model.onnx_data, as large exports have them."""
    import onnx

    path = tmp_path / "model.onnx"
    onnx.save_model(
        onnx.load(str(exported)),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx_data",
        size_threshold=0,
    )
    return path


def _logits(path: Path) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], TEST_FEED)[0])


def _closeness(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """(lowest cosine over the batch, SQNR in dB) of `ours` against `theirs`."""
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    sqnr = 10 * np.log10((theirs**2).sum() / ((ours - theirs) ** 2).sum())
    return float(cosine.min()), float(sqnr)


def _graph(path: Path) -> Any:
    import onnx

    return onnx.load(str(path)).graph


def _ops(path: Path) -> Counter[str]:
    return Counter(node.op_type for node in _graph(path).node)


def _activation_scales(path: Path) -> dict[str, Any]:
    """{activation: the scale of its QuantizeLinear}, from the initializers."""
    import onnx

    graph = _graph(path)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    return {
        node.input[0]: values[node.input[1]]
        for node in graph.node
        if node.op_type == "QuantizeLinear"
    }


def _files(path: Path) -> set[str]:
    return {child.name for child in path.parent.iterdir()}


@pytest.mark.parametrize(
    ("method", "per_channel", "symmetric", "floor"),
    [
        # floors under the cosine and SQNR measured over 6 model seeds, in the comments
        ("minmax", False, False, (0.995, 27)),  # 0.9985-0.9999, 30.3-38.7 dB
        ("entropy", False, False, (0.99, 25)),  # 0.9969-0.9996, 28.7-35.1 dB
        ("percentile", False, False, (0.995, 27)),  # 0.9985-0.9998, 29.8-38.6 dB
        ("minmax", True, True, (0.995, 29)),  # 0.9995-0.9999, 32.5-39.0 dB
    ],
)
def test_int8_static_puts_weight_layers_in_qdq_and_stays_close(
    model: Path,
    reference: np.ndarray,
    minmax_scales: dict[str, Any],
    method: Literal["minmax", "entropy", "percentile"],
    per_channel: bool,
    symmetric: bool,
    floor: tuple[float, float],
) -> None:
    settings = Int8Static(method=method, per_channel=per_channel, symmetric=symmetric)
    record = schemes.int8_static(model, settings, CALIBRATION)

    graph = _graph(model)
    ops = Counter(node.op_type for node in graph.node)
    weights = WEIGHT_MATMULS + 2  # + the patch Conv and the classifier Gemm
    assert record["quantized_weights"] == weights
    # One DequantizeLinear per int8 weight, one Q/DQ pair per quantized activation.
    assert ops["DequantizeLinear"] == ops["QuantizeLinear"] + weights
    assert record["ops"] == {
        "QuantizeLinear": ops["QuantizeLinear"],
        "DequantizeLinear": ops["DequantizeLinear"],
    }
    int8 = {t.name: t for t in graph.initializer if t.data_type == 3 and len(t.dims) >= 2}
    assert len(int8) == weights
    # The attention's activation x activation MatMuls stay float, fed by no DequantizeLinear.
    dequantized = {
        out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output
    }
    float_matmuls = [
        node
        for node in graph.node
        if node.op_type == "MatMul" and not set(node.input) & dequantized
    ]
    assert len(float_matmuls) == ACTIVATION_MATMULS
    if per_channel:  # one scale per output channel of each weight
        scales = {t.name: len(t.float_data) or len(t.raw_data) // 4 for t in graph.initializer}
        weight_scales = [
            scales[node.input[1]]
            for node in graph.node
            if node.op_type == "DequantizeLinear" and node.input[0] in int8
        ]
        assert min(weight_scales) >= 10  # the classifier's 10 labels; the rest 32 or 64
    assert record["bytes_after"] < 0.6 * record["bytes_before"]
    assert record["bytes_after"] == model.stat().st_size
    assert record["method"] == method and record["calibration_batches"] == len(CALIBRATION)
    assert (
        record["calibrator"]
        == {
            "minmax": {},
            "entropy": {"num_bins": calibration.ENTROPY_BINS, "num_quantized_bins": 128},
            "percentile": {"num_bins": 2048, "percentile": 99.999, "symmetric": True},
        }[method]
    )
    assert _files(model) == {"model.onnx"}  # nothing left behind beside it
    if method != "minmax":
        # Each method sets its own ranges: through quantize_static, entropy had 128 histogram
        # bins for 128 quantized bins and came out with minmax's scales to the bit.
        ours = _activation_scales(model)
        assert ours.keys() == minmax_scales.keys()
        assert not all(np.array_equal(ours[name], minmax_scales[name]) for name in ours)

    cosine, sqnr = _closeness(_logits(model), reference)
    assert cosine >= floor[0] and sqnr >= floor[1]


def test_int8_static_needs_calibration_data(model: Path) -> None:
    before = model.read_bytes()
    with pytest.raises(
        QuantizationError, match=r"int8-static needs calibration data: set \[calibration\]"
    ):
        schemes.int8_static(model, Int8Static(), ())
    assert model.read_bytes() == before


def test_int8_static_rejects_feeds_of_another_model(model: Path) -> None:
    feeds = [{"input_ids": np.zeros((1, 8), dtype=np.int64)}]
    with pytest.raises(QuantizationError, match=r"calibration feed 0 has inputs \['input_ids'\]"):
        schemes.int8_static(model, Int8Static(), feeds)
    wrong_size = [{"pixel_values": np.zeros((2, 3, 16, 16), np.float32)}]
    with pytest.raises(
        QuantizationError,
        match=r"has shape \[2, 3, 16, 16\] but the model takes \['\?', 3, 32, 32\]",
    ):
        schemes.int8_static(model, Int8Static(), wrong_size)


@pytest.mark.parametrize(
    ("group_size", "symmetric", "padded", "floor"),
    [
        # measured: 0.9987-0.9990, 27.4-28.2 dB | 0.9965-0.9971, 22.8-23.4 | 0.9951-0.9963, 21.8-22.2
        (16, False, 0, (0.995, 24)),
        (32, True, 0, (0.99, 20)),
        # A group wider than a layer's 32 input channels: ORT zero-pads them, it does not skip.
        (64, False, K_BELOW_64, (0.99, 19)),
    ],
)
def test_int4_weights_puts_every_weight_matmul_in_matmulnbits(
    model: Path,
    reference: np.ndarray,
    group_size: int,
    symmetric: bool,
    padded: int,
    floor: tuple[float, float],
) -> None:
    settings = Int4Weights(group_size=group_size, symmetric=symmetric)
    record = schemes.int4_weights(model, settings)

    graph = _graph(model)
    nbits = [node for node in graph.node if node.op_type == "MatMulNBits"]
    assert len(nbits) == WEIGHT_MATMULS == record["quantized_weights"]
    assert record["ops"] == {"MatMulNBits": WEIGHT_MATMULS}
    assert record["float_matmuls"] == {"MatMul": ACTIVATION_MATMULS, "Gemm": 1}
    assert record["padded_layers"] == padded
    for node in nbits:
        attributes = {a.name: a.i for a in node.attribute}
        assert attributes["bits"] == 4 and attributes["block_size"] == group_size
        assert attributes["accuracy_level"] == 4
        assert len(node.input) == (3 if symmetric else 4)  # zero points only when asymmetric
    assert record["bytes_after"] < 0.65 * record["bytes_before"]
    assert _files(model) == {"model.onnx"}

    cosine, sqnr = _closeness(_logits(model), reference)
    assert cosine >= floor[0] and sqnr >= floor[1]


@pytest.mark.parametrize("quantizer", [schemes.int4_weights, schemes.nf4_weights])
def test_4bit_schemes_reject_a_group_size_onnxruntime_lacks(
    model: Path, quantizer: Callable[..., dict[str, Any]]
) -> None:
    settings = Int4Weights(group_size=24)
    with pytest.raises(
        QuantizationError, match=r"group_size 24 .* use one of 16, 32, 64, 128, 256"
    ):
        quantizer(model, settings)


def test_nf4_weights_puts_every_weight_matmul_in_matmulbnb4(
    model: Path, reference: np.ndarray
) -> None:
    record = schemes.nf4_weights(model, NF4Weights(group_size=16))

    ops = _ops(model)
    assert ops["MatMulBnb4"] == WEIGHT_MATMULS == record["quantized_weights"]
    assert ops["MatMul"] == ACTIVATION_MATMULS
    bnb4 = [node for node in _graph(model).node if node.op_type == "MatMulBnb4"]
    assert {a.name: a.i for a in bnb4[0].attribute}["quant_type"] == 1  # NF4, not FP4
    assert record["bytes_after"] < 0.6 * record["bytes_before"]

    cosine, sqnr = _closeness(_logits(model), reference)  # ORT's CPU kernel runs it
    # measured: cosine 0.9968-0.9978, 22.6-23.3 dB
    assert cosine >= 0.99 and sqnr >= 20


def test_to_fp16_keeps_fp32_inputs_and_outputs(model: Path, reference: np.ndarray) -> None:
    record = schemes.to_fp16(model)

    graph = _graph(model)
    assert [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)] == [1, 1]
    fp16 = [t for t in graph.initializer if t.data_type == 10]
    assert record["converted_initializers"] == len(fp16) >= WEIGHT_MATMULS
    assert record["float32_initializers"] == 0
    assert record["bytes_after"] < 0.65 * record["bytes_before"]

    ours = _logits(model)
    assert ours.dtype == np.float32
    cosine, sqnr = _closeness(ours, reference)
    assert cosine >= 0.99999 and sqnr >= 55  # measured: 63.5-65.1 dB


@pytest.mark.parametrize(
    ("convert", "settings"),
    [
        (schemes.int8_dynamic, Int8Dynamic()),
        (schemes.int8_static, Int8Static()),
        (schemes.int4_weights, Int4Weights(group_size=16)),
        (schemes.nf4_weights, NF4Weights(group_size=16)),
        (None, None),
    ],
    ids=["int8-dynamic", "int8-static", "int4-weights", "nf4-weights", "fp16"],
)
def test_external_weights_stay_in_one_onnx_data_file(
    external_model: Path,
    reference: np.ndarray,
    convert: Callable[..., dict[str, Any]] | None,
    settings: SchemeConfig | None,
) -> None:
    import onnx

    data = external_model.with_name("model.onnx_data")
    before = data.stat().st_size
    if convert is None:
        record = schemes.to_fp16(external_model)
    else:
        record = convert(external_model, settings, CALIBRATION)

    assert _files(external_model) == {"model.onnx", "model.onnx_data"}
    assert data.stat().st_size < before
    assert record["bytes_after"] == external_model.stat().st_size + data.stat().st_size
    graph = onnx.load(str(external_model), load_external_data=False).graph
    locations = {
        entry.value
        for tensor in graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    assert locations == {"model.onnx_data"}
    cosine, _ = _closeness(_logits(external_model), reference)
    assert cosine >= 0.99


def test_a_failure_on_a_nearly_full_disk_names_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A truncated temporary copy fails as an unrelated protobuf error: the message says why."""
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"\x0a\xff\xff\xff")  # what a copy cut short by a full disk looks like
    settings = Int8Dynamic()
    usage = shutil.disk_usage(tmp_path)
    for free, hint in ((50_000_000_000, False), (300_000_000, True)):
        monkeypatch.setattr(schemes.shutil, "disk_usage", lambda _, f=free: usage._replace(free=f))
        with pytest.raises(QuantizationError, match=r"int8-dynamic quantization failed: ") as error:
            schemes.int8_dynamic(broken, settings)
        assert ("(only 300 MB free in " in str(error.value)) is hint
        assert ("free disk space and build again" in str(error.value)) is hint
