"""What `kiln tune` tries: the bundled profiles of the model's family that run here on the
chosen runtimes, and variants of each that turn one knob.

The knobs are read from the extension points, never from a list of backends: the compute
precisions the runtime offers (bf16 only where this CPU computes it natively: AVX512-BF16 or
AMX, as `kiln env` reports), the scheme's own options (symmetric, per-channel, the 4-bit
group size and int8 share), and the family's own `tuning_knobs` (SD's guidance stopped
early). A variant the plan refuses (a runtime without bf16, ExecuTorch's int4
without an int8 share) is not a candidate; what the plan accepts is built and measured.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

from modelkiln.errors import InputError, KilnError
from modelkiln.plan import BuildPlan, load_plan
from modelkiln.profiles import NO_SCHEME, bundled_profile_names
from modelkiln.runtimes.base import NATIVE_BF16

logger = logging.getLogger(__name__)

# The 4-bit block sizes tried (weights per scale) and the share of layers kept in int8.
GROUP_SIZES = (64, 128)
MIXED_RATIO = 0.8


@dataclass(frozen=True)
class Candidate:
    """A bundled profile and the overrides of the knobs this candidate turns."""

    base: str
    changes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.base if not self.changes else f"{self.base} [{', '.join(self.changes)}]"

    @property
    def slug(self) -> str:
        """The candidate as a folder name."""
        text = "-".join([self.base, *self.changes])
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def candidate_space(
    family: str,
    runtimes: Iterable[str] | None,
    *,
    bases: Sequence[str] = (),
    wide: bool = True,
    cpu_features: Iterable[str] = (),
    overrides: Sequence[str] = (),
) -> list[Candidate]:
    """The candidates for a `family` model on `runtimes` (None: every runtime that runs
    here): `bases` (default: every bundled profile that fits), and with `wide` each one's
    one-knob variants. `overrides` (the budget's and the user's) are applied when the plan
    judges a candidate."""
    chosen = list(bases) or _bundled(family, runtimes)
    for name in bases:
        _check_base(name, family)
    if not chosen:
        wanted = ", ".join(sorted(runtimes)) if runtimes else "the runtimes installed here"
        raise InputError(
            f"no bundled {family} profile runs on {wanted} on this machine; `kiln env` lists "
            "the runtimes installed, `kiln profiles list` the profiles"
        )
    features = frozenset(cpu_features)
    candidates: list[Candidate] = []
    for name in chosen:
        base = Candidate(name)
        # The budget's and the user's overrides must suit every base: their error is theirs.
        plan = load_plan(name, overrides)
        candidates.append(base)
        if wide:
            candidates += [
                variant
                for changes in _knobs(plan, features)
                if _plan(variant := Candidate(name, changes), overrides) is not None
            ]
    return candidates


def _bundled(family: str, runtimes: Iterable[str] | None) -> list[str]:
    wanted = None if runtimes is None else set(runtimes)
    names = []
    for name in bundled_profile_names():
        plan = load_plan(name)
        if plan.family.name != family:
            continue
        if wanted is not None and plan.runner.name not in wanted:
            continue
        generation = plan.profile.generation
        if (generation.scheduler, generation.steps, generation.guidance) != (None, None, None):
            continue  # for a distilled model (LCM, Turbo): tried only when named
        if _runs_here(plan):
            names.append(name)
    return names


def _runs_here(plan: BuildPlan) -> bool:
    """Its exporter and runtime are installed, and this machine can run what it builds
    (not Core ML off macOS, not TensorRT without CUDA)."""
    runtime = plan.runtime()
    try:
        plan.exporter().require()
        runtime.require()
    except KilnError:
        return False
    return runtime.unavailable_reason(plan.runtime_options()) is None


def _check_base(name: str, family: str) -> None:
    plan = load_plan(name)
    if plan.family.name != family:
        raise InputError(
            f"profile '{name}' is for {plan.family.name} models, not {family}; pick "
            f"{family}-* profiles (`kiln profiles list {family}`)"
        )


def _plan(candidate: Candidate, overrides: Sequence[str]) -> BuildPlan | None:
    """A variant's plan, or None where the plan refuses its knob."""
    try:
        return load_plan(candidate.base, [*overrides, *candidate.changes])
    except KilnError as error:
        logger.debug("not a candidate: %s (%s)", candidate.label, error)
        return None


def _knobs(plan: BuildPlan, features: frozenset[str]) -> list[tuple[str, ...]]:
    """The one-knob changes worth measuring from this plan."""
    profile = plan.profile
    knobs: list[tuple[str, ...]] = []
    offered = set(plan.runner.runtime_class().compute_precisions) & {"fp32", "bf16"}
    if not features & NATIVE_BF16:
        offered.discard("bf16")
    if profile.precision.weights in ("fp32", "bf16"):
        knobs += [
            (f"precision.compute={p}",) for p in sorted(offered - {profile.precision.compute})
        ]
    scheme = profile.quantization.scheme
    if scheme != NO_SCHEME:
        config = plan.schemes[scheme]
        options = {f.name: getattr(config, f.name) for f in fields(config)}
        for flag in ("symmetric", "per_channel"):
            if flag in options:
                knobs.append((f"quantization.{flag}={str(not options[flag]).lower()}",))
        if "group_size" in options:
            knobs += [
                (f"quantization.group_size={size}",)
                for size in GROUP_SIZES
                if size != options["group_size"]
            ]
        if options.get("ratio") == 1.0:
            knobs.append((f"quantization.ratio={MIXED_RATIO}",))
    # A hybrid component's MatMuls on float weights (bf16 at run time) rather than int8 ones
    # they decompress in every call: worth measuring where the CPU computes bf16 natively
    # without AMX (not measured yet). With AMX, OpenVINO's decompress_weights = "auto" gets
    # the same speed from the int8 file at load.
    hybrid = any(getattr(c, "matmul_weights", None) == "int8" for c in plan.schemes.values())
    if hybrid and features & NATIVE_BF16 and "amx_bf16" not in features:
        knobs.append(("quantization.matmul_weights=float",))
    knobs += [(knob,) if isinstance(knob, str) else knob for knob in plan.family.tuning_knobs]
    return knobs


__all__ = ["Candidate", "candidate_space"]
