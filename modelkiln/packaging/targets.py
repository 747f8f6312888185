"""Which artifact formats each deployment target runs: the one table packaging consults."""

from __future__ import annotations

from modelkiln.errors import UnsupportedError, did_you_mean

# Minimum versions are a policy, not a probe: the oldest releases whose readers cover what our
# exporters write. bundle.json also records the versions that validated the build.
# ONNX Runtime 1.19: reads ONNX IR 10 at opset 18 and the com.microsoft ops that our fusions
# and 4-bit quantization emit (Attention, MatMulNBits); its mobile packages (Android AAR,
# iOS/macOS pods) come from the same release line.
ONNXRUNTIME = "onnxruntime>=1.19"
# OpenVINO 2024.4: the oldest our openvino extra allows (pyproject.toml); it reads the IR v11
# that ov.save_model writes with NNCF's int8/int4/nf4-compressed weights.
OPENVINO = "openvino>=2024.4"
# Core ML runs ML Programs; iOS 17 / macOS 14 (spec 8) are the oldest OS releases that run every
# compression coremltools.optimize writes for our precisions: fp16, int8 weights, and int8
# activations (W8A8), which arrived in spec 8. Block-wise int4 weights need iOS 18 / macOS 15:
# raise these when the coreml exporter emits them.
IOS = "iOS>=17"
MACOS = "macOS>=14"

# target -> {format its runtime runs: what the device needs installed to run it}
TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "linux-x86_64": {"onnx": (ONNXRUNTIME,), "openvino": (OPENVINO,)},
    "linux-aarch64": {"onnx": (ONNXRUNTIME,), "openvino": (OPENVINO,)},
    "android": {"onnx": (ONNXRUNTIME,)},
    "ios": {"coreml": (IOS,)},
    "macos": {"coreml": (MACOS,), "onnx": (ONNXRUNTIME,)},
}


def target_formats(target: str) -> dict[str, tuple[str, ...]]:
    """The formats target runs, each with its requirements; an unknown target raises."""
    if target not in TARGETS:
        raise UnsupportedError(
            f"unknown target '{target}'{did_you_mean(target, TARGETS)}; "
            f"targets: {', '.join(TARGETS)}"
        )
    return TARGETS[target]


def requirements(target: str, format: str) -> tuple[str, ...]:
    """What target needs to run an artifact of format; raises if it cannot run it at all."""
    formats = target_formats(target)
    if format not in formats:
        raise UnsupportedError(
            f"target '{target}' cannot run this {format} artifact; {target} takes: "
            f"{', '.join(formats)} (build with a profile of that format: `kiln profiles list`)"
        )
    return formats[format]


def requirement_name(requirement: str) -> str:
    """The package or OS a requirement names: "onnxruntime>=1.19" -> "onnxruntime"."""
    return requirement.split(">=")[0]
