"""The build plan: a profile checked against what is registered, with every choice resolved.

The profile schema (profiles.py) knows no backend, family or scheme. Here a profile meets
them: its family, the backend that writes its format and the one that runs it, the scheme
config and handler of every component. Each rule is asked of its owner (the backend's
`check_profile`, its settings' `check`, the family's `check_profile`, a handler's check), so
that nothing here names a backend. What the plan returns is what a build runs: its profile
is normalised (runtime "auto" resolved, the backends' sections and the schemes' keys with
their defaults), and that is what kiln.json records.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.backends import (
    BACKENDS,
    Backend,
    ProfileContext,
    format_owner,
    formats,
    resolved_runtime,
    runtimes_for,
    section_names,
)
from modelkiln.errors import ProfileError, UnsupportedError, did_you_mean
from modelkiln.models import FAMILIES
from modelkiln.profiles import (
    NO_SCHEME,
    SECTIONS,
    Profile,
    QuantizationSettings,
    parse_section,
    read_profile,
)
from modelkiln.quantize import SCHEMES, Handler, SchemeConfig, handler_for
from modelkiln.runtimes.base import AUTO_COMPUTE, RuntimeOptions

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from modelkiln.exporters.base import Exporter
    from modelkiln.models.base import ModelFamily
    from modelkiln.runtimes.base import Runtime


@dataclass(frozen=True)
class ComponentPlan:
    """One component's part of the plan: the profile as it sees it, and its scheme."""

    name: str
    profile: Profile
    scheme: SchemeConfig | None
    handler: Handler | None


@dataclass(frozen=True)
class BuildPlan:
    profile: Profile  # normalised
    family: type[ModelFamily]
    writer: type[Backend]  # writes the format
    runner: type[Backend]  # runs it (the writer's runtime unless [runtime] name says other)
    schemes: dict[str, SchemeConfig]  # scheme name -> its config from [quantization]
    origin: str  # how errors name the profile: its name, or the file the user wrote

    @property
    def format(self) -> str:
        return self.profile.export.format

    def exporter(self) -> Exporter:
        return self.writer.exporter_class(self.format)()

    def runtime(self) -> Runtime:
        return self.runner.runtime_class()()

    def runtime_options(self, component: str | None = None) -> RuntimeOptions:
        return RuntimeOptions.for_profile(self.profile, self.runner.settings, component)

    def component(self, name: str) -> ComponentPlan:
        view = self.profile.for_component(name)
        scheme = view.quantization.scheme
        if scheme == NO_SCHEME:
            return ComponentPlan(name, view, None, None)
        handler = handler_for(self.format, scheme, self.origin)
        return ComponentPlan(name, view, self.schemes[scheme], handler)

    def calibrated(self, names: Iterable[str]) -> list[str]:
        """The components whose scheme quantizes activations (they need real inputs)."""
        return [n for n in names if (s := self.component(n).scheme) is not None and s.calibrated]

    def with_task(self, task: str) -> BuildPlan:
        """The plan of a build whose family resolved model.task ("auto") to `task`."""
        model = replace(self.profile.model, task=task)
        return replace(self, profile=replace(self.profile, model=model))

    def check_components(self, names: Iterable[str]) -> None:
        """[components.<name>] must name components the model has."""
        known = list(names)
        for name in self.profile.components:
            if name not in known:
                raise ProfileError(
                    f"{self.origin} has [components.{name}] but {self.family.name} models have: "
                    f"{', '.join(known)}{did_you_mean(name, known)}"
                )

    def require_calibration_data(self) -> None:
        """A build with a calibrated scheme needs real inputs. Not checked with the profile:
        a bundled profile cannot know the user's images; the build asks for them."""
        key = self.family.real_data_key()
        calibrated = sorted(name for name, config in self.schemes.items() if config.calibrated)
        if calibrated and not getattr(self.profile.calibration, key):
            example = "DIR (a folder of images) or digits" if key == "data" else "'[\"a photo\"]'"
            raise ProfileError(
                f"{self.origin}: quantization scheme {', '.join(calibrated)} needs "
                f"calibration {self.family.real_inputs}: set [calibration] {key} in the "
                f"profile, or --set calibration.{key}={example}"
            )


def plan_profile(profile: Profile, origin: str | None = None) -> BuildPlan:
    """Check `profile` against the registered families, backends and schemes; the plan."""
    origin = origin or f"profile '{profile.name}'"
    _require_known(profile.family, FAMILIES.names(), f"{origin}: family")
    family = FAMILIES.get(profile.family)
    _require_known(profile.export.format, formats(), f"{origin}: export.format")
    writer = format_owner(profile.export.format)
    runtime_name = resolved_runtime(profile)
    _require_known(runtime_name, BACKENDS.names(), f"{origin}: runtime.name")
    runner = BACKENDS.get(runtime_name)
    _check_precisions(profile, writer, runner, origin)
    involved = {writer.name: writer, runner.name: runner}
    sections = _check_sections(profile, involved, origin)
    family.check_profile(profile, origin)
    context = ProfileContext(profile, origin, family, profile.export.format, runner.name)
    for backend in involved.values():
        backend.check_profile(context)
    schemes = _schemes(profile, origin)
    for where, view in [("", profile)] + [
        (f" [components.{n}]", profile.for_component(n)) for n in profile.components
    ]:
        scheme = view.quantization.scheme
        if scheme != NO_SCHEME:
            handler = handler_for(profile.export.format, scheme, f"{origin}{where}")
            component = replace(context, profile=view, origin=f"{origin}{where}")
            handler.check_profile(schemes[scheme], component)
    options: dict[str, Any] = {}
    for config in schemes.values():
        options.update(asdict(config))
    normalised = replace(
        profile,
        runtime=replace(profile.runtime, name=runner.name),
        sections=sections,
        quantization=QuantizationSettings(
            profile.quantization.scheme, dict(sorted(options.items()))
        ),
    )
    return BuildPlan(normalised, family, writer, runner, schemes, origin)


