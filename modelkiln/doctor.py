"""`kiln doctor`: what this machine can build, run and measure, and the pip line for each
missing piece.

What an extra needs is read from modelkiln's own package metadata (the `extra == "..."`
requirements pyproject.toml declares), so the checks cannot drift from the extras; what a
runtime needs besides its package (macOS for Core ML prediction, a CUDA GPU for TensorRT)
comes from the backends, as `kiln env` reports it.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import asdict, dataclass
from typing import Any

from modelkiln.backends import runtime_backend
from modelkiln.env import cpu_info, runtime_report

PACKAGE = "modelkiln"
# What each building extra lets you do, in the order a reader needs them.
BUILDING = (
    ("build", "load sources (transformers, diffusers, timm) and build torch artifacts"),
    ("onnx", "build ONNX artifacts"),
    ("openvino-build", "build OpenVINO IR artifacts, nncf's quantization"),
    ("coreml-build", "build Core ML packages (conversion and compression run anywhere)"),
    ("torchao", "int8/int4/nf4 weights on the torch reference runtime"),
    ("bench", "kiln bench / kiln compare: plots, significance tests, report schema"),
    ("ray", "--executor ray: a matrix on a Ray cluster"),
)
EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


@dataclass(frozen=True)
class Check:
    area: str  # run, build, cpu
    name: str
    ok: bool
    detail: str
    fix: str = ""  # the command (or step) that makes it ok; empty when ok or none exists


def requirements_of(extra: str, declared: list[str] | None = None) -> list[str]:
    """The requirement strings of one extra, its self-references (modelkiln[x]) expanded."""
    declared = declared if declared is not None else importlib.metadata.requires(PACKAGE) or []
    found: list[str] = []
    for line in declared:
        requirement, _, marker = line.partition(";")
        match = EXTRA_MARKER.search(marker)
        if match is None or match.group(1) != extra:
            continue
        requirement = requirement.strip()
        nested = re.fullmatch(rf"{PACKAGE}\[([^\]]+)\]", requirement.replace(" ", ""))
        if nested:
            for inner in nested.group(1).split(","):
                found += [r for r in requirements_of(inner, declared) if r not in found]
        elif requirement not in found:
            found.append(requirement)
    return found


def missing(requirements: list[str]) -> list[str]:
    """The requirements that are not installed, or installed at a version they exclude."""
    from packaging.requirements import Requirement

    absent = []
    for text in requirements:
        requirement = Requirement(text)
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            absent.append(text)
            continue
        if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            absent.append(f"{text} (found {version})")
    return absent


def pip_line(extra: str) -> str:
    # Building extras bring torch: the constraints file keeps pip from choosing another one.
    constraints = (
        "-c constraints.txt " if extra not in ("onnxruntime", "openvino", "coreml") else ""
    )
    return f"pip install {constraints}'{PACKAGE}[{extra}]'"


def checks() -> list[Check]:
    found = []
    for runtime in runtime_report():
        name, extra = runtime["name"], runtime["extra"]
        formats = ", ".join(runtime["formats"])
        if not runtime["available"]:
            needs = runtime_backend(name).needs
            detail = f"{name} is not installed (runs {formats} artifacts"
            detail += f"; running needs {needs})" if needs else ")"
            found.append(Check("run", name, False, detail, pip_line(extra)))
        elif runtime["cannot_run"]:
            found.append(Check("run", name, False, runtime["cannot_run"], runtime_fix(name)))
        else:
            detail = f"{name} {runtime['version']} runs {formats} artifacts"
            found.append(Check("run", name, True, detail))
    for extra, purpose in BUILDING:
        absent = missing(requirements_of(extra))
        if absent:
            detail = f"{purpose}: missing {', '.join(absent)}"
            found.append(Check("build", extra, False, detail, pip_line(extra)))
        else:
            found.append(Check("build", extra, True, purpose))
    return found + cpu_checks(cpu_info()["features"])


def runtime_fix(name: str) -> str:
    """Where a runtime that is installed but cannot run here does run."""
    return {
        "coreml": "run Core ML artifacts on a Mac (macOS 13+)",
        "tensorrt": "run TensorRT artifacts on a machine with an NVIDIA GPU and CUDA",
    }.get(name, "")


def cpu_checks(features: list[str]) -> list[Check]:
    """Which precisions this CPU computes natively: what bf16 and int8 profiles gain here."""
    bf16 = "amx_bf16" in features or "avx512_bf16" in features
    int8 = any(f in features for f in ("amx_int8", "avx512_vnni", "avx_vnni"))
    bf16_how = "AMX tiles" if "amx_bf16" in features else "AVX-512 BF16 dot products"
    int8_how = "AMX tiles" if "amx_int8" in features else "VNNI dot products"
    return [
        Check(
            "cpu",
            "bf16",
            bf16,
            f"bf16 profiles compute in bf16 with {bf16_how}"
            if bf16
            else "no bf16 instructions: bf16 profiles run converted or emulated, rarely faster "
            "than fp32 here",
            "" if bf16 else "prefer fp32 or int8 profiles on this CPU",
        ),
        Check(
            "cpu",
            "int8",
            int8,
            f"int8 profiles multiply in int8 with {int8_how}"
            if int8
            else "no VNNI/AMX: int8 profiles use the older int8 instructions and save less time",
        ),
    ]


def report() -> list[dict[str, Any]]:
    return [asdict(check) for check in checks()]


__all__ = ["Check", "checks", "cpu_checks", "missing", "pip_line", "report", "requirements_of"]
