"""Deployment profiles: the schema, typed frozen dataclasses parsed from TOML.

A profile says everything a build needs (format, precision, shapes, runtime settings,
validation tolerances); nothing in the build reads settings from anywhere else. This module is
the schema only and imports nothing from the package but its errors: unknown keys are
rejected with their key path and a did-you-mean, types and ranges are checked, and ``None``
(an omitted key) means "the default of the component or runtime". What needs to know the
registered backends, families and schemes (is this format known, does it store bf16, does
it have int4) is checked by the build plan (modelkiln/plan.py), which asks their hooks.

Two parts of a profile are open, because their owners are extensions:
- a backend's own section, named after it (``[openvino]``, ``[tensorrt]``): kept here as a
  raw table in `Profile.sections`, parsed by the backend's settings class;
- ``[quantization]``: ``scheme`` plus that scheme's own keys, kept raw in
  `QuantizationSettings.options`, parsed by the scheme's config class.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from modelkiln.errors import ProfileError, did_you_mean
from modelkiln.profiles.diffusion import GenerationSettings, LoraSettings, RuntimeLoraSettings
from modelkiln.profiles.history import MOVED_IN_V2, SCHEMA_VERSION, upgrade
from modelkiln.profiles.model import ModelSettings
from modelkiln.profiles.parsing import (
    apply_override,
    parse_section,
    require_values,
    to_toml,
    without_none,
)

MIN_OPSET = 17
# Upper bounds of what a profile may ask for: past them a build runs for hours or exhausts
# memory rather than fail. Denoising steps: diffusers' schedulers train on 1,000 timesteps.
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0  # classifier-free guidance scale a call may ask for
MAX_BATCH = 4096
MAX_PIXELS_PER_SIDE = 16384
MAX_CALIBRATION = 100_000
MAX_IMAGES = 64  # generated per prompt in one call
# TaylorSeer's highest derivative (diffusers' max_order has no bound): order k is whole only
# after k + 1 computed steps, which a 20-50 step schedule has few of past the third.
MAX_TAYLORSEER_ORDER = 3

Precision = Literal["fp32", "bf16", "fp16"]
# What a runtime computes in; "auto": bf16 where the CPU it runs on computes bf16 natively
# (AVX512-BF16 or AMX) and fp32 elsewhere, decided when the artifact is loaded.
Compute = Literal["fp32", "bf16", "fp16", "auto"]
NO_SCHEME = "none"


@dataclass(frozen=True)
class ExportSettings:
    """[export]: what goes on disk."""

    format: str = "onnx"  # a registered backend's format (`kiln env` lists them)
    opset: int = 18  # ONNX opset, wherever an ONNX graph is written
    external_data: Literal["auto", "always", "never"] = "auto"  # onnx weights beside the graph


@dataclass(frozen=True)
class ShapeSettings:
    """[shapes]: static or dynamic batch and resolution."""

    batch_size: int = 1  # images per call of a static-shape export
    dynamic_batch: bool = True
    height: int | None = None  # image pixels; None: the model's native resolution
    width: int | None = None
    dynamic_resolution: bool = False
    # Bounds of the dynamic dims where the format needs them (TensorRT's optimization profile
    # min/max, Core ML's flexible shapes); the optimum is batch_size and the set resolution.
    max_batch_size: int = 16
    min_resolution: int | None = None  # pixels, height and width; None: half the resolution
    max_resolution: int | None = None  # None: twice the resolution


@dataclass(frozen=True)
class PrecisionSettings:
    """[precision]: what the runtime computes in and what the weights are stored as."""

    compute: Compute = "fp32"
    weights: Precision = "fp32"


@dataclass(frozen=True)
class RuntimeSettings:
    """[runtime]: how a loaded artifact runs by default (overridable at load time). A
    runtime's own options are in its section ([openvino] performance_hint, ...)."""

    name: str = "auto"  # auto: the runtime of the backend that writes the format
    device: str = "cpu"
    threads: int | None = None  # None: the runtime's default (all physical cores)


