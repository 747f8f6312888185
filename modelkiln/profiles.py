"""Deployment profiles: typed frozen dataclasses parsed from TOML.

A profile says everything a build needs (format, precision, shapes, runtime settings,
validation tolerances); nothing in the build reads settings from anywhere else. Unknown keys
are rejected with their key path and a did-you-mean; ``None`` (an omitted key) means
"the default of the component or runtime".
"""

from __future__ import annotations

import tomllib
import types
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, Union, cast, get_args, get_origin, get_type_hints

from modelkiln.errors import ProfileError, UnsupportedError, did_you_mean

SCHEMA_VERSION = 1
MIN_OPSET = 17

Task = Literal[
    "auto", "image-classification", "image-feature-extraction", "text-to-image", "inpainting"
]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class ModelSettings:
    """[model]: what to take from the source."""

    task: Task = "auto"  # auto: classification when the source has a head
    # Extra outputs hidden_state_<k>: the output of transformer block k (1-based).
    hidden_layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class ExportSettings:
    """[export]: what goes on disk."""

    format: str = "onnx"  # onnx | openvino | coreml | tensorrt | torch
    opset: int = 18
    via: Literal["torch", "onnx"] = "torch"  # openvino: convert the torch module or our ONNX
    external_data: Literal["auto", "always", "never"] = "auto"  # onnx weights beside the graph
    # onnx for ONNX Runtime on the CPU: its fused Attention/Gelu ops (exporters/onnx_fusions.py)
    fusions: Literal["auto", "none"] = "auto"


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

    compute: Precision = "fp32"
    weights: Precision = "fp32"


@dataclass(frozen=True)
class RuntimeSettings:
    """[runtime]: how a loaded artifact runs by default (overridable at load time)."""

    name: str = "auto"  # auto: the format's own runtime
    device: str = "cpu"
    threads: int | None = None  # None: the runtime's default (all physical cores)
    performance_hint: Literal["latency", "throughput"] | None = None  # openvino
    graph_optimization: Literal["all", "extended", "basic", "disabled"] = "all"  # onnxruntime


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
    # diffusion models: images generated from these prompts (seeds seed, seed+1, ...).
    prompts: tuple[str, ...] = ()
    steps: int = 4
    min_psnr_db: float | None = None
    min_ssim: float | None = None


@dataclass(frozen=True)
class CalibrationSettings:
    """[calibration]: real inputs for the schemes that quantize activations (int8-static,
    int8-hybrid), collected before export."""

    data: str | None = None  # image models: a folder of images, or "digits"
    prompts: tuple[str, ...] = ()  # diffusion: run through the fp32 torch pipeline
    size: int = 32  # images (image models) or pipeline runs (diffusion, one per prompt)
    batch_size: int = 1  # images per feed (image models)
    steps: int = 4  # diffusion: denoising steps per run; each step is one UNet input
    seed: int = 0


@dataclass(frozen=True)
class QuantizationSettings:
    """[quantization]: a scheme applied to every exported component with the format's own
    tooling (modelkiln.quantize.SUPPORT says which format has which scheme)."""

    scheme: str = "none"  # `kiln profiles schemes` / README: which format has which
    symmetric: bool = False  # int8/int4 weights: symmetric (no zero point) or asymmetric
    group_size: int = 128  # int4/nf4: weights per scale along the input channels (block size)
    ratio: float = 1.0  # openvino int4/nf4: share of the layers in 4 bits (the rest int8)
    per_channel: bool = False  # onnx int8: one scale per output channel
    # int8-static (onnx): how activation ranges are taken from the calibration outputs.
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    # int8-static / int8-hybrid (openvino): nncf's transformer-aware scheme (keeps softmax,
    # layer norm and the like in floating point) or its default for convolutional networks.
    model_type: Literal["transformer", "default"] = "transformer"
    # palettize4-weights (coreml): how the 16 lookup-table entries are chosen.
    palettization: Literal["kmeans", "uniform"] = "kmeans"


@dataclass(frozen=True)
class CoreMLSettings:
    """[coreml]: the ML Program of format 'coreml'."""

    # The oldest OS the .mlpackage loads on; decides the ops compression may use (int4,
    # per-block scales and grouped lookup tables need iOS18 / macOS15).
    target: Literal["iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15"] = "iOS17"
    # Where Core ML may run it; not stored in the package, so the manifest carries it.
    compute_units: Literal["all", "cpu_and_ne", "cpu_and_gpu", "cpu_only"] = "all"
    # Flexible dims ([shapes] dynamic batch / resolution): a list of shapes Core ML compiles
    # for each (what the Neural Engine runs), or any size within the bounds (CPU / GPU only).
    flexible_shapes: Literal["enumerated", "range"] = "enumerated"


