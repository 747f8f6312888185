"""kiln.json as typed records, and the one codec that writes and reads them.

Everything an artifact records is a frozen dataclass here; nothing else reads kiln.json by key.
Two parts stay free-form on purpose, each owned by one piece of code: `model_info` (the
family's facts for its pipeline) and the backend's own reports (a session's `runtime` facts, a
quantizer's `details`). Schema 1 manifests are upgraded on read (they recorded no pipeline,
and their profile is in profile schema 1).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from modelkiln.errors import ArtifactError, ProfileError, UnsupportedError
from modelkiln.evaluation.metrics import OutputMetrics, Tolerance
from modelkiln.profiles import Profile
from modelkiln.specs import TensorSpec

MANIFEST_SCHEMA_VERSION = 2
# kiln.json's digest of itself: sha256 of its canonical JSON without this key. An edit (its
# labels, its preprocessing, a file's hash) is refused on read; `kiln verify` covers the files.
DIGEST_KEY = "manifest_sha256"


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str


@dataclass(frozen=True)
class SingleFileRecord:
    """A single-file checkpoint the build read (through its diffusers conversion)."""

    path: str  # absolute
    sha256: str
    model_type: str  # diffusers' name for the architecture its keys show
    pipeline: str  # the diffusers pipeline class it was loaded as
    dtype: str
    config: str  # the folder, or Hub repository, its configs and tokenizers came from


@dataclass(frozen=True)
class LoraRecord:
    """A LoRA fused into the source before export."""

    path: str  # absolute
    sha256: str
    scale: float
    layout: str  # diffusers, kohya or peft: how its keys were written


@dataclass(frozen=True)
class SourceRecord:
    spec: str  # what the user passed
    hub_id: str | None = None
    revision: str | None = None  # the commit a hub source resolved to
    local_dir: str | None = None
    weights_sha256: dict[str, str] = field(default_factory=dict)  # file -> sha256
    single_file: SingleFileRecord | None = None
    loras: tuple[LoraRecord, ...] = ()

    @property
    def name(self) -> str:
        """The hub id, else what the user passed."""
        return self.hub_id or self.spec

    def location(self) -> str:
        """Where to load the source again from any working directory: the hub id, else the
        absolute folder the build read (spec may be relative to the build's directory)."""
        if self.hub_id:
            return self.hub_id
        if self.local_dir and Path(self.local_dir).is_dir():
            return self.local_dir
        return self.spec


@dataclass(frozen=True)
class OutputScore:
    """One output against its reference (evaluation.metrics.OutputMetrics, summarised)."""

    max_abs: float
    mean_abs: float
    min_cosine: float
    sqnr_db: float | None  # None: identical outputs (JSON has no infinity)
    top1_agreement: float | None = None  # logits only
    non_finite: bool = False

    @classmethod
    def of(cls, metrics: OutputMetrics) -> OutputScore:
        sqnr = metrics.sqnr_db
        return cls(
            max_abs=metrics.max_abs,
            mean_abs=metrics.sum_abs / max(metrics.count, 1),
            min_cosine=metrics.min_cosine,
            sqnr_db=None if sqnr == float("inf") else round(sqnr, 2),
            top1_agreement=metrics.top1_agreement,
            non_finite=metrics.non_finite,
        )


@dataclass(frozen=True)
class ValidationRecord:
    """A component against its torch reference, as the build (or `kiln validate`) ran it."""

    passed: bool | None  # None: nothing here could run it (`not_run` says why)
    tolerance: Tolerance | None = None
    outputs: dict[str, OutputScore] = field(default_factory=dict)
    label: str = ""  # format, runtime, precision and scheme it ran with
    batch_sizes: tuple[int, ...] = ()  # seeded random feeds of these sizes ...
    inputs: str | None = None  # ... or a description of the real feeds it ran on
    not_run: str | None = None
    reference: str | None = None  # artifact path of the saved torch outputs (not run)
    # Built block by block: the torch reference ran one block at a time, and each block (its
    # worst output) was also checked alone on the same inputs.
    by_block: dict[str, OutputScore] = field(default_factory=dict)
    # Why the whole component was validated as the chain of its compressed blocks (each run on
    # the previous ones' outputs) rather than run whole: a check that would not fit memory.
    chained: str | None = None

    def to_json(self) -> dict[str, Any]:
        """As kiln.json holds it (and `kiln build --json`, `kiln validate --json` print it)."""
        return _validation_json(self)


@dataclass(frozen=True)
class QuantizationRecord:
    """What a scheme's handler did to a component."""

    scheme: str
    quantized_weights: int
    bytes_before: int
    bytes_after: int
    # In memory, where the files keep other weights than the runtime holds (torch).
    memory_bytes_before: int | None = None
    memory_bytes_after: int | None = None
    # The handler's own report (its ops, modes, block sizes, ...).
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, scheme: str, report: Mapping[str, Any]) -> QuantizationRecord:
        own = {f.name for f in fields(cls)} - {"scheme", "details"}
        return cls(
            scheme=scheme,
            details={k: v for k, v in report.items() if k not in own},
            **{k: v for k, v in report.items() if k in own},
        )