@dataclass(frozen=True)
class ValidationSettings:
    """[validation]: every exported component against its torch reference."""

    batch_sizes: tuple[int, ...] = (1, 4)  # one seeded random feed per entry
    seed: int = 0
    atol: float | None = None  # None: the component's own fp32 tolerance
    min_cosine: float = 0.9999
    min_top1_agreement: float = 1.0
    min_sqnr_db: float | None = None  # signal-to-quantization-noise floor of every output
    # Real data, end to end through the artifact's pipeline against the torch fp32 one:
    # image models: a folder of images (ImageFolder layout gives labels) or "digits".
    data: str | None = None
    max_accuracy_drop: float | None = None  # percentage points of top-1 on labelled `data`
    # generative models: images generated from these prompts (seeds seed, seed+1, ...).
    prompts: tuple[str, ...] = ()
    steps: int = 4
    min_psnr_db: float | None = None
    min_ssim: float | None = None


@dataclass(frozen=True)
class CalibrationSettings:
    """[calibration]: real inputs for the schemes that quantize activations, collected
    before export."""

    data: str | None = None  # image models: a folder of images, or "digits"
    prompts: tuple[str, ...] = ()  # generative models: run through the fp32 torch pipeline
    size: int = 32  # images (image models) or pipeline runs (one per prompt)
    batch_size: int = 1  # images per feed (image models)
    steps: int = 4  # denoising steps per run; each step is one input of the denoiser
    seed: int = 0


@dataclass(frozen=True)
class BuildSettings:
    """[build]: what a build may use of the machine it runs on."""

    # GB of memory the build may hold; None: 90 % of the machine's. A build whose estimate is
    # larger is refused before it exports anything (memory_budget.py).
    max_memory_gb: float | None = None
    # Components larger than that built one block at a time (exporters/by_block.py): "auto"
    # where the whole component would not fit, "always" wherever it can, "never".
    by_block: Literal["auto", "always", "never"] = "auto"


@dataclass(frozen=True)
class QuantizationSettings:
    """[quantization]: a scheme, applied to every component with the format's own tooling,
    and the scheme's own keys (group_size, symmetric, ...), which its config class parses."""

    scheme: str = NO_SCHEME  # `kiln profiles schemes` lists which format has which
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ComponentSettings:
    """[components.<name>]: one component's overrides of [precision], [quantization] and
    [validation] (e.g. an int8 UNet beside an fp32 VAE)."""

    compute: Compute | None = None
    weights: Precision | None = None
    scheme: str | None = None
    atol: float | None = None
    min_cosine: float | None = None
    min_sqnr_db: float | None = None


# Sections with a fixed schema; any other top-level table is a backend's own section.
SECTIONS = (
    "model",
    "export",
    "shapes",
    "precision",
    "runtime",
    "validation",
    "quantization",
    "calibration",
    "components",
    "build",
    "lora",
    "runtime_lora",
    "generation",
)


