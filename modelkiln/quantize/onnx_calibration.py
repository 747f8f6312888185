"""int8-static's activation ranges for ONNX graphs: onnxruntime's own calibrators, run on
the calibration feeds, their ranges handed to quantize_static (modelkiln.quantize.onnx)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.errors import QuantizationError

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from modelkiln.quantize import Calibration
    from modelkiln.quantize.schemes import Int8Static

# The layers int8-static quantizes, whose inputs and outputs are calibrated: only the layers
# with weights. Quantizing every op (Add, LayerNorm, Softmax, ... outputs too) took the tiny
# ViT's logits from 33 dB SQNR to 11 dB, for no speed-up.
STATIC_OPS = ("MatMul", "Gemm", "Conv")
# int8-static's activation ranges come from onnxruntime's own calibrators with these settings;
# quantize_static forwards no histogram size, and its Entropy kept 128 bins for 128 quantized
# bins: one KL candidate, the full range, MinMax's scales to the bit.
# Entropy: ORT's histogram spans [-max|x|, max|x|] and the KL search clips down to
# num_quantized_bins / num_bins of it. ORT searches in pure Python, quadratic in the bins: per
# calibrated tensor about 0.15 s at 512 bins, 0.4 s at 1024, 1.2 s at 2048 (TensorRT's size;
# the tiny test ViT's 36 tensors: 4-10 s, 12-26 s, 32-57 s over 6 seeds, 2 CPUs). At 512 one
# seed's ViT got MinMax's scales again (the others moved 2 of 24); 1024 moved 12-17 of 24,
# 2048 19-23. Logits' SQNR against MinMax's, calibrated on noise: +0.3 to -7.5 dB at 1024,
# +0.2 to -8.2 dB at 2048. 1024: a real search (down to 1/8 of the range) at 1/3 the time.
ENTROPY_BINS = 1024
ENTROPY_QUANTIZED_BINS = 128
# Percentile: ORT's defaults, a 2048-bin histogram of |x| cut at the 99.999th percentile.
PERCENTILE = 99.999
PERCENTILE_BINS = 2048


def calibration_method(settings: Int8Static) -> tuple[Any, dict[str, Any]]:
    """onnxruntime's CalibrationMethod for `settings.method` and its calibrator's options."""
    from onnxruntime.quantization import CalibrationMethod

    options: dict[str, Any]
    if settings.method == "entropy":
        options = {"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS}
        return CalibrationMethod.Entropy, options
    if settings.method == "percentile":
        # symmetric: the percentile of |x|, ORT's default for this method.
        options = {"num_bins": PERCENTILE_BINS, "percentile": PERCENTILE, "symmetric": True}
        return CalibrationMethod.Percentile, options
    return CalibrationMethod.MinMax, {}


def calibrate(
    entry: Path,
    calibration: Calibration,
    method: Any,
    options: dict[str, Any],
    scratch: Path,
    ranges: Path,
) -> None:
    """Run the calibration feeds through onnxruntime's calibrator (the inputs and outputs of
    the STATIC_OPS layers) and save the tensor ranges it computes to `ranges`."""
    from onnxruntime.quantization.calibrate import TensorsData, create_calibrator, save_tensors_data

    calibrator = create_calibrator(
        entry,
        list(STATIC_OPS),
        augmented_model_path=str(scratch / "augmented.onnx"),
        calibrate_method=method,
        use_external_data_format=entry.with_name(f"{entry.stem}.onnx_data").is_file(),
        extra_options=options,
    )
    calibrator.collect_data(_reader(calibration))
    tensors = calibrator.compute_data()
    if not isinstance(tensors, TensorsData):
        raise QuantizationError(f"onnxruntime's calibrator returned {type(tensors).__name__}")
    save_tensors_data(tensors, ranges)


def _reader(calibration: Calibration) -> Any:
    """The feeds as onnxruntime's CalibrationDataReader (one feed per get_next, then None)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            feed = next(self.feeds, None)
            return None if feed is None else dict(feed)

    return Feeds()


def graph_inputs(graph: onnx.GraphProto) -> dict[str, tuple[list[int | None], str]]:
    """The graph's inputs (not its initializers): dims, None where symbolic, and as shown."""
    initializers = {tensor.name for tensor in graph.initializer}
    inputs = {}
    for value in graph.input:
        if value.name not in initializers:
            dims = [d.dim_value or None for d in value.type.tensor_type.shape.dim]
            inputs[value.name] = (dims, str(["?" if d is None else d for d in dims]))
    return inputs
