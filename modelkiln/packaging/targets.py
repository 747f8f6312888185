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
# Core ML runs ML Programs on the OS its [coreml] target names or later: these are the defaults
# (the profile's default target iOS17 / macOS14); coreml_requirements() reads the artifact's.
IOS = "iOS>=17"
MACOS = "macOS>=14"
# TensorRT 10: what the engine recipe is written for (pyproject's tensorrt extra).
TENSORRT = "tensorrt>=10,<11"
# A Core ML deployment target -> the (iOS, macOS) releases of that ML Program spec.
COREML_OS = {
    "iOS16": (16, 13),
    "macOS13": (16, 13),
    "iOS17": (17, 14),
    "macOS14": (17, 14),
    "iOS18": (18, 15),
    "macOS15": (18, 15),
}

# target -> {format its runtime runs: what the device needs installed to run it}
TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "linux-x86_64": {"onnx": (ONNXRUNTIME,), "openvino": (OPENVINO,), "tensorrt": (TENSORRT,)},
    "linux-aarch64": {"onnx": (ONNXRUNTIME,), "openvino": (OPENVINO,), "tensorrt": (TENSORRT,)},
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


def requirements(target: str, format: str, coreml_target: str | None = None) -> tuple[str, ...]:
    """What target needs to run an artifact of format; raises if it cannot run it at all.
    A Core ML artifact needs the OS release of the deployment target it was built for."""
    formats = target_formats(target)
    if format not in formats:
        raise UnsupportedError(
            f"target '{target}' cannot run this {format} artifact; {target} takes: "
            f"{', '.join(formats)} (build with a profile of that format: `kiln profiles list`)"
        )
    if format == "coreml" and coreml_target in COREML_OS:
        ios, macos = COREML_OS[coreml_target]
        return (f"iOS>={ios}",) if target == "ios" else (f"macOS>={macos}",)
    return formats[format]


def requirement_name(requirement: str) -> str:
    """The package or OS a requirement names: "onnxruntime>=1.19" -> "onnxruntime"."""
    return requirement.split(">=")[0]