@dataclass(frozen=True)
class Profile:
    name: str
    family: str
    description: str = ""
    schema_version: int = SCHEMA_VERSION
    model: ModelSettings = field(default_factory=ModelSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    shapes: ShapeSettings = field(default_factory=ShapeSettings)
    precision: PrecisionSettings = field(default_factory=PrecisionSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    quantization: QuantizationSettings = field(default_factory=QuantizationSettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    components: dict[str, ComponentSettings] = field(default_factory=dict)
    build: BuildSettings = field(default_factory=BuildSettings)
    lora: tuple[LoraSettings, ...] = ()
    runtime_lora: RuntimeLoraSettings = field(default_factory=RuntimeLoraSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    # Backend name -> its own section as written ([openvino], [tensorrt], ...).
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "profile") -> Profile:
        """Parse and check against the schema; schema_version 1 documents are upgraded."""
        data = upgrade(data, origin)
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ProfileError(
                f"{origin}: schema_version {version!r} is not supported; this modelkiln reads "
                f"schema_version {SCHEMA_VERSION} (and upgrades 1)"
            )
        generic = {k: v for k, v in data.items() if k in _TOP_KEYS or not isinstance(v, Mapping)}
        # An empty backend section says what its absence says.
        sections = {k: dict(v) for k, v in data.items() if k not in generic and v}
        for name, section in sections.items():
            require_values(section, f"[{name}]", origin)
        quantization = generic.pop("quantization", None)
        profile = parse_section(cls, generic, key_path="", origin=origin, exclude=_OPEN_KEYS)
        profile = replace(
            profile,
            quantization=_quantization(quantization, origin),
            sections=dict(sorted(sections.items())),
        )
        profile.check_schema(origin)
        return profile

    def to_dict(self) -> dict[str, Any]:
        data = without_none(asdict(self))
        data.pop("sections")
        if not self.lora:
            data.pop("lora")  # [[lora]] tables follow; an empty `lora = []` would clash
        data["quantization"] = {"scheme": self.quantization.scheme, **self.quantization.options}
        for name, section in self.sections.items():
            data[name] = without_none(dict(section))
        return data

    def to_toml(self) -> str:
        return to_toml(self.to_dict())

    def with_overrides(self, overrides: Iterable[str]) -> Profile:
        data = self.to_dict()
        for item in overrides:
            apply_override(data, item)
        return Profile.from_dict(data, origin=f"profile '{self.name}' with --set overrides")

    def section(self, name: str) -> Mapping[str, Any]:
        """A backend's own section as written ({} when the profile has none)."""
        return self.sections.get(name, {})

    def for_component(self, name: str) -> Profile:
        """This profile as seen by one component: its [components.<name>] overrides applied."""
        settings = self.components.get(name)
        if settings is None:
            return self
        precision = replace(
            self.precision,
            compute=settings.compute or self.precision.compute,
            weights=settings.weights or self.precision.weights,
        )
        validation = replace(
            self.validation,
            atol=_first(settings.atol, self.validation.atol),
            min_cosine=_first(settings.min_cosine, self.validation.min_cosine),
            min_sqnr_db=_first(settings.min_sqnr_db, self.validation.min_sqnr_db),
        )
        quantization = replace(
            self.quantization, scheme=_first(settings.scheme, self.quantization.scheme)
        )
        return replace(self, precision=precision, validation=validation, quantization=quantization)

    def schemes(self) -> dict[str, str]:
        """[components.<name>] schemes that differ from [quantization]'s."""
        return {
            name: settings.scheme
            for name, settings in self.components.items()
            if settings.scheme is not None
        }

    def scheme_names(self) -> list[str]:
        """Every scheme the profile applies somewhere ("none" left out), sorted."""
        return sorted({self.quantization.scheme, *self.schemes().values()} - {NO_SCHEME})

    def precisions(self) -> list[tuple[str, PrecisionSettings]]:
        """The profile's precision and every component's, labelled for messages."""
        return [("", self.precision)] + [
            (f"{name} ", self.for_component(name).precision) for name in self.components
        ]

    def check_schema(self, origin: str = "profile") -> None:
        """What the schema alone can tell: ranges, and keys that need each other."""
        if self.export.opset < MIN_OPSET:
            raise ProfileError(f"{origin}: export.opset {self.export.opset} < {MIN_OPSET}")
        self._check_shapes(origin)
        self._check_validation(origin)
        for index, lora in enumerate(self.lora):
            if not lora.path.strip():
                raise ProfileError(f"{origin}: lora[{index}].path is empty; name a LoRA file")

    def _check_shapes(self, origin: str) -> None:
        shapes, validation, generation = self.shapes, self.validation, self.generation
        for key, value, low, high in (
            ("shapes.batch_size", shapes.batch_size, 1, MAX_BATCH),
            ("shapes.max_batch_size", shapes.max_batch_size, 1, MAX_BATCH),
            ("validation.steps", validation.steps, 1, MAX_STEPS),
            ("calibration.steps", self.calibration.steps, 1, MAX_STEPS),
            ("generation.steps", generation.steps, 1, MAX_STEPS),
            ("generation.guidance", generation.guidance, 0.0, MAX_GUIDANCE),
            ("generation.taylorseer_interval", generation.taylorseer_interval, 1, MAX_STEPS),
            ("generation.taylorseer_warmup", generation.taylorseer_warmup, 0, MAX_STEPS),
            ("generation.taylorseer_cooldown", generation.taylorseer_cooldown, 0, MAX_STEPS),
            ("generation.taylorseer_order", generation.taylorseer_order, 1, MAX_TAYLORSEER_ORDER),
            ("calibration.size", self.calibration.size, 1, MAX_CALIBRATION),
            ("calibration.batch_size", self.calibration.batch_size, 1, MAX_BATCH),
            ("runtime.threads", self.runtime.threads, 1, 4096),
            ("model.token_merging", self.model.token_merging, 0, 4096),
            ("model.deep_cache", self.model.deep_cache, 0, MAX_STEPS),
            ("model.first_block_cache", self.model.first_block_cache, 0.0, 1.0),
            # at most every source token: 3 of each 2x2 window (models/unet_token_merging.py)
            ("model.token_merging_ratio", self.model.token_merging_ratio, 0.0, 0.75),
            ("build.max_memory_gb", self.build.max_memory_gb, 0.001, 1e6),
        ):
            if value is not None and not low <= value <= high:
                raise ProfileError(f"{origin}: {key} must be in {low}..{high}, got {value}")
        self.model.check(origin)
        self.generation.check(origin, self.model)
        sizes = validation.batch_sizes
        if not sizes or min(sizes) < 1 or max(sizes) > MAX_BATCH:
            raise ProfileError(
                f"{origin}: validation.batch_sizes must be a non-empty list of sizes in "
                f"1..{MAX_BATCH}, got {list(sizes)}"
            )
        if not shapes.dynamic_batch and set(validation.batch_sizes) != {shapes.batch_size}:
            raise ProfileError(
                f"{origin}: with shapes.dynamic_batch = false every validation.batch_sizes entry "
                f"must equal shapes.batch_size = {shapes.batch_size}, "
                f"got {list(validation.batch_sizes)}"
            )
        if shapes.max_batch_size < shapes.batch_size:
            raise ProfileError(
                f"{origin}: shapes.max_batch_size ({shapes.max_batch_size}) must be >= "
                f"shapes.batch_size ({shapes.batch_size})"
            )
        for key in ("height", "width", "min_resolution", "max_resolution"):
            value = getattr(shapes, key)
            if value is not None and (value < 8 or value % 8 or value > MAX_PIXELS_PER_SIDE):
                raise ProfileError(
                    f"{origin}: shapes.{key} must be a multiple of 8 in 8..{MAX_PIXELS_PER_SIDE}"
                    f", got {value}"
                )
        if shapes.dynamic_batch and max(validation.batch_sizes) > shapes.max_batch_size:
            raise ProfileError(
                f"{origin}: validation.batch_sizes {list(validation.batch_sizes)} exceed "
                f"shapes.max_batch_size = {shapes.max_batch_size}; raise it or validate smaller"
            )
        least, most = shapes.min_resolution, shapes.max_resolution
        if least is not None and most is not None and least > most:
            raise ProfileError(
                f"{origin}: shapes.min_resolution ({least}) > shapes.max_resolution ({most})"
            )
        if any(layer < 1 for layer in self.model.hidden_layers):
            raise ProfileError(
                f"{origin}: model.hidden_layers are 1-based block numbers, "
                f"got {list(self.model.hidden_layers)}"
            )

    def _check_validation(self, origin: str) -> None:
        validation = self.validation
        for key in ("min_cosine", "min_top1_agreement"):
            value = getattr(validation, key)
            if not 0.0 <= value <= 1.0:
                raise ProfileError(f"{origin}: validation.{key} must be in [0, 1], got {value}")
        for where, atol in [("validation", validation.atol)] + [
            (f"components.{name}", settings.atol) for name, settings in self.components.items()
        ]:
            if atol is not None and atol <= 0:
                raise ProfileError(f"{origin}: {where}.atol must be > 0, got {atol}")
        if validation.max_accuracy_drop is not None and validation.data is None:
            raise ProfileError(
                f"{origin}: validation.max_accuracy_drop needs labelled images: set "
                'validation.data to an ImageFolder directory (or "digits")'
            )
        gates = [k for k in ("min_psnr_db", "min_ssim") if getattr(validation, k) is not None]
        if gates and not validation.prompts:
            raise ProfileError(
                f"{origin}: validation.{gates[0]} needs validation.prompts to generate images from"
            )


# Parsed apart from the rest: [quantization] (open to its scheme) and the backend sections.
_OPEN_KEYS = frozenset({"quantization", "sections"})
_TOP_KEYS = frozenset(f.name for f in fields(Profile)) - {"sections"}


def _quantization(data: Any, origin: str) -> QuantizationSettings:
    if data is None:
        return QuantizationSettings()
    if not isinstance(data, Mapping):
        raise ProfileError(f"{origin}: [quantization] must be a table, got {data!r}")
    options = dict(data)
    scheme = options.pop("scheme", NO_SCHEME)
    if not isinstance(scheme, str):
        raise ProfileError(f"{origin}: quantization.scheme must be str, got {scheme!r}")
    require_values(options, "[quantization]", origin)
    return QuantizationSettings(scheme=scheme, options=dict(sorted(options.items())))


def _first(value: Any, default: Any) -> Any:
    return default if value is None else value


# --- bundled profiles -----------------------------------------------------------------------


def bundled_profiles_dir() -> Path:
    """profiles/ at the repository root, or its copy inside an installed wheel."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "_profiles", package.parent / "profiles"):
        if candidate.is_dir():
            return candidate
    raise ProfileError(f"bundled profiles not found beside {package}; reinstall modelkiln")


def bundled_profile_names() -> list[str]:
    return sorted(p.stem for p in bundled_profiles_dir().glob("*.toml"))


def read_profile(profile: str | Path | Profile, overrides: Iterable[str] = ()) -> Profile:
    """A bundled profile name, a path to a TOML file, or a Profile; then --set overrides.
    Checked against the schema only: `modelkiln.plan.load_profile` checks the rest."""
    if isinstance(profile, Profile):
        resolved = profile
    else:
        path = Path(profile)
        if not path.is_file():
            names = bundled_profile_names()
            if str(profile) not in names:
                raise ProfileError(
                    f"no profile '{profile}': not a file and not a bundled profile"
                    f"{did_you_mean(str(profile), names)}; see `kiln profiles list`"
                )
            path = bundled_profiles_dir() / f"{profile}.toml"
        resolved = read_profile_file(path)
    overrides = list(overrides)
    return resolved.with_overrides(overrides) if overrides else resolved


def read_profile_file(path: Path) -> Profile:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ProfileError(f"profile {path} is not valid TOML: {error}") from error
    except UnicodeDecodeError as error:
        raise ProfileError(
            f"profile {path} is not text (byte {error.start} is not UTF-8); a profile is a "
            "TOML file: start from `kiln profiles show NAME`"
        ) from error
    except OSError as error:
        raise ProfileError(f"cannot read profile {path}: {error.strerror}") from error
    profile = Profile.from_dict(data, origin=f"profile {path}")
    if not profile.lora:
        return profile
    # A LoRA named relative to the profile file lies beside it, wherever kiln runs from.
    beside = [str(path.parent / Path(lora.path).expanduser()) for lora in profile.lora]
    loras = tuple(replace(lora, path=at) for lora, at in zip(profile.lora, beside, strict=True))
    return replace(profile, lora=loras)


__all__ = [
    "MOVED_IN_V2",
    "NO_SCHEME",
    "SCHEMA_VERSION",
    "BuildSettings",
    "CalibrationSettings",
    "ComponentSettings",
    "ExportSettings",
    "GenerationSettings",
    "LoraSettings",
    "ModelSettings",
    "PrecisionSettings",
    "Profile",
    "QuantizationSettings",
    "RuntimeLoraSettings",
    "RuntimeSettings",
    "ShapeSettings",
    "ValidationSettings",
    "bundled_profile_names",
    "parse_section",
    "read_profile",
    "upgrade",
]
