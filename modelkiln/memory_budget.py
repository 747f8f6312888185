"""Whether a build fits the machine's memory, decided before it exports anything.

A build holds, at its peak, one component's torch module in fp32 (validation runs it whole;
the streamed ONNX export stays under that), or the whole fp32 torch pipeline when it runs the
source pipeline end to end (the [validation] gate on real data, and calibration). A component
built block by block (exporters/by_block.py) holds its compressed blocks and one block in
fp32 instead. Read from the checkpoints' headers and meta-device models, that is known before
a byte of weight is loaded: a build larger than `[build] max_memory_gb` (default: 90 % of this
machine's memory) is refused with the estimate and what would fit, instead of being killed
an hour in.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modelkiln.errors import UnsupportedError
from modelkiln.specs import ComponentSpec

GB = 1e9
FP32_BYTES = 4
# What the build holds besides weights: Python, torch, the exporters, the runtimes, the
# pipeline's meta-device models. Measured building SD 3.5 Large: 4.1 GB resident when T5
# began, 4.7 GB when the transformer began (bench/sd35_large_build.py).
OVERHEAD_BYTES = int(4.5 * GB)
# The share of the machine a build may plan to use by default.
DEFAULT_SHARE = 0.9


@dataclass(frozen=True)
class Estimate:
    """fp32 bytes of each component's weights, and what the build holds at its peak."""

    components: dict[str, int]
    whole_pipeline: bool  # the fp32 torch pipeline is held whole (end-to-end gate, calibration)
    # Components built block by block: what they hold instead of their fp32 module.
    by_block: dict[str, int] = field(default_factory=dict)
    # Components too large whole that cannot be built block by block, and why.
    not_by_block: dict[str, str] = field(default_factory=dict)

    def held(self, name: str) -> int:
        return self.by_block.get(name, self.components[name])

    @property
    def largest(self) -> tuple[str, int]:
        return max(self.components.items(), key=lambda item: item[1])

    @property
    def pipeline_bytes(self) -> int:
        return sum(self.components.values())

    def needed(self, whole_pipeline: bool | None = None) -> int:
        whole = self.whole_pipeline if whole_pipeline is None else whole_pipeline
        held = self.pipeline_bytes if whole else max(map(self.held, self.components))
        return held + OVERHEAD_BYTES

    def fits_whole(self, name: str, limit: float) -> bool:
        """Whether the component fits built whole (its fp32 module and the overhead)."""
        return self.components[name] + OVERHEAD_BYTES <= limit


def estimate(components: Sequence[ComponentSpec], whole_pipeline: bool) -> Estimate | None:
    """The estimate from the components' safetensors checkpoints; None where a component has
    none to read (then nothing is refused)."""
    sizes: dict[str, int] = {}
    seen: set[tuple[Path, ...]] = set()
    for spec in components:
        if not spec.checkpoint:
            return None
        files = tuple(sorted(spec.checkpoint))
        # Two components from one checkpoint (the VAE's halves) are one module in the pipeline.
        sizes[spec.name] = fp32_bytes(files) if files not in seen else 0
        seen.add(files)
    return Estimate(sizes, whole_pipeline) if sizes else None


def fp32_bytes(files: Iterable[Path]) -> int:
    """What the tensors in these safetensors files take in fp32, from their headers."""
    from safetensors import safe_open

    total = 0
    for path in files:
        with safe_open(str(path), framework="numpy") as checkpoint:
            for key in checkpoint.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                count = 1
                for size in checkpoint.get_slice(key).get_shape():
                    count *= int(size)
                total += count * FP32_BYTES
    return total


def machine_memory_bytes() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def limit_bytes(max_memory_gb: float | None) -> float:
    """The budget: build.max_memory_gb, else a safe share of this machine."""
    return (
        max_memory_gb * GB if max_memory_gb is not None else DEFAULT_SHARE * machine_memory_bytes()
    )


def limit_source(max_memory_gb: float | None) -> str:
    """Where the budget comes from, for messages."""
    if max_memory_gb is not None:
        return "build.max_memory_gb"
    return (
        f"{DEFAULT_SHARE:.0%} of this machine's {machine_memory_bytes() / GB:.1f} GB; "
        "build.max_memory_gb sets it"
    )


def check_fits(estimate: Estimate, max_memory_gb: float | None, origin: str) -> None:
    """Refuse a build whose estimate exceeds the budget, saying what would fit."""
    limit = limit_bytes(max_memory_gb)
    needed = estimate.needed()
    if needed <= limit:
        return
    where = limit_source(max_memory_gb)
    if estimate.whole_pipeline:
        held = (
            f"the end-to-end gate and calibration run the whole fp32 torch pipeline "
            f"({_listing(estimate)})"
        )
    else:
        name = max(estimate.components, key=estimate.held)
        if name in estimate.by_block:
            held = (
                f"{name} built block by block holds {estimate.by_block[name] / GB:.1f} GB "
                "(its compressed blocks and one block in fp32); a 4-bit scheme holds less"
            )
        else:
            largest = estimate.components[name]
            held = f"validation runs {name} whole in fp32 ({largest / GB:.1f} GB)"
            if name in estimate.not_by_block:
                held += f", and it cannot be built block by block: {estimate.not_by_block[name]}"
    advice = "use a machine with that much memory"
    per_component = estimate.needed(whole_pipeline=False)
    if estimate.whole_pipeline and per_component <= limit:
        advice = (
            "drop the end-to-end gate and calibration (--set validation.prompts=[] "
            "--set validation.min_psnr_db= --set validation.min_ssim= and a scheme without "
            "calibration): validated one component at a time it needs "
            f"{per_component / GB:.1f} GB; or " + advice
        )
    raise UnsupportedError(
        f"{origin}: this build needs about {needed / GB:.1f} GB of memory and may use "
        f"{limit / GB:.1f} GB ({where}): {held}; {advice}"
    )


def _listing(estimate: Estimate) -> str:
    parts = [f"{n} {size / GB:.1f} GB" for n, size in estimate.components.items() if size]
    return ", ".join(parts)


__all__ = [
    "Estimate",
    "check_fits",
    "estimate",
    "fp32_bytes",
    "limit_bytes",
    "limit_source",
    "machine_memory_bytes",
]
