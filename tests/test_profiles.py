from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from modelkiln.errors import ProfileError, UnsupportedError
from modelkiln.plan import load_plan, load_profile
from modelkiln.profiles import Profile, bundled_profile_names, read_profile
from modelkiln.runtimes.openvino import OpenVINOSettings


def test_bundles_the_required_profiles() -> None:
    names = bundled_profile_names()
    for required in ("vit-onnxruntime-fp32", "vit-openvino-fp32", "vit-openvino-bf16"):
        assert required in names


@pytest.mark.parametrize("name", bundled_profile_names())
def test_bundled_profile_round_trips_through_toml(name: str, tmp_path: Path) -> None:
    profile = load_profile(name)
    assert profile.name == name, "a bundled profile's name must match its file name"
    path = tmp_path / "copy.toml"
    path.write_text(profile.to_toml())
    assert load_profile(path) == profile
    assert Profile.from_dict(tomllib.loads(profile.to_toml())) == profile


def test_openvino_fp32_pins_f32_and_bf16_says_fallback() -> None:
    fp32 = load_profile("vit-openvino-fp32")
    bf16 = load_profile("vit-openvino-bf16")
    assert fp32.precision.compute == "fp32"
    assert bf16.precision.compute == "bf16"
    assert "fall back to f32" in bf16.description


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


BASE = 'schema_version = 2\nname = "t"\nfamily = "vit"\n'


def test_unknown_key_names_its_path_and_a_did_you_mean(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE + "[export]\nformat = 'onnx'\nopest = 18\n")
    with pytest.raises(
        ProfileError, match=r"unknown key 'export\.opest' \(did you mean 'opset'\?\)"
    ):
        load_profile(path)


def test_unknown_section_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE + "[runtme]\nname = 'onnxruntime'\n")
    with pytest.raises(ProfileError, match=r"unknown key 'runtme' \(did you mean 'runtime'\?\)"):
        load_profile(path)


def test_wrong_type_and_bad_choice(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"export\.opset must be int, got str '18'"):
        load_profile(_write(tmp_path, BASE + "[export]\nopset = '18'\n"))
    with pytest.raises(
        ProfileError, match=r"precision\.compute = 'bf61' is not one of .*did you mean 'bf16'"
    ):
        load_profile(_write(tmp_path, BASE + "[precision]\ncompute = 'bf61'\n"))


def test_schema_version_is_checked(tmp_path: Path) -> None:
    path = _write(tmp_path, 'schema_version = 3\nname = "t"\nfamily = "vit"\n')
    with pytest.raises(ProfileError, match="schema_version 3 is not supported"):
        load_profile(path)


V1 = """schema_version = 1
name = "old"
family = "vit"

[export]
format = "openvino"
via = "onnx"

[runtime]
name = "openvino"
performance_hint = "throughput"
graph_optimization = "all"

[quantization]
scheme = "int4-weights"
group_size = 64
ratio = 1.0
method = "minmax"
"""


def test_a_schema_1_profile_is_upgraded_its_keys_moved_to_their_backend(tmp_path: Path) -> None:
    profile = load_profile(_write(tmp_path, V1))
    assert profile.schema_version == 2
    assert profile.section("openvino") == {
        "via": "onnx",
        "performance_hint": "throughput",
        "static_shapes": False,
        "decompress_weights": "auto",
    }
    assert "onnxruntime" not in profile.sections  # its value was schema 1's default
    assert dict(profile.quantization.options) == {
        "group_size": 64,
        "ratio": 1.0,
        "symmetric": False,
    }
    assert read_profile(profile).to_toml() == profile.to_toml()


def test_a_moved_key_names_its_new_place(tmp_path: Path) -> None:
    with pytest.raises(
        ProfileError,
        match=r"unknown key 'runtime\.performance_hint'.*since schema_version 2 it is "
        r"openvino\.performance_hint",
    ):
        load_profile("vit-openvino-fp32", ["runtime.performance_hint=throughput"])


def test_a_section_of_a_backend_the_build_does_not_use_is_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A --set cannot remove a section: switching the format keeps the old backend's one.
    profile = load_profile("vit-openvino-fp32", ["export.format=onnx", "runtime.name=auto"])
    assert set(profile.sections) == {"onnxruntime"}
    assert (
        "ignoring [openvino]: it configures the openvino backend, and this profile builds onnx"
        in caplog.text
    )
    with pytest.raises(ProfileError, match=r"tensorrt\.optimization_level must be 0-5, got 9"):
        load_profile("vit-tensorrt-fp16", ["tensorrt.optimization_level=9"])
    with pytest.raises(
        ProfileError,
        match=r"unknown key 'openvino\.hint'; known keys in \[openvino\]: via, performance_hint",
    ):
        load_profile("vit-openvino-fp32", ["openvino.hint=latency"])