@dataclass(frozen=True)
class TensorRTSettings:
    """[tensorrt]: the engine build of format 'tensorrt' (optimization profile from [shapes])."""

    workspace_mb: int | None = None  # builder memory pool; None: TensorRT's default (all)
    optimization_level: int = 3  # builder_optimization_level 0-5: build time vs engine speed
    timing_cache: bool = True  # reuse kernel timings across builds on the same GPU
    engine_cache: bool = True  # skip the build when GPU, TensorRT, ONNX and recipe match


@dataclass(frozen=True)
class ComponentSettings:
    """[components.<name>]: one component's overrides of [precision], [quantization] and
    [validation] (e.g. an int8 UNet beside an fp32 VAE)."""

    compute: Precision | None = None
    weights: Precision | None = None
    scheme: str | None = None
    atol: float | None = None
    min_cosine: float | None = None
    min_sqnr_db: float | None = None


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
    coreml: CoreMLSettings = field(default_factory=CoreMLSettings)
    tensorrt: TensorRTSettings = field(default_factory=TensorRTSettings)
    components: dict[str, ComponentSettings] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "profile") -> Profile:
        profile = _from_mapping(cls, data, key_path="", origin=origin)
        profile.check(origin)
        return profile

    def to_dict(self) -> dict[str, Any]:
        return _without_none(asdict(self))

    def to_toml(self) -> str:
        return _to_toml(self.to_dict())

    def with_overrides(self, overrides: Iterable[str]) -> Profile:
        data = self.to_dict()
        for item in overrides:
            _apply_override(data, item)
        return Profile.from_dict(data, origin=f"profile '{self.name}' with --set overrides")

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

    def check_components(self, names: Iterable[str], family: str) -> None:
        """[components.<name>] must name components the model has."""
        known = list(names)
        for name in self.components:
            if name not in known:
                raise ProfileError(
                    f"profile '{self.name}' has [components.{name}] but {family} models have: "
                    f"{', '.join(known)}{did_you_mean(name, known)}"
                )

    @property
    def runtime_name(self) -> str:
        """The runtime that runs this profile's artifacts ("auto" resolved)."""
        if self.runtime.name != "auto":
            return self.runtime.name
        from modelkiln.exporters import EXPORTERS

        return EXPORTERS.get(self.export.format).default_runtime

    def check(self, origin: str = "profile") -> None:
        """Validate against the support matrix, before any export starts."""
        from modelkiln.exporters import EXPORTERS
        from modelkiln.models import FAMILIES
        from modelkiln.runtimes import RUNTIMES

        if self.schema_version != SCHEMA_VERSION:
            raise ProfileError(
                f"{origin}: schema_version {self.schema_version} is not supported; this "
                f"modelkiln reads schema_version {SCHEMA_VERSION}"
            )
        _require_known(self.family, FAMILIES.names(), f"{origin}: family")
        _require_known(self.export.format, EXPORTERS.names(), f"{origin}: export.format")
        exporter = EXPORTERS.get(self.export.format)
        runtime_name = self.runtime_name
        _require_known(runtime_name, RUNTIMES.names(), f"{origin}: runtime.name")
        runtime = RUNTIMES.get(runtime_name)
        if self.export.format not in runtime.formats:
            can_run = [n for n in RUNTIMES.names() if self.export.format in RUNTIMES.get(n).formats]
            raise UnsupportedError(
                f"{origin}: runtime '{runtime_name}' cannot run format '{self.export.format}'; "
                f"runtimes for it: {', '.join(can_run)}"
            )
        for where, precision in self._precisions():
            if precision.weights not in exporter.weight_precisions:
                raise UnsupportedError(
                    f"{origin}: format '{self.export.format}' cannot store {where}weights in "
                    f"{precision.weights}; supported: "
                    f"{', '.join(sorted(exporter.weight_precisions))}"
                )
            if precision.compute not in runtime.compute_precisions:
                raise UnsupportedError(
                    f"{origin}: runtime '{runtime_name}' cannot compute {where}in "
                    f"{precision.compute}; supported: "
                    f"{', '.join(sorted(runtime.compute_precisions))}"
                )
            if runtime.compute_follows_weights and precision.compute != precision.weights:
                raise UnsupportedError(
                    f"{origin}: runtime '{runtime_name}' computes {where}in the precision the "
                    f"weights are stored in, so compute ({precision.compute}) must equal weights "
                    f"({precision.weights}); set both to '{precision.weights}'"
                )
        if self.export.opset < MIN_OPSET:
            raise ProfileError(f"{origin}: export.opset {self.export.opset} < {MIN_OPSET}")
        if self.export.via == "onnx" and self.export.format != "openvino":
            raise ProfileError(
                f"{origin}: export.via = 'onnx' only applies to format 'openvino', "
                f"not '{self.export.format}'"
            )
        self._check_shapes(origin)
        self._check_quantization(origin)
        self._check_backend_sections(origin)

    def _check_backend_sections(self, origin: str) -> None:
        """[coreml] and [tensorrt], and what those formats cannot take of [shapes]."""
        from modelkiln.models import FAMILIES

        diffusion = FAMILIES.get(self.family).real_inputs == "prompts"
        if self.export.format == "coreml" and self.shapes.dynamic_batch and diffusion:
            # coremltools builds group norm's reshape from the batch size as a constant.
            raise UnsupportedError(
                f"{origin}: Core ML's converter cannot give the UNet and VAE a flexible "
                "batch (group norm); set shapes.dynamic_batch = false and shapes.batch_size "
                "to the images per call"
            )
        trt = self.tensorrt
        if not 0 <= trt.optimization_level <= 5:
            raise ProfileError(
                f"{origin}: tensorrt.optimization_level must be 0-5, got {trt.optimization_level}"
            )
        if trt.workspace_mb is not None and trt.workspace_mb < 1:
            raise ProfileError(
                f"{origin}: tensorrt.workspace_mb must be >= 1, got {trt.workspace_mb}"
            )

    def _check_quantization(self, origin: str) -> None:
        from modelkiln.quantize import check_scheme

        settings = self.quantization
        check_scheme(self.export.format, settings.scheme, origin)
        schemes = {settings.scheme, *self.schemes().values()} - {"none"}
        if schemes and self.export.format == "onnx" and self.precision.weights != "fp32":
            raise UnsupportedError(
                f"{origin}: onnx quantization schemes start from fp32 weights, not "
                f"{self.precision.weights}; set precision.weights = 'fp32' with scheme "
                f"{', '.join(sorted(schemes))}"
            )
        for name, scheme in self.schemes().items():
            check_scheme(self.export.format, scheme, f"{origin} [components.{name}]")
        if settings.group_size < 1:
            raise ProfileError(
                f"{origin}: quantization.group_size must be >= 1, got {settings.group_size}"
            )
        four_bit = {settings.scheme, *self.schemes().values()} & {"int4-weights", "nf4-weights"}
        if four_bit and self.export.format == "onnx":
            from modelkiln.quantize.onnx import BLOCK_SIZES

            if settings.group_size not in BLOCK_SIZES:
                raise ProfileError(
                    f"{origin}: onnxruntime's 4-bit kernels take quantization.group_size in "
                    f"{', '.join(map(str, BLOCK_SIZES))}, got {settings.group_size}"
                )
        if four_bit and self.export.format == "tensorrt":
            from modelkiln.tensorrt.onnx_checks import INT4_BLOCK_SIZES

            if settings.group_size not in INT4_BLOCK_SIZES:
                raise ProfileError(
                    f"{origin}: TensorRT's int4 weights take quantization.group_size in "
                    f"{', '.join(map(str, INT4_BLOCK_SIZES))}, got {settings.group_size}"
                )
        if four_bit and self.export.format == "coreml":
            from modelkiln.quantize.coreml import IOS18_TARGETS

            if self.coreml.target not in IOS18_TARGETS:
                raise UnsupportedError(
                    f"{origin}: Core ML runs {', '.join(sorted(four_bit))} from iOS18 / macOS15 "
                    f"(per-block int4 scales, per-group lookup tables), not {self.coreml.target}; "
                    "set coreml.target = 'iOS18' (or 'macOS15'), or use int8-weights or "
                    "palettize4-weights"
                )
        if not 0.0 < settings.ratio <= 1.0:
            raise ProfileError(
                f"{origin}: quantization.ratio must be in (0, 1], got {settings.ratio}"
            )
        self._check_real_data(origin)

    def _check_real_data(self, origin: str) -> None:
        """Calibration and end-to-end validation take images or prompts, as the family does."""
        from modelkiln.models import FAMILIES

        wants = FAMILIES.get(self.family).real_inputs  # "images" or "prompts"
        key = "data" if wants == "images" else "prompts"
        calibration, validation = self.calibration, self.validation
        for section, name in ((calibration, "calibration"), (validation, "validation")):
            other = "prompts" if key == "data" else "data"
            if getattr(section, other):
                raise ProfileError(
                    f"{origin}: {name}.{other} does not apply to {self.family} models, which "
                    f"take {wants}: use {name}.{key}"
                )
        if calibration.size < 1 or calibration.batch_size < 1 or calibration.steps < 1:
            raise ProfileError(f"{origin}: calibration.size, batch_size and steps must be >= 1")
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
        if validation.steps < 1:
            raise ProfileError(f"{origin}: validation.steps must be >= 1")

    def require_calibration_data(self) -> None:
        """A build with int8-static / int8-hybrid needs real inputs. Not checked with the
        profile: a bundled profile cannot know the user's images; the build asks for them."""
        from modelkiln.models import FAMILIES
        from modelkiln.quantize import CALIBRATED

        wants = FAMILIES.get(self.family).real_inputs
        key = "data" if wants == "images" else "prompts"
        calibrated = sorted({self.quantization.scheme, *self.schemes().values()} & CALIBRATED)
        if calibrated and not getattr(self.calibration, key):
            example = "DIR (a folder of images) or digits" if key == "data" else "'[\"a photo\"]'"
            raise ProfileError(
                f"profile '{self.name}': quantization scheme {', '.join(calibrated)} needs "
                f"calibration {wants}: set [calibration] {key} in the profile, or "
                f"--set calibration.{key}={example}"
            )

    def _precisions(self) -> list[tuple[str, PrecisionSettings]]:
        """The profile's precision and every component's, labelled for messages."""
        return [("", self.precision)] + [
            (f"{name} ", self.for_component(name).precision) for name in self.components
        ]

    def _check_shapes(self, origin: str) -> None:
        shapes, validation = self.shapes, self.validation
        if shapes.batch_size < 1:
            raise ProfileError(f"{origin}: shapes.batch_size must be >= 1, got {shapes.batch_size}")
        if not validation.batch_sizes or min(validation.batch_sizes) < 1:
            raise ProfileError(
                f"{origin}: validation.batch_sizes must be a non-empty list of sizes >= 1, "
                f"got {list(validation.batch_sizes)}"
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
            if value is not None and (value < 8 or value % 8):
                raise ProfileError(
                    f"{origin}: shapes.{key} must be a positive multiple of 8, got {value}"
                )
        if shapes.dynamic_batch and max(validation.batch_sizes) > shapes.max_batch_size:
            raise ProfileError(
                f"{origin}: validation.batch_sizes {list(validation.batch_sizes)} exceed "
                f"shapes.max_batch_size = {shapes.max_batch_size}; raise it or validate smaller"
            )
        low, high = shapes.min_resolution, shapes.max_resolution
        if low is not None and high is not None and low > high:
            raise ProfileError(
                f"{origin}: shapes.min_resolution ({low}) > shapes.max_resolution ({high})"
            )
        for key in ("min_cosine", "min_top1_agreement"):
            value = getattr(validation, key)
            if not 0.0 <= value <= 1.0:
                raise ProfileError(f"{origin}: validation.{key} must be in [0, 1], got {value}")
        for where, atol in [("validation", validation.atol)] + [
            (f"components.{name}", settings.atol) for name, settings in self.components.items()
        ]:
            if atol is not None and atol <= 0:
                raise ProfileError(f"{origin}: {where}.atol must be > 0, got {atol}")
        if any(layer < 1 for layer in self.model.hidden_layers):
            raise ProfileError(
                f"{origin}: model.hidden_layers are 1-based block numbers, "
                f"got {list(self.model.hidden_layers)}"
            )


# --- bundled profiles -----------------------------------------------------------------------


def _first(value: Any, default: Any) -> Any:
    return default if value is None else value


def bundled_profiles_dir() -> Path:
    """profiles/ at the repository root, or its copy inside an installed wheel."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_profiles", package.parent / "profiles"):
        if candidate.is_dir():
            return candidate
    raise ProfileError(f"bundled profiles not found beside {package}; reinstall modelkiln")


def bundled_profile_names() -> list[str]:
    return sorted(p.stem for p in bundled_profiles_dir().glob("*.toml"))


def load_profile(profile: str | Path | Profile, overrides: Iterable[str] = ()) -> Profile:
    """A bundled profile name, a path to a TOML file, or a Profile; then --set overrides."""
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
    except OSError as error:
        raise ProfileError(f"cannot read profile {path}: {error.strerror}") from error
    return Profile.from_dict(data, origin=f"profile {path}")


# --- parsing ------------------------------------------------------------------------------


def _from_mapping(cls: type, data: Any, *, key_path: str, origin: str) -> Any:
    section = f"[{key_path.rstrip('.')}]" if key_path else "the top level"
    if not isinstance(data, Mapping):
        raise ProfileError(f"{origin}: {section} must be a table, got {data!r}")
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            raise ProfileError(
                f"{origin}: unknown key '{key_path}{key}'{did_you_mean(key, known)}; "
                f"known keys in {section}: {', '.join(known)}"
            )
    kwargs = {
        name: _coerce(hints[name], data[name], f"{key_path}{name}", origin)
        for name in known
        if name in data
    }
    missing = [
        f.name
        for f in fields(cls)
        if f.name not in kwargs and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise ProfileError(f"{origin}: missing required key(s): {', '.join(missing)}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str, origin: str) -> Any:
    origin_type = get_origin(hint)
    if is_dataclass(hint):
        return _from_mapping(cast(type, hint), value, key_path=f"{key}.", origin=origin)
    if origin_type in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        return _coerce(options[0], value, key, origin)
    if origin_type is Literal:
        choices = get_args(hint)
        if value not in choices:
            shown = ", ".join(repr(c) for c in choices)
            raise ProfileError(
                f"{origin}: {key} = {value!r} is not one of {shown}"
                f"{did_you_mean(str(value), map(str, choices))}"
            )
        return value
    if origin_type is dict:
        if not isinstance(value, Mapping):
            raise ProfileError(f"{origin}: [{key}] must be a table, got {value!r}")
        _, item_type = get_args(hint)
        return {
            name: _coerce(item_type, item, f"{key}.{name}", origin) for name, item in value.items()
        }
    if origin_type is tuple:
        if not isinstance(value, list | tuple):
            raise ProfileError(f"{origin}: {key} must be a list, got {value!r}")
        (item_type, _) = get_args(hint)
        return tuple(_coerce(item_type, item, key, origin) for item in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (str, int, float, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ProfileError(
                f"{origin}: {key} must be {hint.__name__}, got {type(value).__name__} {value!r}"
            )
        return value
    raise TypeError(f"profile field {key} has an unsupported type {hint!r}")  # a bug, not input


def _require_known(value: str, known: list[str], what: str) -> None:
    if value not in known:
        raise UnsupportedError(
            f"{what} = '{value}' is unknown{did_you_mean(value, known)}; known: {', '.join(known)}"
        )


def _apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one `--set dotted.key=value`; the value is parsed as TOML, else taken as a string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ProfileError(f"--set expects key=value (e.g. validation.atol=1e-3), got '{item}'")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    *sections, leaf = key.split(".")
    target = data
    for section in sections:
        child = target.setdefault(section, {})
        if not isinstance(child, dict):
            raise ProfileError(f"--set {key}: '{section}' is not a section of the profile")
        target = child
    target[leaf] = value


def _without_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _without_none(v) for k, v in data.items() if v is not None}
    if isinstance(data, tuple):
        return list(data)
    return data


def _to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Tables of scalars and flat lists, nested tables as [a.b] sections (empty ones omitted)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for section, values in data.items():
        if isinstance(values, dict) and values:
            text = _to_toml(values, f"{prefix}{section}.")
            has_scalars = any(not isinstance(v, dict) for v in values.values())
            header = [f"[{prefix}{section}]"] if has_scalars else []
            lines += ["", *header, *text.rstrip("\n").splitlines()]
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


__all__ = [
    "ComponentSettings",
    "CoreMLSettings",
    "ExportSettings",
    "ModelSettings",
    "PrecisionSettings",
    "Profile",
    "RuntimeSettings",
    "ShapeSettings",
    "TensorRTSettings",
    "ValidationSettings",
    "bundled_profile_names",
    "load_profile",
]