@dataclass(frozen=True)
class EndToEndRecord:
    """The artifact's pipeline against torch fp32 on real data ([validation] data/prompts)."""

    not_run: str | None = None
    # images
    data: str | None = None
    images: int | None = None
    outputs: dict[str, OutputScore] = field(default_factory=dict)
    reference_accuracy: float | None = None  # top-1, fractions
    accuracy: float | None = None
    accuracy_drop: float | None = None  # percentage points
    # prompts
    prompts: tuple[str, ...] = ()
    steps: int | None = None
    psnr_db: tuple[float | None, ...] = ()  # None: identical images
    ssim: tuple[float, ...] = ()


@dataclass(frozen=True)
class BuildRecord:
    created: str  # ISO 8601, UTC
    seconds: float
    peak_rss_bytes: int
    host: dict[str, Any]  # modelkiln.env.host_info()
    # What decided its files (build_cache.build_key): the same key, the same artifact.
    key: str | None = None


@dataclass(frozen=True)
class ComponentRecord:
    name: str
    entry: str  # the file (or directory, for torch) a runtime opens, relative to the artifact
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    validation: ValidationRecord = field(default_factory=lambda: ValidationRecord(passed=None))
    # What the runtime reported while validating, e.g. {"inference_precision": "f32"}.
    runtime: dict[str, Any] = field(default_factory=dict)
    quantization: QuantizationRecord | None = None


@dataclass(frozen=True)
class Manifest:
    family: str
    pipeline: str  # the family's pipeline that runs the artifact
    task: str
    format: str
    runtime: str  # the runtime that validated the build and runs it by default
    source: SourceRecord
    profile: Profile
    components: dict[str, ComponentRecord]
    files: dict[str, FileRecord]
    # Torch-free facts the family's pipelines need: preprocessing, labels, sizes, ...
    model_info: dict[str, Any]
    versions: dict[str, str]
    build: BuildRecord
    modelkiln_version: str
    schema_version: int = MANIFEST_SCHEMA_VERSION
    end_to_end: EndToEndRecord | None = None

    @property
    def size_bytes(self) -> int:
        return sum(record.size for record in self.files.values())

    def to_json(self) -> dict[str, Any]:
        return encode_manifest(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: Path) -> Manifest:
        return decode_manifest(data, where)


# --- the codec ------------------------------------------------------------------------------


def encode_manifest(manifest: Manifest) -> dict[str, Any]:
    """kiln.json's document: the records' fields, None and empty values left out, sealed
    with its digest."""
    return seal(
        {
            "schema_version": manifest.schema_version,
            "family": manifest.family,
            "pipeline": manifest.pipeline,
            "task": manifest.task,
            "format": manifest.format,
            "runtime": manifest.runtime,
            "source": asdict(manifest.source),
            "profile": manifest.profile.to_dict(),
            "components": {k: _component_json(v) for k, v in manifest.components.items()},
            "files": {k: asdict(v) for k, v in manifest.files.items()},
            "model_info": manifest.model_info,
            "versions": manifest.versions,
            "build": asdict(manifest.build),
            "modelkiln_version": manifest.modelkiln_version,
            "end_to_end": _end_to_end_json(manifest.end_to_end),
        }
    )


