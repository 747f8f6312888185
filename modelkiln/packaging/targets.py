"""Which artifact formats each deployment target runs: what the backends' descriptors say.

A backend declares, for each format it writes, the targets that run it and what they need
installed (Backend.deploy), and may work it out from the artifact's profile (Core ML's OS
release from its [coreml] target). Minimum versions there are a policy, not a probe: the
oldest releases whose readers cover what our exporters write; bundle.json also records the
versions that validated the build.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from modelkiln.backends import backends, format_owner
from modelkiln.errors import UnsupportedError, did_you_mean

if TYPE_CHECKING:
    from modelkiln.profiles import Profile


# Other names for our targets, as users type them. `linux-arm64` is .NET's runtime id, Docker's
# linux/arm64 and Go's GOARCH; ONNX Runtime ships both names (NuGet's runtimes/linux-arm64, the
# release archives' onnxruntime-linux-aarch64-*.tgz). Accepted wherever a target is, and
# recorded in bundle.json under our name, so that one target has one name in every bundle.
TARGET_ALIASES: Mapping[str, str] = {"linux-arm64": "linux-aarch64"}


def canonical_target(target: str) -> str:
    """Our name for target: "linux-arm64" -> "linux-aarch64"; any other name as given."""
    return TARGET_ALIASES.get(target, target)


def deployment_targets() -> dict[str, dict[str, tuple[str, ...]]]:
    """target -> {format its runtime runs: what the device needs installed (defaults)}."""
    table: dict[str, dict[str, tuple[str, ...]]] = {}
    for backend in backends():
        for format, needs in backend.deploy.items():
            for target, requirements in needs.items():
                table.setdefault(target, {})[format] = requirements
    return dict(sorted(table.items()))


def target_formats(target: str) -> dict[str, tuple[str, ...]]:
    """The formats target (or an alias of one) runs, each with its requirements; an unknown
    target raises."""
    table = deployment_targets()
    target = canonical_target(target)
    if target not in table:
        raise UnsupportedError(
            f"unknown target '{target}'{did_you_mean(target, table)}; targets: {', '.join(table)}"
        )
    return table[target]


def requirements(target: str, format: str, profile: Profile) -> tuple[str, ...]:
    """What target needs to run an artifact of format built with `profile`; raises if it
    cannot run it at all (with the backend's reason where it gives one)."""
    target = canonical_target(target)
    formats = target_formats(target)
    needs = (
        format_owner(format).requirements(format, target, profile) if format in formats else None
    )
    if needs is None:
        raise UnsupportedError(
            f"target '{target}' cannot run this {format} artifact; {target} takes: "
            f"{', '.join(formats)} (build with a profile of that format: `kiln profiles list`)"
        )
    return needs


def requirement_name(requirement: str) -> str:
    """The package or OS a requirement names: "onnxruntime>=1.19" -> "onnxruntime",
    "org.pytorch:executorch-android>=1.5,<1.7" -> "org.pytorch:executorch-android"."""
    return requirement.split(">=")[0]
