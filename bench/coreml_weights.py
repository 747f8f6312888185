"""What Core ML weight compression does to the weights, measured without a Mac.

Core ML programs only run on macOS, so a Linux build cannot compare a compressed program's
outputs with torch. What it can compare is the weights: each compressed weight, decompressed
by coremltools' own value inference of its constexpr op, against the same weight in the fp16
program. Prints the package size and the weight SQNR (dB, over every compressed weight, and
the worst single weight) per artifact.

    python bench/coreml_weights.py BASE_FP16_ARTIFACT COMPRESSED_ARTIFACT...
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.loading import open_artifact
from modelkiln.quantize.coreml import COMPRESSED_OPS, package_bytes
from modelkiln.runtimes.coreml import import_coremltools

# coremltools names a compressed weight after the const it replaced, plus a suffix.
SUFFIX = re.compile(r"_(quantized|palettized)$")


def program(package: Path) -> Any:
    from coremltools.converters.mil.frontend.milproto.load import load

    ct = import_coremltools()
    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    return load(
        spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir
    )


def constants(package: Path) -> dict[str, np.ndarray]:
    """The fp16 program's constants, by name."""
    ops = program(package).functions["main"].operations
    return {
        op.outputs[0].name: op.outputs[0].val
        for op in ops
        if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray)
    }


def decompressed(package: Path) -> dict[str, np.ndarray]:
    """Every compressed weight as coremltools decompresses it, by the const it replaced."""
    ops = program(package).functions["main"].operations
    return {
        SUFFIX.sub("", op.outputs[0].name): op.materialized_val_inference()
        for op in ops
        if op.op_type in COMPRESSED_OPS
    }


def sqnr_db(signal: float, noise: float) -> float:
    return float("inf") if noise == 0 else 10 * float(np.log10(signal / noise))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path, help="the fp16 artifact (vit-coreml-fp16)")
    parser.add_argument("compressed", type=Path, nargs="+")
    args = parser.parse_args()

    def entry(artifact: Path) -> Path:
        record = next(iter(open_artifact(artifact).manifest.components.values()))
        return artifact / record.entry

    reference = constants(entry(args.base))
    print(
        "| artifact | scheme | package MB | weights compressed | weight SQNR dB | worst weight dB |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {args.base.name} | fp16 | {package_bytes(entry(args.base)) / 1e6:.1f} | — | — | — |")
    for artifact in args.compressed:
        package = entry(artifact)
        scheme = open_artifact(artifact).manifest.profile.quantization.scheme
        signal = noise = 0.0
        worst = float("inf")
        matched = 0
        for name, value in decompressed(package).items():
            original = reference.get(name)
            if original is None or original.shape != value.shape:
                continue
            ref, got = original.astype(np.float64), value.astype(np.float64)
            s, n = float((ref**2).sum()), float(((got - ref) ** 2).sum())
            signal, noise, matched = signal + s, noise + n, matched + 1
            worst = min(worst, sqnr_db(s, n))
        print(
            f"| {artifact.name} | {scheme} | {package_bytes(package) / 1e6:.1f} | {matched} "
            f"| {sqnr_db(signal, noise):.1f} | {worst:.1f} |"
        )


if __name__ == "__main__":
    main()
