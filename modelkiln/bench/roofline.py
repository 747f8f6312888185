"""The machine's roofline for dense matmul, and the time floor it puts under a model.

A benchmark row says how fast a build ran; it does not say how much faster it could run. The
peak of a square matmul on this CPU at a precision (fp32, bf16, int8), with the threads the
row used, answers that: a model's FLOPs over that peak is a floor no kernel can beat, and a
row's time over the floor ("x floor") says how much a faster kernel could still win. 1.1x
floor: nothing left to gain from the kernels; 5x floor: most of the time goes elsewhere
(memory traffic, small or badly shaped matmuls, the non-matmul ops, the framework).

Conventions: a multiply-add counts as 2 ops, for the peaks and for `count_flops` (which is
torch.utils.flop_counter's convention). `count_flops` counts matmuls, convolutions and
attention only (no softmax, norms, activations, ...), so the floor is a lower bound: a model
can never reach 1.0x. The peak is the best achievable: best of a few timed repeats at the
fastest of a couple of sizes, after a warm-up.

torch, onnx and onnxruntime are imported inside the functions: modelkiln.bench imports
without them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelkiln.errors import InputError, did_you_mean

PRECISIONS = ("fp32", "bf16", "int8")
# Square sizes tried when none is given: large enough for the blocked kernels to reach their
# peak on a few cores, small enough that one call is well under a second.
SIZES = (1024, 2048)
REPEATS = 5


@dataclass(frozen=True)
class Peak:
    """The best dense-matmul rate measured at one precision."""

    precision: str  # "fp32" | "bf16" | "int8"
    ops_per_s: float  # a multiply-add counts as 2 ops
    how: str  # the kernel path measured, e.g. "torch._int_mm (oneDNN)"
    size: int  # m = n = k of the matmul that reached it


@dataclass(frozen=True)
class Floor:
    """The least time `flops` can take at `peak`; `times` places a measured time against it."""

    flops: int
    peak: Peak

    @property
    def seconds(self) -> float:
        return floor_seconds(self.flops, self.peak)

    def times(self, measured_s: float) -> float:
        """'x floor': the measured time over the floor (1.0 would be the peak's speed)."""
        if measured_s <= 0:
            raise InputError(f"a measured time must be positive, got {measured_s} s")
        return measured_s / self.seconds


def floor_seconds(flops: int, peak: Peak) -> float:
    """Seconds `flops` take at `peak`'s rate: no kernel at that precision does them faster."""
    if flops < 0:
        raise InputError(f"a FLOP count cannot be negative, got {flops}")
    return flops / peak.ops_per_s


def count_flops(module: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of one forward of `module` (a multiply-add = 2), by torch's FlopCounterMode.

    Runs the forward under no_grad (meta tensors count without computing). Attention runs its
    math path here: CPU's fused flash kernel has no FLOP formula and would count as zero.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        module(*args, **kwargs)
    return int(counter.get_total_flops())


def _best_seconds(call: Callable[[], object], seconds: float) -> float:
    """The fastest mean time of one call over REPEATS timed rounds of `seconds` in all, after
    a warm-up of two calls and at least a quarter of `seconds` (caches, clocks, thread pools)."""
    started = time.perf_counter()
    for calls in itertools.count(1):
        call()
        if calls >= 2 and time.perf_counter() - started >= seconds / 4:
            break
    best = float("inf")
    for _ in range(REPEATS):
        calls, started = 0, time.perf_counter()
        while True:
            call()
            calls += 1
            elapsed = time.perf_counter() - started
            if elapsed >= seconds / REPEATS:
                break
        best = min(best, elapsed / calls)
    return best


def _torch_mm(precision: str, size: int) -> tuple[Callable[[], object], str] | None:
    import torch

    if precision == "int8":
        if not hasattr(torch, "_int_mm"):
            return None
        try:
            torch._int_mm(*torch.ones(2, 32, 32, dtype=torch.int8))
        except RuntimeError:  # no int8 x int8 -> int32 kernel in this build
            return None
        a = torch.randint(-128, 128, (size, size), dtype=torch.int8)
        b = torch.randint(-128, 128, (size, size), dtype=torch.int8)
        return (lambda: torch._int_mm(a, b)), "torch._int_mm (oneDNN)"
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    if precision == "fp32":
        library = "MKL" if torch.backends.mkl.is_available() else "BLAS"
    else:
        library = "oneDNN" if torch.backends.mkldnn.is_available() else "native"
    return (lambda: torch.mm(a, b)), f"torch.mm {precision} ({library})"


def _onnxruntime_int8(size: int, threads: int) -> tuple[Callable[[], object], str] | None:
    """MatMulInteger with uint8 activations x int8 weights: onnxruntime's VNNI path (int8 x
    int8 takes a far slower one), the pair its dynamic quantization emits."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])],
        "matmul_integer",
        [
            helper.make_tensor_value_info("A", TensorProto.UINT8, [size, size]),
            helper.make_tensor_value_info("B", TensorProto.INT8, [size, size]),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [size, size])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # any onnxruntime of the last years reads it
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    feeds = {
        "A": rng.integers(0, 256, (size, size), dtype=np.uint8),
        "B": rng.integers(-128, 128, (size, size), dtype=np.int8),
    }
    return (lambda: session.run(None, feeds)), "onnxruntime MatMulInteger (u8 x s8)"


def _openvino_mm(
    precision: str, size: int, threads: int
) -> tuple[Callable[[], object], str] | None:
    """OpenVINO's own MatMul (oneDNN's kernels, as its compiled models run them) in fp32 or
    bf16: torch's fp32 goes through MKL, which stayed ~20 % under what OpenVINO's fp32 ViT
    reached on the same host, so a floor from torch alone was no lower bound."""
    if precision == "int8":
        return None
    try:
        import numpy as np
        import openvino as ov
        import openvino.opset13 as ops
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((size, size)).astype(np.float32)
    activations = ops.parameter([size, size], np.float32)
    model = ov.Model([ops.matmul(activations, ops.constant(weights), False, False)], [activations])
    hint = {"fp32": ov.Type.f32, "bf16": ov.Type.bf16}[precision]
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint}
    compiled = ov.Core().compile_model(model, "CPU", config)
    if compiled.get_property("INFERENCE_PRECISION_HINT") != hint:
        return None  # not computed natively in this precision here
    request = compiled.create_infer_request()
    feed = rng.standard_normal((size, size)).astype(np.float32)
    return (lambda: request.infer([feed])), f"OpenVINO MatMul {precision}"


def measure_peak(
    precision: str, threads: int, *, size: int | None = None, seconds: float = 1.0
) -> Peak | None:
    """The best dense-matmul rate at `precision` on `threads` threads; None where no kernel
    path for it exists here.

    size: m = n = k of the square matmul (default: the faster of SIZES). seconds: the timed
    time per size and kernel path (torch.mm and OpenVINO's MatMul for fp32 and bf16,
    torch._int_mm and onnxruntime's MatMulInteger for int8; the fastest, named in `how`).
    """
    if precision not in PRECISIONS:
        raise InputError(
            f"unknown precision {precision!r}{did_you_mean(precision, PRECISIONS)}; "
            f"choose one of {', '.join(PRECISIONS)}"
        )
    if threads < 1 or seconds <= 0 or (size is not None and size < 1):
        raise InputError(
            f"threads, seconds and size must be positive, got {threads}, {seconds}, {size}"
        )
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    best: Peak | None = None
    try:
        for n in SIZES if size is None else (size,):
            candidates = [_torch_mm(precision, n), _openvino_mm(precision, n, threads)]
            if precision == "int8":
                candidates.append(_onnxruntime_int8(n, threads))
            for candidate in candidates:
                if candidate is None:
                    continue
                call, how = candidate
                rate = 2 * n**3 / _best_seconds(call, seconds)
                if best is None or rate > best.ops_per_s:
                    best = Peak(precision, rate, how, n)
    finally:
        torch.set_num_threads(previous)
    return best


def measure_peaks(threads: int, seconds: float = 1.0) -> list[Peak]:
    """`measure_peak` of every precision this machine has a path for (about 10 s at 1.0)."""
    peaks = (measure_peak(precision, threads, seconds=seconds) for precision in PRECISIONS)
    return [peak for peak in peaks if peak is not None]