def manifest_digest(document: Mapping[str, Any]) -> str:
    """sha256 of the document's canonical JSON (sorted keys, no spaces), its digest left out."""
    body = {key: value for key, value in document.items() if key != DIGEST_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def seal(document: dict[str, Any]) -> dict[str, Any]:
    """The document with its digest (replaced in place, or added last)."""
    return {**document, DIGEST_KEY: manifest_digest(document)}


def _end_to_end_json(record: EndToEndRecord | None) -> dict[str, Any]:
    if record is None:
        return {}
    data = _compact(asdict(record))
    if record.outputs:
        data["outputs"] = _scores_json(record.outputs)
    return data


def _scores_json(scores: Mapping[str, OutputScore]) -> dict[str, Any]:
    """Each output's score; sqnr_db None (identical outputs) kept, other absent values not."""
    return {
        name: {**_compact(asdict(score)), "sqnr_db": score.sqnr_db}
        | ({"non_finite": True} if score.non_finite else {})
        for name, score in scores.items()
    }


def decode_manifest(data: Mapping[str, Any], where: Path) -> Manifest:
    """The records of a kiln.json document; a malformed one raises a "rebuild" error."""
    version = data.get("schema_version")
    _check_digest(data, where, required=version == MANIFEST_SCHEMA_VERSION)
    if version == 1:
        data = _upgrade_v1(data, where)
    elif version != MANIFEST_SCHEMA_VERSION:
        raise ArtifactError(
            f"{where} has manifest schema_version {version!r}; this modelkiln reads "
            f"{MANIFEST_SCHEMA_VERSION} (and 1): rebuild the artifact or upgrade modelkiln"
        )
    try:
        end_to_end = data.get("end_to_end") or {}
        return Manifest(
            family=data["family"],
            pipeline=data["pipeline"],
            task=data["task"],
            format=data["format"],
            runtime=data["runtime"],
            source=_source(data["source"]),
            profile=Profile.from_dict(data["profile"], origin=f"{where}: its profile"),
            components={k: _component(v, where) for k, v in data["components"].items()},
            files={inside(k, "file", where): FileRecord(**v) for k, v in data["files"].items()},
            model_info=dict(data["model_info"]),
            versions=dict(data["versions"]),
            build=BuildRecord(**data["build"]),
            modelkiln_version=data["modelkiln_version"],
            end_to_end=_end_to_end(end_to_end) if end_to_end else None,
        )
    except (KeyError, TypeError, AttributeError, ValueError, ProfileError) as error:
        raise ArtifactError(
            f"{where} is malformed ({type(error).__name__}: {error}); rebuild the artifact"
        ) from error


def _check_digest(data: Mapping[str, Any], where: Path, *, required: bool) -> None:
    recorded = data.get(DIGEST_KEY)
    if recorded is None and not required:
        return  # schema 1 wrote none
    if recorded != manifest_digest(data):
        problem = "has no digest" if recorded is None else "does not match its digest"
        raise ArtifactError(
            f"{where} {problem}: it was changed after the build (its labels, preprocessing "
            "or file hashes can no longer be trusted); rebuild the artifact"
        )


def inside(relative: str, what: str, where: Path) -> str:
    """`relative` if it names a path inside the artifact: not absolute, no '..', no drive."""
    path = PurePosixPath(relative)
    if (
        path.is_absolute()
        or ".." in path.parts
        or "\\" in relative
        or PureWindowsPath(relative).drive
    ):
        raise ArtifactError(
            f"{where}: {what} '{relative}' points outside the artifact; refusing to open it "
            "(rebuild the artifact)"
        )
    return relative


def _validation_json(record: ValidationRecord) -> dict[str, Any]:
    validation = _compact(asdict(record))
    validation["passed"] = record.passed  # None is meaningful: not run
    if record.outputs:
        validation["outputs"] = _scores_json(record.outputs)
    if record.by_block:
        validation["by_block"] = _scores_json(record.by_block)
    return validation


def _component_json(record: ComponentRecord) -> dict[str, Any]:
    validation = record.validation.to_json()
    quantization: dict[str, Any] = {}
    if record.quantization is not None:
        quantization = _compact(asdict(record.quantization))
        quantization.update(quantization.pop("details", {}))
    return {
        "name": record.name,
        "entry": record.entry,
        "inputs": {k: v.to_json() for k, v in record.inputs.items()},
        "outputs": {k: v.to_json() for k, v in record.outputs.items()},
        "validation": validation,
        "runtime": record.runtime,
        "quantization": quantization,
    }


def _component(data: Mapping[str, Any], where: Path) -> ComponentRecord:
    validation = dict(data.get("validation") or {"passed": None})
    tolerance = validation.get("tolerance")
    quantization = data.get("quantization") or {}
    return ComponentRecord(
        name=data["name"],
        entry=inside(data["entry"], f"component {data['name']}'s entry", where),
        inputs={k: TensorSpec.from_json(v) for k, v in data["inputs"].items()},
        outputs={k: TensorSpec.from_json(v) for k, v in data["outputs"].items()},
        validation=_known(
            ValidationRecord,
            {
                **validation,
                "tolerance": Tolerance(**tolerance) if tolerance else None,
                "outputs": _scores(validation.get("outputs", {})),
                "by_block": _scores(validation.get("by_block", {})),
                "batch_sizes": tuple(validation.get("batch_sizes", ())),
            },
        ),
        runtime=dict(data.get("runtime") or {}),
        quantization=(
            QuantizationRecord.of(
                quantization["scheme"], {k: v for k, v in quantization.items() if k != "scheme"}
            )
            if quantization
            else None
        ),
    )


def _end_to_end(data: Mapping[str, Any]) -> EndToEndRecord:
    return _known(
        EndToEndRecord,
        {
            **data,
            "outputs": _scores(data.get("outputs", {})),
            "prompts": tuple(data.get("prompts", ())),
            "psnr_db": tuple(data.get("psnr_db", ())),
            "ssim": tuple(data.get("ssim", ())),
        },
    )


def _scores(data: Mapping[str, Any]) -> dict[str, OutputScore]:
    return {name: _known(OutputScore, score) for name, score in data.items()}


def _source(data: Mapping[str, Any]) -> SourceRecord:
    record: SourceRecord = _known(SourceRecord, data)
    if isinstance(single := data.get("single_file"), Mapping):
        record = replace(record, single_file=_known(SingleFileRecord, single))
    loras = data.get("loras") or ()
    return replace(record, loras=tuple(_known(LoraRecord, lora) for lora in loras))


def _known(cls: type[Any], data: Mapping[str, Any]) -> Any:
    """A record from the keys its class knows (newer writers may add others)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def _compact(data: dict[str, Any]) -> dict[str, Any]:
    """Without None, False and empty values (kiln.json stays what a reader needs)."""
    return {k: v for k, v in data.items() if not _absent(v)}


def _absent(value: Any) -> bool:
    empty = isinstance(value, str | tuple | list | dict) and not value
    return value is None or value is False or empty


def _upgrade_v1(data: Mapping[str, Any], where: Path) -> dict[str, Any]:
    """A schema 1 manifest in schema 2's terms: it recorded no pipeline (the family's pipeline
    for its task is the one that ran it) and its profile in profile schema 1."""
    from modelkiln.models import FAMILIES

    try:
        pipeline = FAMILIES.get(data["family"]).pipeline_for(data["task"])
    except (KeyError, UnsupportedError) as error:
        raise ArtifactError(
            f"{where} is malformed ({type(error).__name__}: {error}); rebuild the artifact"
        ) from error
    return {**data, "pipeline": pipeline, "schema_version": MANIFEST_SCHEMA_VERSION}


__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "BuildRecord",
    "ComponentRecord",
    "EndToEndRecord",
    "FileRecord",
    "LoraRecord",
    "Manifest",
    "OutputScore",
    "QuantizationRecord",
    "SingleFileRecord",
    "SourceRecord",
    "ValidationRecord",
]