def test_quantization_keys_belong_to_a_scheme() -> None:
    with pytest.raises(
        ProfileError, match=r"unknown key 'quantization\.group_sise' \(did you mean 'group_size'"
    ):
        load_profile("vit-openvino-int4", ["quantization.group_sise=64"])
    # Another scheme's key is left out (a --set cannot remove a key the file sets).
    profile = load_profile("vit-openvino-int8", ["quantization.group_size=64"])
    assert "group_size" not in profile.quantization.options
    with pytest.raises(ProfileError, match=r"quantization\.ratio must be in \(0, 1\]"):
        load_profile("vit-openvino-int4", ["quantization.ratio=1.5"])


def test_the_plan_resolves_schemes_per_component() -> None:
    plan = load_plan("sd-openvino-int8-hybrid")
    assert plan.component("unet").scheme is not None
    assert plan.component("unet").scheme.name == "int8-hybrid"
    assert plan.component("unet").scheme.calibrated
    assert plan.component("text_encoder").scheme.name == "int8-weights"
    assert plan.calibrated(["text_encoder", "unet"]) == ["unet"]


def test_missing_required_key(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"missing required key.*family"):
        load_profile(_write(tmp_path, 'name = "t"\n'))


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="is not valid TOML"):
        load_profile(_write(tmp_path, "name = \n"))


def test_unknown_bundled_name_suggests_one() -> None:
    with pytest.raises(ProfileError, match=r"did you mean 'vit-onnxruntime-fp32'"):
        load_profile("vit-onxruntime-fp32")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["precision.compute=bf16"],
            r"runtime 'onnxruntime' cannot compute in bf16; supported: fp16, fp32",
        ),
        (
            ["precision.weights=bf16"],
            r"format 'onnx' cannot store weights in bf16; supported: fp16, fp32",
        ),
        (
            ["runtime.name=torch"],
            r"runtime 'torch' cannot run format 'onnx'; runtimes for it: onnxruntime, openvino",
        ),
        (
            ["export.format=tflite"],
            r"export\.format = 'tflite' is unknown; known: onnx, openvino, coreml, tensorrt, torch, executorch",
        ),
        (["export.opset=13"], r"export\.opset 13 < 17"),
        (
            ["shapes.dynamic_batch=false", "shapes.batch_size=2"],
            r"every validation\.batch_sizes entry must equal shapes\.batch_size = 2",
        ),
        (["validation.min_cosine=1.5"], r"validation\.min_cosine must be in \[0, 1\]"),
        (["model.hidden_layers=[0]"], r"model\.hidden_layers are 1-based"),
        (["family=kandinsky"], r"family = 'kandinsky' is unknown; known: vit, sd, sdxl"),
    ],
)
def test_impossible_combinations_fail_at_validation(overrides: list[str], message: str) -> None:
    with pytest.raises((ProfileError, UnsupportedError), match=message):
        load_profile("vit-onnxruntime-fp32", overrides)


def test_set_overrides_parse_toml_values() -> None:
    profile = load_profile(
        "vit-openvino-fp32",
        [
            "validation.atol=1e-3",
            "shapes.dynamic_batch=false",
            "validation.batch_sizes=[1]",
            "runtime.threads=2",
            "model.hidden_layers=[1, 2]",
            "openvino.performance_hint=throughput",
        ],
    )
    assert profile.validation.atol == 1e-3
    assert profile.shapes.dynamic_batch is False
    assert profile.runtime.threads == 2
    assert profile.model.hidden_layers == (1, 2)
    assert OpenVINOSettings.of(profile).performance_hint == "throughput"


def test_an_empty_set_value_restores_the_default() -> None:
    """How a user drops a bundled profile's end-to-end gate: its prompts and its thresholds."""
    gated = load_profile("sd3-openvino-int8")
    assert gated.validation.prompts and gated.validation.min_psnr_db is not None
    with pytest.raises(ProfileError, match=r"validation\.min_psnr_db needs validation\.prompts"):
        load_profile("sd3-openvino-int8", ["validation.prompts=[]"])
    dropped = load_profile(
        "sd3-openvino-int8",
        ["validation.prompts=[]", "validation.min_psnr_db=", "validation.min_ssim= "],
    )
    assert dropped.validation.prompts == ()
    assert dropped.validation.min_psnr_db is None and dropped.validation.min_ssim is None
    assert load_profile("sd3-openvino-int8", ["runtime.threads="]).runtime.threads is None


def test_set_rejects_unknown_keys_and_malformed_items() -> None:
    with pytest.raises(
        ProfileError, match=r"unknown key 'validation\.atl' \(did you mean 'atol'\?\)"
    ):
        load_profile("vit-onnxruntime-fp32", ["validation.atl=1"])
    with pytest.raises(ProfileError, match="--set expects key=value"):
        load_profile("vit-onnxruntime-fp32", ["validation.atol"])


def test_runtime_name_auto_resolves_to_the_formats_runtime() -> None:
    profile = load_profile("vit-onnxruntime-fp32", ["runtime.name=auto"])
    assert profile.runtime.name == "onnxruntime"
    assert load_profile("vit-openvino-fp32", ["runtime.name=auto"]).runtime.name == "openvino"
