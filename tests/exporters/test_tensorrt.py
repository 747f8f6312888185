"""The TensorRT path: recipe (profile -> builder config), cache keys and the engine cache, ONNX
checks, the Q/DQ quantizers, and the errors without a GPU; engine builds are marked `tensorrt`
and `gpu` and skip where either is absent (everywhere without NVIDIA's stack)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from modelkiln.errors import (
    ArtifactError,
    ExportError,
    ProfileError,
    QuantizationError,
    UnsupportedError,
)
from modelkiln.plan import load_profile
from modelkiln.quantize.schemes import Int4Weights, Int8Static
from modelkiln.specs import ComponentSpec, TensorSpec
from modelkiln.tensorrt.build import (
    ENGINE_FILE,
    RECORD_FILE,
    EngineRecord,
    engine_for_device,
    engine_from_onnx,
    onnx_sha256,
    read_record,
    write_record,
)
from modelkiln.tensorrt.cache import cache_dir, engine_cache_path
from modelkiln.tensorrt.device import Device, cuda_index
from modelkiln.tensorrt.recipe import (
    EngineRecipe,
    ShapeRange,
    builder_flags,
    cache_key,
    configure,
    recipe_for,
)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


no_gpu_here = pytest.mark.skipif("_has_cuda()", reason="asserts the error without a CUDA GPU")


def _spec(name: str, inputs: dict[str, TensorSpec], **fields: Any) -> ComponentSpec:
    return ComponentSpec(
        name=name,
        module=lambda: None,  # type: ignore[arg-type, return-value]
        inputs=inputs,
        outputs={"out": TensorSpec("float32", ("batch",))},
        save_reference=lambda path: None,
        **fields,
    )


# As models/vit.py declares a 224 px ViT, and models/stable_diffusion.py an SD-1.5 UNet:
# latents at 1/8 of the 512 px images, twice the images per call (classifier-free guidance).
VIT = _spec("vision_model", {"pixel_values": TensorSpec("float32", ("batch", 3, 224, 224))})
SD_DIMS = {"height": 512, "width": 512, "latent_height": 64, "latent_width": 64}
UNET = _spec(
    "unet",
    {
        "sample": TensorSpec("float32", ("batch", 4, "latent_height", "latent_width")),
        "timestep": TensorSpec("float32", ()),
        "encoder_hidden_states": TensorSpec("float32", ("batch", 77, 768)),
    },
    batch_factor=2,
    default_dims=SD_DIMS,
)
VAE_ENCODER = _spec(
    "vae_encoder",
    {"sample": TensorSpec("float32", ("batch", 3, "height", "width"))},
    default_dims=SD_DIMS,
)
TEXT_ENCODER = _spec(
    "text_encoder", {"input_ids": TensorSpec("int64", ("batch", 77))}, default_dims=SD_DIMS
)


def _ranges(recipe: EngineRecipe) -> dict[str, tuple[tuple[int, ...], ...]]:
    return {r.name: (r.min, r.opt, r.max) for r in recipe.shapes}


# --- recipe: optimization profile -------------------------------------------------------------


def test_vit_recipe_is_fp16_with_a_dynamic_batch_of_1_to_16() -> None:
    recipe = recipe_for(VIT, load_profile("vit-tensorrt-fp16"))
    assert recipe.flags == ("FP16",) and recipe.cleared_flags == ()
    assert _ranges(recipe) == {
        "pixel_values": ((1, 3, 224, 224), (1, 3, 224, 224), (16, 3, 224, 224))
    }
    assert recipe.workspace_bytes is None and recipe.optimization_level == 3


def test_static_batch_needs_no_optimization_profile() -> None:
    profile = load_profile(
        "vit-tensorrt-fp16",
        ["shapes.dynamic_batch=false", "shapes.batch_size=4", "validation.batch_sizes=[4]"],
    )
    assert recipe_for(VIT, profile).shapes == ()


def test_unet_batch_is_doubled_for_guidance_and_timestep_stays_static() -> None:
    profile = load_profile("sd-tensorrt-fp16", ["shapes.batch_size=2"])
    assert _ranges(recipe_for(UNET, profile)) == {
        # 1 (no guidance) .. batch_size x 2 .. max_batch_size (4) x 2
        "sample": ((1, 4, 64, 64), (4, 4, 64, 64), (8, 4, 64, 64)),
        "encoder_hidden_states": ((1, 77, 768), (4, 77, 768), (8, 77, 768)),
    }
    text = recipe_for(TEXT_ENCODER, profile)
    assert _ranges(text) == {"input_ids": ((1, 77), (2, 77), (4, 77))}


def test_dynamic_resolution_bounds_latents_at_the_vae_scale() -> None:
    default = load_profile("sd-tensorrt-fp16", ["shapes.dynamic_resolution=true"])
    # None: half and twice the native 512 px; latents are 1/8 of the pixels.
    assert _ranges(recipe_for(UNET, default))["sample"] == (
        (1, 4, 32, 32),
        (2, 4, 64, 64),
        (8, 4, 128, 128),
    )
    assert _ranges(recipe_for(VAE_ENCODER, default))["sample"] == (
        (1, 3, 256, 256),
        (1, 3, 512, 512),
        (4, 3, 1024, 1024),
    )
    bounded = load_profile(
        "sd-tensorrt-fp16",
        [
            "shapes.dynamic_resolution=true",
            "shapes.min_resolution=384",
            "shapes.max_resolution=768",
        ],
    )
    assert _ranges(recipe_for(UNET, bounded))["sample"] == (
        (1, 4, 48, 48),
        (2, 4, 64, 64),
        (8, 4, 96, 96),
    )


def test_resolution_outside_the_bounds_is_a_profile_error() -> None:
    profile = load_profile(
        "sd-tensorrt-fp16", ["shapes.dynamic_resolution=true", "shapes.min_resolution=768"]
    )
    with pytest.raises(ProfileError, match=r"height 512 is outside .*\(768\.\.1024\)"):
        recipe_for(UNET, profile)


@pytest.mark.torch
def test_tiny_sd_specs_give_consistent_ranges(source_dir: Callable[[str], Path]) -> None:
    """The real family's specs (a VAE that halves twice: latents at 1/2 of 32 px)."""
    from modelkiln.models import detect_family
    from modelkiln.sources import resolve_source

    profile = load_profile("sd-tensorrt-fp16", ["shapes.dynamic_resolution=true"])
    source = resolve_source(source_dir("sd"))
    loaded = detect_family(source).load(source, profile)
    scale = loaded.model_info["vae_scale_factor"]
    ranges = {spec.name: _ranges(recipe_for(spec, profile)) for spec in loaded.components}
    assert ranges["text_encoder"] == {"input_ids": ((1, 77), (1, 77), (4, 77))}
    assert set(ranges["unet"]) == {"sample", "encoder_hidden_states"}
    pixels = ranges["vae_encoder"]["sample"]
    latents = ranges["vae_decoder"]["latent_sample"]
    assert [p[2] for p in pixels] == [16, 32, 64]
    assert [lat[2] for lat in latents] == [p[2] // scale for p in pixels]
    assert [u[0] for u in ranges["unet"]["sample"]] == [1, 2, 8]


@pytest.mark.parametrize("source", ["sd3", "flux-dev"])
def test_tiny_flow_transformers_give_batch_ranges_and_static_positions(
    source_dir: Callable[[str], Path], source: str
) -> None:
    """SD3's transformer takes the CFG pair (1 .. 2 x 4); Flux's takes the images (1 .. 4)
    and its token positions, which have no batch axis, stay static."""
    from modelkiln.models import detect_family
    from modelkiln.sources import resolve_source

    family = "sd3" if source == "sd3" else "flux"
    profile = load_profile(f"{family}-tensorrt-fp16", ["shapes.height=32", "shapes.width=32"])
    resolved = resolve_source(source_dir(source))
    loaded = detect_family(resolved).load(resolved, profile)
    ranges = {spec.name: _ranges(recipe_for(spec, profile)) for spec in loaded.components}
    transformer = ranges["transformer"]
    assert [shape[0] for shape in transformer["hidden_states"]] == (
        [1, 2, 8] if family == "sd3" else [1, 1, 4]
    )
    assert "img_ids" not in transformer and "txt_ids" not in transformer
    t5 = "text_encoder_3" if family == "sd3" else "text_encoder_2"
    assert ranges[t5]["input_ids"][2] == (4, 256 if family == "sd3" else 512)
    if family == "flux":  # a flexible resolution: 16..64 px -> 4x4..16x16 latent tokens
        flexible = load_profile(
            "flux-tensorrt-fp16",
            ["shapes.height=32", "shapes.width=32", "shapes.dynamic_resolution=true"],
        )
        specs = {s.name: s for s in detect_family(resolved).load(resolved, flexible).components}
        tokens = _ranges(recipe_for(specs["transformer"], flexible))["hidden_states"]
        assert [shape[1] for shape in tokens] == [4 * 4, 8 * 8, 16 * 16]


# --- recipe: precision and builder config -----------------------------------------------------


@pytest.mark.parametrize(
    ("compute", "scheme", "flags", "cleared"),
    [
        ("fp32", "none", (), ("TF32",)),  # TF32 off: fp32 engines match torch fp32
        ("fp16", "none", ("FP16",), ()),
        ("bf16", "none", ("BF16",), ()),
        ("fp16", "int8-static", ("FP16", "INT8"), ()),  # int8 where the Q/DQ say, fp16 around
        ("fp32", "int8-static", ("INT8",), ("TF32",)),
        ("fp16", "int4-weights", ("FP16",), ()),  # weight-only: the graph's DequantizeLinear
    ],
)
def test_precision_flags(
    compute: str, scheme: str, flags: tuple[str, ...], cleared: tuple[str, ...]
) -> None:
    assert builder_flags(compute, scheme) == (flags, cleared)


def test_bundled_profiles_translate_to_their_flags() -> None:
    assert recipe_for(VIT, load_profile("vit-tensorrt-int8")).flags == ("FP16", "INT8")
    assert recipe_for(UNET, load_profile("sd-tensorrt-fp16")).flags == ("FP16",)
    fp32 = load_profile("vit-tensorrt-fp16", ["precision.compute=fp32"])
    assert recipe_for(VIT, fp32).cleared_flags == ("TF32",)


def test_workspace_and_optimization_level() -> None:
    profile = load_profile(
        "vit-tensorrt-fp16", ["tensorrt.workspace_mb=2048", "tensorrt.optimization_level=5"]
    )
    recipe = recipe_for(VIT, profile)
    assert recipe.workspace_bytes == 2 << 30
    assert recipe.optimization_level == 5
    with pytest.raises(ProfileError, match="optimization_level must be 0-5, got 6"):
        load_profile("vit-tensorrt-fp16", ["tensorrt.optimization_level=6"])


class _Recorder:
    """Stands in for TensorRT's builder, optimization profile and builder config."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.builder_optimization_level: int | None = None

    def create_optimization_profile(self) -> _Recorder:
        return self

    def set_shape(self, *args: Any) -> None:
        self.calls.append(("set_shape", *args))

    def set_flag(self, flag: str) -> None:
        self.calls.append(("set_flag", flag))

    def clear_flag(self, flag: str) -> None:
        self.calls.append(("clear_flag", flag))

    def add_optimization_profile(self, profile: Any) -> int:
        self.calls.append(("add_optimization_profile",))
        return 0

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.calls.append(("set_memory_pool_limit", pool, size))


def _fake_trt(*flags: str) -> Any:
    return SimpleNamespace(
        __version__="10.99",
        BuilderFlag=SimpleNamespace(**{f: f"BuilderFlag.{f}" for f in flags}),
        MemoryPoolType=SimpleNamespace(WORKSPACE="MemoryPoolType.WORKSPACE"),
    )


def test_configure_applies_the_recipe_to_a_builder_config() -> None:
    profile = load_profile("sd-tensorrt-fp16", ["tensorrt.workspace_mb=512"])
    recipe = recipe_for(UNET, profile)
    config = _Recorder()
    configure(_fake_trt("FP16", "INT8", "TF32"), config, config, recipe)
    assert config.calls == [
        ("set_flag", "BuilderFlag.FP16"),
        ("set_shape", "sample", (1, 4, 64, 64), (2, 4, 64, 64), (8, 4, 64, 64)),
        ("set_shape", "encoder_hidden_states", (1, 77, 768), (2, 77, 768), (8, 77, 768)),
        ("add_optimization_profile",),
        ("set_memory_pool_limit", "MemoryPoolType.WORKSPACE", 512 << 20),
    ]
    assert config.builder_optimization_level == 3

    fp32 = _Recorder()
    static = load_profile(
        "vit-tensorrt-fp16",
        ["precision.compute=fp32", "shapes.dynamic_batch=false", "validation.batch_sizes=[1]"],
    )
    configure(_fake_trt("TF32"), fp32, fp32, recipe_for(VIT, static))
    assert fp32.calls == [("clear_flag", "BuilderFlag.TF32")]


def test_a_tensorrt_without_the_flag_is_named() -> None:
    recipe = recipe_for(VIT, load_profile("vit-tensorrt-fp16"))
    with pytest.raises(UnsupportedError, match=r"TensorRT 10\.99 has no BuilderFlag\.FP16"):
        configure(_fake_trt(), _Recorder(), _Recorder(), recipe)


# --- cache keys and the engine cache ----------------------------------------------------------

RECIPE = recipe_for(VIT, load_profile("vit-tensorrt-fp16"))
KEY_PARTS = ("NVIDIA H100 80GB HBM3", "10.13.0", "ab" * 32, RECIPE)


def test_cache_key_is_stable_and_survives_the_json_round_trip() -> None:
    key = cache_key(*KEY_PARTS)
    assert len(key) == 64 and int(key, 16) >= 0
    again = EngineRecipe.from_json(json.loads(json.dumps(RECIPE.to_json())))
    assert again == RECIPE
    assert cache_key(*KEY_PARTS[:3], again) == key


@pytest.mark.parametrize(
    "changed",
    [
        ("NVIDIA L4", *KEY_PARTS[1:]),
        (KEY_PARTS[0], "10.14.0", *KEY_PARTS[2:]),
        (*KEY_PARTS[:2], "cd" * 32, RECIPE),
        (*KEY_PARTS[:3], dataclasses.replace(RECIPE, compute="fp32")),
        (*KEY_PARTS[:3], dataclasses.replace(RECIPE, flags=("BF16",))),
        (*KEY_PARTS[:3], dataclasses.replace(RECIPE, cleared_flags=("TF32",))),
        (*KEY_PARTS[:3], dataclasses.replace(RECIPE, scheme="int8-static")),
        (*KEY_PARTS[:3], dataclasses.replace(RECIPE, workspace_bytes=1 << 30)),
        (*KEY_PARTS[:3], dataclasses.replace(RECIPE, optimization_level=5)),
        (
            *KEY_PARTS[:3],
            dataclasses.replace(
                RECIPE,
                shapes=(
                    ShapeRange(
                        "pixel_values", (1, 3, 224, 224), (1, 3, 224, 224), (8, 3, 224, 224)
                    ),
                ),
            ),
        ),
    ],
)
def test_cache_key_changes_with_each_part(changed: tuple[Any, ...]) -> None:
    assert cache_key(*changed) != cache_key(*KEY_PARTS)


def test_cache_key_ignores_the_cache_settings() -> None:
    """timing_cache / engine_cache say how to build, not what: the same engine either way."""
    base = load_profile("vit-tensorrt-fp16")
    off = load_profile(
        "vit-tensorrt-fp16", ["tensorrt.timing_cache=false", "tensorrt.engine_cache=false"]
    )
    assert recipe_for(VIT, base) == recipe_for(VIT, off)


def test_malformed_recipe_is_an_artifact_error() -> None:
    with pytest.raises(ArtifactError, match="malformed TensorRT engine recipe"):
        EngineRecipe.from_json({"compute": "fp16"})


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MODELKILN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class FakeBuilder:
    """The builder function engine_from_onnx calls: records its calls, returns fixed bytes."""

    def __init__(self) -> None:
        self.calls: list[tuple[Path, EngineRecipe, Path | None]] = []

    def __call__(self, onnx_path: Path, recipe: EngineRecipe, timings: Path | None) -> bytes:
        self.calls.append((onnx_path, recipe, timings))
        return b"engine of " + onnx_path.read_bytes()


def _onnx_files(directory: Path, content: bytes = b"graph") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(content)
    (directory / "model.onnx_data").write_bytes(b"weights")
    return directory / "model.onnx"


GPU = Device("NVIDIA H100 80GB HBM3", "10.13.0")


def test_engine_cache_hit_skips_the_builder(cache: Path, tmp_path: Path) -> None:
    builder = FakeBuilder()
    first = _onnx_files(tmp_path / "a")
    record = engine_from_onnx(first, first.with_name(ENGINE_FILE), RECIPE, GPU, build=builder)
    assert not record.from_cache and len(builder.calls) == 1
    assert (
        builder.calls[0][2]
        == cache / "tensorrt" / "timing" / "NVIDIA-H100-80GB-HBM3-trt10.13.0.cache"
    )
    assert engine_cache_path(record.cache_key).parent == cache / "tensorrt" / "engines"
    assert record.cache_key == cache_key(GPU.gpu, GPU.tensorrt, onnx_sha256(first), RECIPE)

    # Another artifact with the same ONNX, recipe, GPU and TensorRT: a copy, no build.
    second = _onnx_files(tmp_path / "b")
    again = engine_from_onnx(second, second.with_name(ENGINE_FILE), RECIPE, GPU, build=builder)
    assert again.from_cache and again.cache_key == record.cache_key
    assert len(builder.calls) == 1
    assert second.with_name(ENGINE_FILE).read_bytes() == b"engine of graph"
    assert not list((cache / "tensorrt" / "engines").glob(".*"))  # no partial files left

    # The weights beside the graph are part of the ONNX: changed weights, a new build.
    (second.with_name("model.onnx_data")).write_bytes(b"other weights")
    changed = engine_from_onnx(second, second.with_name(ENGINE_FILE), RECIPE, GPU, build=builder)
    assert not changed.from_cache and len(builder.calls) == 2


def test_cache_settings_off_build_every_time_without_timings(cache: Path, tmp_path: Path) -> None:
    builder = FakeBuilder()
    onnx_path = _onnx_files(tmp_path / "a")
    for _ in range(2):
        record = engine_from_onnx(
            onnx_path,
            onnx_path.with_name(ENGINE_FILE),
            RECIPE,
            GPU,
            engine_cache=False,
            timing_cache=False,
            build=builder,
        )
        assert not record.from_cache
    assert [call[2] for call in builder.calls] == [None, None]
    assert not cache_dir().exists()


def test_engine_built_elsewhere_is_rebuilt_here_once_into_the_cache(
    cache: Path, tmp_path: Path
) -> None:
    builder = FakeBuilder()
    onnx_path = _onnx_files(tmp_path / "artifact")
    engine = onnx_path.with_name(ENGINE_FILE)
    record = engine_from_onnx(onnx_path, engine, RECIPE, GPU, engine_cache=False, build=builder)
    write_record(engine.parent, record)
    assert read_record(engine.parent) == record

    # Same GPU and TensorRT: the artifact's own engine.
    assert engine_for_device(engine, GPU, build=builder) == (engine, record)
    # Another GPU: the same recipe rebuilt from the artifact's ONNX, once.
    other = Device("NVIDIA L4", "10.13.0")
    path, rebuilt = engine_for_device(engine, other, build=builder)
    assert path == engine_cache_path(rebuilt.cache_key) and path.is_file()
    assert builder.calls[-1][:2] == (onnx_path, RECIPE)
    assert (rebuilt.gpu, rebuilt.recipe) == ("NVIDIA L4", RECIPE)
    assert engine_for_device(engine, other, build=builder)[0] == path
    assert len(builder.calls) == 2

    onnx_path.unlink()
    with pytest.raises(
        ArtifactError, match=r"built for NVIDIA H100 .* its ONNX \(model\.onnx\) is missing"
    ):
        engine_for_device(engine, Device("NVIDIA A10", "10.13.0"), build=builder)
    (engine.parent / RECORD_FILE).write_text("{}")
    with pytest.raises(ArtifactError, match=f"malformed {RECORD_FILE}"):
        read_record(engine.parent)


def test_engine_record_round_trips() -> None:
    record = EngineRecord(
        "model.onnx", "ab" * 32, GPU.gpu, GPU.tensorrt, "cd" * 32, RECIPE, True, 1.5
    )
    assert EngineRecord.from_json(json.loads(json.dumps(record.to_json()))) == record


def test_cuda_devices_only() -> None:
    assert cuda_index("cuda") == 0 and cuda_index("cuda:1") == 1
    with pytest.raises(
        UnsupportedError, match=r"TensorRT runs on CUDA devices, not runtime\.device 'cpu'"
    ):
        cuda_index("cpu")


# --- ONNX checks and quantization on tiny models ---------------------------------------------


@pytest.fixture(scope="module")
def vit_onnx(source_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ViT classifier exported by the TensorRT exporter (its ONNX, no engine)."""
    from modelkiln.exporters.tensorrt import TensorRTExporter
    from modelkiln.models import detect_family
    from modelkiln.sources import resolve_source

    profile = load_profile("vit-tensorrt-fp16")
    source = resolve_source(source_dir("hf-classifier"))
    (spec,) = detect_family(source).load(source, profile).components
    root = tmp_path_factory.mktemp("vit-tensorrt")
    path = TensorRTExporter().export(spec, spec.module, profile, root)
    assert path == root / "model.onnx"
    return path


@pytest.mark.torch
def test_an_unchanged_model_exports_the_same_bytes(
    vit_onnx: Path, source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """What the engine cache relies on: a rebuild of the same model hashes the same."""
    from modelkiln.exporters.tensorrt import TensorRTExporter
    from modelkiln.models import detect_family
    from modelkiln.sources import resolve_source

    profile = load_profile("vit-tensorrt-fp16")
    source = resolve_source(source_dir("hf-classifier"))
    (spec,) = detect_family(source).load(source, profile).components
    again = TensorRTExporter().export(spec, spec.module, profile, tmp_path)
    assert onnx_sha256(again) == onnx_sha256(vit_onnx)


@pytest.fixture
def vit_copy(vit_onnx: Path, tmp_path: Path) -> Path:
    shutil.copytree(vit_onnx.parent, tmp_path / "vit")
    return tmp_path / "vit" / "model.onnx"


def _ort_logits(path: Path, pixels: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return np.asarray(ort.InferenceSession(str(path)).run(["logits"], {"pixel_values": pixels})[0])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


PIXELS = np.random.default_rng(5).standard_normal((4, 3, 32, 32)).astype(np.float32)


@pytest.mark.torch
@pytest.mark.onnxruntime
def test_our_exports_need_nothing_tensorrt_lacks(
    vit_onnx: Path, source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    from modelkiln.exporters.onnx import onnx_from_torch
    from modelkiln.models import detect_family
    from modelkiln.sources import resolve_source
    from modelkiln.tensorrt.onnx_checks import check_onnx

    found = check_onnx(vit_onnx)
    assert found["opset"] == 18 and found["int64_inputs"] == []
    # CLIP's int64 input_ids: native in TensorRT 10, nothing to convert.
    profile = load_profile("sd-tensorrt-fp16")
    source = resolve_source(source_dir("sd"))
    text = next(c for c in detect_family(source).load(source, profile).components)
    assert text.name == "text_encoder"
    path = onnx_from_torch(text, text.module, profile, tmp_path / "text_encoder" / "model.onnx")
    assert check_onnx(path)["int64_inputs"] == ["input_ids"]


def _problem_graph(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    inits = [
        helper.make_tensor("w8", TensorProto.INT8, [4, 4], [1] * 16),
        helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
        helper.make_tensor("zp", TensorProto.INT8, [], [3]),
        helper.make_tensor("b32", TensorProto.INT32, [4], [1, 2, 3, 4]),
        helper.make_tensor("w4", TensorProto.INT4, [64, 4], [1] * 256),
        helper.make_tensor("s4", TensorProto.FLOAT, [2, 4], [0.1] * 8),
        helper.make_tensor("sizes", TensorProto.INT64, [4], [1, 1, 8, 8]),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["b32", "s"], ["b"], name="dq_bias"),
        helper.make_node(
            "DequantizeLinear", ["w4", "s4"], ["w"], name="dq_w4", axis=0, block_size=32
        ),
        helper.make_node("MatMulInteger", ["xq", "w8"], ["y"], name="mmi"),
        helper.make_node("Gelu", ["x"], ["g"], name="fused", domain="com.microsoft"),
        helper.make_node(
            "Resize", ["img", "", "", "sizes"], ["r"], name="resize", antialias=1, mode="linear"
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "problems",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4]),
            helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 1, 4, 4]),
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("b", "w", "g", "r")]
        + [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    onnx.save(model, str(path))
    return path


@pytest.mark.onnxruntime
def test_what_tensorrt_cannot_build_is_named_at_once(tmp_path: Path) -> None:
    from modelkiln.tensorrt.onnx_checks import check_onnx

    with pytest.raises(ExportError) as raised:
        check_onnx(_problem_graph(tmp_path / "model.onnx"))
    message = str(raised.value)
    assert "\n" not in message
    for fragment in (
        "ops outside the ONNX standard (com.microsoft.Gelu;",
        "ops TensorRT does not import (MatMulInteger)",
        "QuantizeLinear 'q_x' has a non-zero zero point",
        "DequantizeLinear 'dq_bias' dequantizes int32",
        "DequantizeLinear 'dq_w4' has int4 blocks of 32 (TensorRT's: 64, 128)",
        "Resize 'resize' antialiases",
    ):
        assert fragment in message, message


@pytest.mark.torch
@pytest.mark.onnxruntime
def test_int8_static_writes_symmetric_qdq_tensorrt_builds(vit_copy: Path) -> None:
    import onnx
    from onnx import TensorProto, numpy_helper

    from modelkiln.quantize.tensorrt import int8_static
    from modelkiln.tensorrt.onnx_checks import check_onnx

    reference = _ort_logits(vit_copy, PIXELS)
    rng = np.random.default_rng(0)
    calibration = [
        {"pixel_values": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)} for _ in range(4)
    ]
    settings = Int8Static(per_channel=True, symmetric=False)
    record = int8_static(vit_copy, settings, calibration)
    # 2 blocks x 6 linears, the patch embedding (Conv) and the head (Gemm).
    assert record["quantized_weights"] == 14
    assert record["symmetric"] is True and record["activations"] == "int8"
    assert record["bytes_after"] < record["bytes_before"]

    model = onnx.load(str(vit_copy))
    inits = {t.name: t for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert Counter(n.op_type for n in qdq) == record["ops"]
    for node in qdq:
        zero_point = inits[node.input[2]]
        assert zero_point.data_type == TensorProto.INT8, node.name
        assert not numpy_helper.to_array(zero_point).any(), node.name
    weights = [
        inits[n.input[0]] for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits
    ]
    assert {w.data_type for w in weights} == {TensorProto.INT8}  # no int32 bias
    per_channel = [n for n in qdq if n.input[0] in inits and len(inits[n.input[1]].dims) == 1]
    assert len(per_channel) == 14
    assert check_onnx(vit_copy)["ops"] == record["ops"]
    assert _cosine(_ort_logits(vit_copy, PIXELS), reference) >= 0.99


@pytest.mark.torch
@pytest.mark.onnxruntime
def test_int4_weights_are_blockwise_symmetric_dequantize_linear(vit_copy: Path) -> None:
    import onnx
    from onnx import TensorProto

    from modelkiln.quantize.tensorrt import int4_weights
    from modelkiln.tensorrt.onnx_checks import check_onnx

    reference = _ort_logits(vit_copy, PIXELS)
    record = int4_weights(vit_copy, Int4Weights(group_size=64))
    # Only fc2 (64 input channels) fills whole blocks of 64; the 32-channel layers stay float.
    assert record["quantized_weights"] == 2
    assert record["float_layers"] == {"partial_blocks": 10, "Gemm": 1, "Conv": 1}
    model = onnx.load(str(vit_copy))
    assert {o.version for o in model.opset_import if o.domain == ""} == {21}
    inits = {t.name: t for t in model.graph.initializer}
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequantize) == 2
    for node in dequantize:
        assert len(node.input) == 2, "symmetric: no zero point"
        assert inits[node.input[0]].data_type == TensorProto.INT4
        assert list(inits[node.input[0]].dims) == [64, 32]
        assert list(inits[node.input[1]].dims) == [1, 32]  # one scale per block and column
        assert {a.name: a.i for a in node.attribute} == {"axis": 0, "block_size": 64}
        (consumer,) = [n for n in model.graph.node if node.output[0] in n.input]
        assert consumer.op_type == "MatMul"
    assert check_onnx(vit_copy)["ops"]["DequantizeLinear"] == 2
    assert _cosine(_ort_logits(vit_copy, PIXELS), reference) >= 0.99

    with pytest.raises(
        QuantizationError,
        match="group_size 32 is not one of TensorRT's int4 block sizes: use 64 or 128",
    ):
        int4_weights(vit_copy, Int4Weights(group_size=32))


# --- profile validation and the errors without a GPU ----------------------------------------


@pytest.mark.parametrize(
    ("scheme", "reason"),
    [
        (
            "nf4-weights",
            "TensorRT has no NF4 kernels, its 4-bit weights are INT4 or FP4: use int4-weights",
        ),
        (
            "int8-dynamic",
            "TensorRT takes int8 as explicit Q/DQ with calibrated activation scales: use int8-static",
        ),
    ],
)
def test_schemes_tensorrt_lacks_are_rejected_with_the_reason(scheme: str, reason: str) -> None:
    with pytest.raises(UnsupportedError) as raised:
        load_profile("vit-tensorrt-fp16", [f"quantization.scheme={scheme}"])
    assert f"format 'tensorrt' has no quantization scheme '{scheme}' ({reason})" in str(
        raised.value
    )


def test_weights_stay_fp32_in_the_onnx() -> None:
    with pytest.raises(UnsupportedError, match="format 'tensorrt' cannot store weights in fp16"):
        load_profile("vit-tensorrt-fp16", ["precision.weights=fp16"])


def _cli_error(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    from modelkiln.cli import main

    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    assert exited.value.code == 2  # a user error
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.mark.skipif(HAS_TENSORRT, reason="asserts the error where tensorrt is not installed")
@pytest.mark.torch
def test_build_without_tensorrt_names_the_extra(
    source_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _cli_error(
        capsys,
        "build",
        source_dir("hf-classifier"),
        "--profile",
        "vit-tensorrt-fp16",
        "-o",
        tmp_path / "out",
    )
    assert (
        line
        == "error: tensorrt is not installed; install it with: pip install 'modelkiln[tensorrt]'"
    )
    assert not (tmp_path / "out").exists()


@no_gpu_here
@pytest.mark.torch
def test_build_without_a_gpu_fails_before_loading_the_model(
    source_dir: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from modelkiln.exporters.tensorrt import TensorRTExporter

    # As if tensorrt were installed: the GPU is what is missing.
    monkeypatch.setattr(TensorRTExporter, "packages", ("torch", "onnx"))
    line = _cli_error(
        capsys,
        "build",
        source_dir("hf-classifier"),
        "--profile",
        "vit-tensorrt-fp16",
        "-o",
        tmp_path / "out",
    )
    assert line.startswith(
        "error: format 'tensorrt': TensorRT engines build and run on an NVIDIA CUDA GPU, and "
        "this machine has none"
    ), line


@no_gpu_here
@pytest.mark.torch
def test_finish_and_session_without_a_gpu(vit_onnx: Path) -> None:
    from modelkiln.exporters.tensorrt import TensorRTExporter
    from modelkiln.runtimes.base import RuntimeOptions
    from modelkiln.runtimes.tensorrt import TensorRTSession
    from modelkiln.tensorrt.settings import TensorRTSettings

    profile = load_profile("vit-tensorrt-fp16")
    with pytest.raises(
        UnsupportedError,
        match="vision_model: format 'tensorrt': TensorRT engines build and run on an NVIDIA CUDA GPU",
    ):
        TensorRTExporter().finish(VIT, vit_onnx, profile)
    assert not (vit_onnx.parent / ENGINE_FILE).exists()
    options = RuntimeOptions.for_profile(profile, TensorRTSettings)
    with pytest.raises(
        UnsupportedError, match=r"vision_model \(runtime 'tensorrt'\): TensorRT engines"
    ):
        TensorRTSession(
            vit_onnx.with_name(ENGINE_FILE), "vision_model", VIT.inputs, VIT.outputs, options
        )


# --- on a CUDA GPU with TensorRT --------------------------------------------------------------


@pytest.fixture
def gpu_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("MODELKILN_CACHE", str(tmp_path / "cache"))
    yield tmp_path / "cache"


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.torch
@pytest.mark.onnxruntime
def test_fp16_engine_matches_torch_and_rebuild_takes_the_cache(
    source_dir: Callable[[str], Path],
    tmp_path: Path,
    gpu_cache: Path,
    rgb_images: list[np.ndarray],
) -> None:
    from modelkiln import build, load, open_artifact

    source = source_dir("hf-classifier")
    artifact = build(source, "vit-tensorrt-fp16", tmp_path / "a")
    (record,) = open_artifact(artifact, verify=True).manifest.components.values()
    assert record.entry == ENGINE_FILE and record.validation.passed
    assert record.runtime["inference_precision"] == "fp16"
    engine = read_record(artifact)
    assert not engine.from_cache and engine.recipe.flags == ("FP16",)
    assert engine_cache_path(engine.cache_key).is_file()
    assert (artifact / "model.onnx").is_file()

    with (
        load(artifact) as model,
        load(build(source, "vit-onnxruntime-fp32", tmp_path / "ref")) as ref,
    ):
        ours = model.session.run({"pixel_values": PIXELS})["logits"]
        theirs = ref.session.run({"pixel_values": PIXELS})["logits"]
        assert _cosine(ours, theirs) >= 0.999
        assert [p[0].index for p in model(rgb_images)] == [p[0].index for p in ref(rgb_images)]

    again = read_record(build(source, "vit-tensorrt-fp16", tmp_path / "b"))
    assert again.from_cache and again.cache_key == engine.cache_key


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.torch
def test_int8_engine_builds_from_the_qdq_onnx(
    source_dir: Callable[[str], Path], tmp_path: Path, gpu_cache: Path
) -> None:
    from modelkiln import build, open_artifact

    artifact = build(
        source_dir("hf-classifier"),
        "vit-tensorrt-int8",
        tmp_path / "int8",
        overrides=['calibration.data="digits"', "calibration.size=16", "calibration.batch_size=4"],
    )
    (record,) = open_artifact(artifact).manifest.components.values()
    assert record.quantization.scheme == "int8-static"
    assert record.validation.passed
    assert read_record(artifact).recipe.flags == ("FP16", "INT8")


@pytest.mark.torch
@pytest.mark.parametrize("source", ["sd3.5", "flux-dev"])
def test_flow_transformer_and_t5_exports_need_nothing_tensorrt_lacks(
    source_dir: Callable[[str], Path], source: str, tmp_path: Path
) -> None:
    """The MMDiT (SD 3.5's qk-norm and dual attention, Flux's rotary positions) and T5 as
    the TensorRT exporter writes them: only standard ops TensorRT imports."""
    from modelkiln.exporters.tensorrt import TensorRTExporter
    from modelkiln.models import detect_family
    from modelkiln.sources import resolve_source
    from modelkiln.tensorrt.onnx_checks import check_onnx

    family = "flux" if source.startswith("flux") else "sd3"
    profile = load_profile(f"{family}-tensorrt-fp16", ["shapes.height=32", "shapes.width=32"])
    resolved = resolve_source(source_dir(source))
    specs = {c.name: c for c in detect_family(resolved).load(resolved, profile).components}
    t5 = "text_encoder_3" if family == "sd3" else "text_encoder_2"
    for name in ("transformer", t5):
        path = TensorRTExporter().export(specs[name], specs[name].module, profile, tmp_path)
        found = check_onnx(path)
        assert found["opset"] == 18 and found["nodes"] > 50, name