def load_plan(profile: str | Path | Profile, overrides: Iterable[str] = ()) -> BuildPlan:
    """A bundled profile name, a TOML path or a Profile, with --set overrides, planned."""
    overrides = list(overrides)
    resolved = read_profile(profile, overrides)
    origin = None  # errors name the profile by its name ...
    if overrides:
        origin = f"profile '{resolved.name}' with --set overrides"
    elif not isinstance(profile, Profile) and Path(profile).is_file():
        origin = f"profile {profile}"  # ... or by the file the user wrote
    return plan_profile(resolved, origin)


def load_profile(profile: str | Path | Profile, overrides: Iterable[str] = ()) -> Profile:
    """A profile checked against the schema and everything registered, normalised."""
    return load_plan(profile, overrides).profile


def _require_known(value: str, known: list[str], what: str) -> None:
    if value not in known:
        raise UnsupportedError(
            f"{what} = '{value}' is unknown{did_you_mean(value, known)}; known: {', '.join(known)}"
        )


def _check_precisions(
    profile: Profile, writer: type[Backend], runner: type[Backend], origin: str
) -> None:
    format = profile.export.format
    runtime = runner.runtime_class()
    if format not in runtime.formats:
        raise UnsupportedError(
            f"{origin}: runtime '{runner.name}' cannot run format '{format}'; "
            f"runtimes for it: {', '.join(runtimes_for(format))}"
        )
    stores = writer.exporter_class(format).weight_precisions
    for where, precision in profile.precisions():
        if precision.weights not in stores:
            raise UnsupportedError(
                f"{origin}: format '{format}' cannot store {where}weights in "
                f"{precision.weights}; supported: {', '.join(sorted(stores))}"
            )
        if precision.compute == AUTO_COMPUTE:
            if not runtime.native_bf16 or runtime.compute_follows_weights:
                raise UnsupportedError(
                    f"{origin}: compute 'auto' picks bf16 or fp32 for the CPU the artifact "
                    f"runs on, and runtime '{runner.name}' has no native bf16 path to pick; "
                    f"set {where}compute to one of: "
                    f"{', '.join(sorted(runtime.compute_precisions))}"
                )
            continue
        if precision.compute not in runtime.compute_precisions:
            raise UnsupportedError(
                f"{origin}: runtime '{runner.name}' cannot compute {where}in "
                f"{precision.compute}; supported: "
                f"{', '.join(sorted(runtime.compute_precisions))}"
            )
        if runtime.compute_follows_weights and precision.compute != precision.weights:
            raise UnsupportedError(
                f"{origin}: runtime '{runner.name}' computes {where}in the precision the "
                f"weights are stored in, so compute ({precision.compute}) must equal weights "
                f"({precision.weights}); set both to '{precision.weights}'"
            )


def _check_sections(
    profile: Profile, involved: dict[str, type[Backend]], origin: str
) -> dict[str, dict[str, Any]]:
    """Every backend section names a backend of this build and parses with its settings; the
    involved backends' sections with their defaults filled in."""
    for name in profile.sections:
        if name not in section_names():
            known = [*SECTIONS, *section_names()]
            raise ProfileError(
                f"{origin}: unknown key '{name}'{did_you_mean(name, known)}; known sections: "
                f"{', '.join(SECTIONS)}, and the backends' own: {', '.join(section_names())}"
            )
        if name not in involved:
            # Kept quiet would hide a mistake; refused, a --set of export.format could never
            # build (a --set cannot remove a section): said, and left out of the plan.
            logger.warning(
                "%s: ignoring [%s]: it configures the %s backend, and this profile builds %s "
                "for %s",
                origin,
                name,
                name,
                profile.export.format,
                ", ".join(involved),
            )
    sections = {}
    for name, backend in involved.items():
        settings = backend.settings.of(profile)
        settings.check(origin)
        values = {k: v for k, v in asdict(settings).items() if v is not None}
        if values:
            sections[name] = values
    return sections


def _schemes(profile: Profile, origin: str) -> dict[str, SchemeConfig]:
    """The config of every scheme the profile uses, from [quantization]'s keys. A key no
    registered scheme has is a mistake; a key only other schemes have is left out."""
    options = profile.quantization.options
    configs = {}
    for name in profile.scheme_names():
        if name not in SCHEMES:
            continue  # handler_for says it is unknown, with the known ones
        cls = SCHEMES.get(name)
        own = {f.name for f in fields(cls)}
        config = parse_section(
            cls,
            {k: v for k, v in options.items() if k in own},
            key_path="quantization.",
            origin=origin,
        )
        config.check(origin)
        configs[name] = config
    every = {f.name for name in SCHEMES for f in fields(SCHEMES.get(name))}
    for key in options:
        if key not in every:
            raise ProfileError(
                f"{origin}: unknown key 'quantization.{key}'{did_you_mean(key, every)}; the "
                f"schemes' keys: {', '.join(sorted(every))}"
            )
    return configs


__all__ = ["BuildPlan", "ComponentPlan", "load_plan", "load_profile", "plan_profile"]
