"""The extension points are real: a backend, a model family, a pipeline and a quantization
scheme defined here, registered from this module (no package file edited), build, validate,
gate, load, run, benchmark and package a tiny model.

- backend `pt2`: torch.export's ExportedProgram files (model.pt2), its own [pt2] profile
  section, a runtime that reopens them, a deployment target;
- family `toy`: a tiny MLP image classifier saved as config.json + model.safetensors, with its
  own pipeline (`ArgmaxPipeline`: images in, label names out);
- scheme `round-bf16`: weights rounded to bfloat16 *before* export (the stage torchao and
  PT2E quantization need), handled for the pt2 format.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import pytest

from modelkiln import build, load, open_artifact
from modelkiln.backends import BACKENDS, Backend, BackendSettings, ProfileContext
from modelkiln.bench.measure import measure_artifact
from modelkiln.bench.settings import BenchSettings
from modelkiln.errors import ProfileError
from modelkiln.exporters.base import Exporter, export_dims
from modelkiln.images import ImageInput
from modelkiln.models import FAMILIES
from modelkiln.models.base import LoadedModel, ModelFamily
from modelkiln.packaging import package
from modelkiln.pipelines.base import ImagePipeline, PipelineParts, one_session, preprocessor_of
from modelkiln.plan import load_plan
from modelkiln.preprocess import ImagePreprocessor
from modelkiln.profiles import Profile
from modelkiln.quantize import SCHEMES, SchemeConfig, Stage, support
from modelkiln.quantize.handlers import Handler, register_handler, unregister_handler
from modelkiln.records import QuantizationRecord
from modelkiln.runtimes.base import Runtime, RuntimeOptions, Session
from modelkiln.sources import ResolvedSource
from modelkiln.specs import ComponentSpec, TensorSpec

pytestmark = pytest.mark.torch

LABELS = [str(digit) for digit in range(10)]
SIDE = 4  # the toy model sees 4x4 RGB images


# --- the backend --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pt2Settings(BackendSettings):
    section: ClassVar[str] = "pt2"
    strict: bool = False  # torch.export's strict tracing

    def check(self, origin: str) -> None:
        if self.strict:
            raise ProfileError(f"{origin}: pt2.strict tracing is not supported for toy models")


class Pt2Session(Session):
    def __init__(
        self,
        entry: Path,
        name: str,
        inputs: Mapping[str, TensorSpec],
        outputs: Mapping[str, TensorSpec],
        options: RuntimeOptions,
    ) -> None:
        import torch

        super().__init__(name, inputs, outputs)
        self._module = torch.export.load(str(entry)).module()

    @property
    def info(self) -> dict[str, Any]:
        return {"runtime": "pt2", "inference_precision": "f32"}

    def _run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        import torch

        with torch.no_grad():
            results = self._module(*(torch.from_numpy(feeds[n]) for n in self.input_specs))
        return {name: r.numpy() for name, r in zip(self.output_specs, results, strict=True)}


class Pt2Runtime(Runtime):
    name = "pt2"
    formats = frozenset({"pt2"})
    compute_precisions = frozenset({"fp32"})
    package = "torch"
    distribution = "torch"
    session_class = Pt2Session


class Pt2Exporter(Exporter):
    format = "pt2"
    backend = "pt2"
    weight_precisions = frozenset({"fp32"})
    packages = ("torch",)

    def export(
        self, spec: ComponentSpec, load_module: Callable[[], Any], profile: Profile, root: Path
    ) -> Path:
        import torch

        dims, dynamic = export_dims(spec, profile)
        example = spec.dummy_inputs(dims)
        batch = torch.export.Dim("batch", min=1)
        shapes = {n: {0: batch} if "batch" in dynamic else {} for n in spec.inputs}
        program = torch.export.export(
            load_module(),
            tuple(torch.from_numpy(example[n]) for n in spec.inputs),
            dynamic_shapes=shapes,
            strict=Pt2Settings.of(profile).strict,
        )
        path = self.directory(spec, root) / "model.pt2"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(path))
        return path


class Pt2Backend(Backend):
    name = "pt2"
    summary = "torch.export ExportedProgram files (a test's throwaway backend)"
    runtime = Pt2Runtime
    exporters: ClassVar[Mapping[str, Any]] = {"pt2": Pt2Exporter}
    settings = Pt2Settings
    packages = ("torch",)
    deploy: ClassVar[Mapping[str, Mapping[str, tuple[str, ...]]]] = {
        "pt2": {"linux-x86_64": ("torch>=2.4",)}
    }

    @classmethod
    def check_profile(cls, context: ProfileContext) -> None:
        if context.format == "pt2" and not context.profile.shapes.dynamic_batch:
            raise ProfileError(f"{context.origin}: pt2 exports keep a dynamic batch")


# --- the scheme ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundBF16(SchemeConfig):
    name: ClassVar[str] = "round-bf16"
    summary: ClassVar[str] = "weights rounded to bfloat16 before export"
    weight_bits: ClassVar[int] = 16
    min_elements: int = 1  # leave smaller tensors as they are


def round_bf16(module: Any, config: RoundBF16, calibration: Any) -> tuple[Any, dict[str, Any]]:
    import torch

    rounded = 0
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.numel() >= config.min_elements:
                parameter.copy_(parameter.to(torch.bfloat16).float())
                rounded += 1
    return module, {"quantized_weights": rounded, "bytes_before": 0, "bytes_after": 0}


# --- the family and its pipeline -----------------------------------------------------------


class ArgmaxPipeline(ImagePipeline):
    """Images in, the name of the highest-scoring class out."""

    def __init__(self, session: Session, preprocessor: ImagePreprocessor, labels: list[str]):
        super().__init__(session, preprocessor, "image-classification")
        self.labels = labels

    @classmethod
    def from_parts(cls, parts: PipelineParts) -> Self:
        return cls(one_session(parts), preprocessor_of(parts), list(parts.info["labels"]))

    def labels_for_evaluation(self) -> list[str] | None:
        return self.labels

    def __call__(self, images: Sequence[ImageInput]) -> list[str]:
        logits = np.concatenate([b["logits"] for b in self.batches(list(images), ["logits"], 8)])
        return [self.labels[i] for i in logits.argmax(-1)]


def _mlp() -> Any:
    import torch

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = torch.nn.Linear(3 * SIDE * SIDE, 16)
            self.out = torch.nn.Linear(16, len(LABELS))

        def forward(self, pixel_values: Any) -> tuple[Any]:
            return (self.out(torch.relu(self.hidden(pixel_values.flatten(1)))),)

    return MLP().eval()


def _load_mlp(directory: Path) -> Any:
    from safetensors.torch import load_file

    module = _mlp()
    module.load_state_dict(load_file(str(directory / "model.safetensors")))
    return module


class ToyFamily(ModelFamily):
    name = "toy"
    summary = "a tiny MLP image classifier (a test's throwaway family)"
    tasks = ("image-classification",)
    pipelines: ClassVar[Mapping[str, Any]] = {"argmax": ArgmaxPipeline}
    bundle_configs = ("config.json",)
    usage: ClassVar[Mapping[str, str]] = {"image-classification": "python -c 'run {bundle}'"}

    @classmethod
    def matches(cls, source: ResolvedSource) -> bool:
        config = source.read_json("config.json")
        return config is not None and "toy_mlp" in config

    @classmethod
    def load(cls, source: ResolvedSource, profile: Profile) -> LoadedModel:
        directory = source.local_dir
        preprocessor = ImagePreprocessor(
            resize_mode="exact",
            size=(SIDE, SIDE),
            interpolation="bilinear",
            crop_size=None,
            rescale_factor=1 / 255,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        )
        spec = ComponentSpec(
            name="mlp",
            module=lambda: _load_mlp(directory),
            inputs={"pixel_values": TensorSpec("float32", ("batch", 3, SIDE, SIDE))},
            outputs={"logits": TensorSpec("float32", ("batch", len(LABELS)), is_logits=True)},
            save_reference=lambda out: None,
            atol=1e-5,
        )
        return LoadedModel(
            family=cls.name,
            task="image-classification",
            pipeline=cls.pipeline_for("image-classification"),
            components=[spec],
            model_info={"labels": LABELS, "preprocessing": preprocessor.to_dict()},
            config_files={"config.json": (directory / "config.json").read_bytes()},
        )

    @classmethod
    def reference_module(cls, model_dir: Path, component: str, settings: Mapping[str, Any]) -> Any:
        return _load_mlp(model_dir)

    @classmethod
    def pipeline_for(cls, task: str) -> str:
        return "argmax"


# --- registered for this module's tests only ------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def extensions() -> Iterator[None]:
    BACKENDS.register("pt2", Pt2Backend)
    FAMILIES.register("toy", ToyFamily)
    SCHEMES.register(RoundBF16.name, RoundBF16)
    register_handler(Handler(RoundBF16, "pt2", Stage.BEFORE_EXPORT, round_bf16))
    yield
    unregister_handler(RoundBF16.name, "pt2")
    SCHEMES.unregister(RoundBF16.name)
    FAMILIES.unregister("toy")
    BACKENDS.unregister("pt2")


PROFILE = {
    "schema_version": 2,
    "name": "toy-pt2-round",
    "family": "toy",
    "export": {"format": "pt2"},
    "runtime": {"name": "pt2"},
    "pt2": {"strict": False},
    "quantization": {"scheme": "round-bf16", "min_elements": 2},
    "validation": {
        "batch_sizes": [1, 3],
        "atol": 0.05,
        "min_cosine": 0.99,
        "min_top1_agreement": 0.0,
        "data": "digits",
        "max_accuracy_drop": 100.0,
    },
}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("toy")
    (directory / "config.json").write_text(json.dumps({"toy_mlp": {"side": SIDE}}))
    save_file(_mlp().state_dict(), str(directory / "model.safetensors"))
    return directory


@pytest.fixture(scope="module")
def artifact(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    profile = Profile.from_dict(PROFILE)
    return build(source, profile, tmp_path_factory.mktemp("built") / "toy")


def test_the_plan_asks_the_new_backend_family_and_scheme() -> None:
    plan = load_plan(Profile.from_dict(PROFILE))
    assert plan.writer is Pt2Backend and plan.runner is Pt2Backend and plan.family is ToyFamily
    assert plan.component("mlp").scheme == RoundBF16(min_elements=2)
    assert support()["pt2"] == {"round-bf16": plan.component("mlp").handler}
    with pytest.raises(ProfileError, match=r"pt2\.strict tracing is not supported"):
        load_plan(Profile.from_dict({**PROFILE, "pt2": {"strict": True}}))
    static = {"shapes": {"dynamic_batch": False}, "validation": {"batch_sizes": [1]}}
    with pytest.raises(ProfileError, match="pt2 exports keep a dynamic batch"):
        load_plan(Profile.from_dict({**PROFILE, **static}))


def test_build_validates_gates_and_records_through_the_new_pieces(artifact: Path) -> None:
    manifest = open_artifact(artifact, verify=True).manifest
    assert (manifest.family, manifest.pipeline, manifest.format, manifest.runtime) == (
        "toy",
        "argmax",
        "pt2",
        "pt2",
    )
    record = manifest.components["mlp"]
    assert record.entry == "model.pt2"
    assert record.quantization == QuantizationRecord("round-bf16", 4, 0, 0)
    assert record.validation.passed is True
    (logits,) = record.validation.outputs.values()
    assert 0 < logits.max_abs < 0.05  # bf16 weights against the fp32 torch reference
    assert manifest.end_to_end is not None and manifest.end_to_end.images == 360
    assert manifest.profile.section("pt2") == {"strict": False}


def test_the_artifact_loads_runs_benchmarks_and_packages(artifact: Path, tmp_path: Path) -> None:
    images = [np.full((8, 8, 3), value, np.uint8) for value in (0, 128, 255)]
    with load(artifact) as pipeline:
        assert isinstance(pipeline, ArgmaxPipeline)
        labels = pipeline(images)
    assert len(labels) == 3 and set(labels) <= set(LABELS)
    settings = BenchSettings(batch_sizes=(1, 4), runs=3, warmup=1, isolate=False, data="digits")
    (one, four) = measure_artifact(artifact, settings)
    assert (one["batch_size"], four["batch_size"]) == (1, 4)
    assert one["accuracy"]["metric"] == "top1" and one["accuracy"]["images"] == 360
    bundle = package(artifact, "linux-x86_64", tmp_path / "toy.tar.gz")
    assert bundle.manifest.requirements == ("torch>=2.4",)
    assert {"model.pt2", "config.json", "kiln.json"} <= set(bundle.manifest.files)
    with load(tmp_path / "toy.tar.gz") as unpacked:
        assert unpacked(images) == labels
