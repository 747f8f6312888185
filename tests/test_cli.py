"""The kiln CLI end to end: every command, and every bad input as one line without a traceback.

Most tests call the click group in-process with CliRunner (KilnErrors then surface as
``result.exception``) or ``modelkiln.cli.main`` (where a KilnError becomes one line on stderr);
the "no traceback" guarantees are checked on real ``python -m modelkiln`` processes.
"""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from cli_support import Outcome, assert_one_line_error, invoke, kiln
from PIL import Image

from modelkiln import load
from modelkiln.cpu import CPU_FEATURES
from modelkiln.errors import ArtifactError, InputError, ProfileError, UnsupportedError
from modelkiln.plan import load_profile
from modelkiln.profiles import bundled_profile_names, bundled_profiles_dir

pytestmark = pytest.mark.onnxruntime

PROFILE = "vit-onnxruntime-fp32"


def info_summary(text: str) -> dict[str, str]:
    """The key/value grid `kiln info` prints above its component table."""
    summary = {}
    for line in text.splitlines():
        if line.startswith(("┏", "┃", "┡", "│", "└")):
            break
        key, value = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        summary[key] = value
    return summary


def table_rows(text: str) -> list[list[str]]:
    """The body rows of a rich table, as stripped cells."""
    return [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in text.splitlines()
        if line.startswith("│")
    ]


@pytest.fixture
def classifier(built: Callable[..., Path]) -> Path:
    return built("hf-classifier", PROFILE)


@pytest.fixture
def backbone(built: Callable[..., Path]) -> Path:
    return built("hf-backbone", PROFILE)


@pytest.fixture
def image(image_files: list[Path]) -> Path:
    return image_files[0]


def copy_artifact(artifact: Path, target: Path) -> Path:
    """Tests may damage a copy, never a shared built(...) artifact."""
    return Path(shutil.copytree(artifact, target))


# --- build ----------------------------------------------------------------------------------


def test_build_writes_the_artifact_and_honours_set(
    source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    out = tmp_path / "artifact"
    result = invoke(
        "build", source_dir("hf-classifier"), "-p", PROFILE, "-o", out,
        "--set", "validation.atol=1e-3",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"built {out}"
    # The validation table: one row per output, whole even at COLUMNS=1000 or 80.
    assert re.search(r"vision_model\s*│\s*logits\s*│\s*\d\.\d\de-\d\d\s*│\s*1\.0+", result.stderr)
    assert "onnxruntime, f32" in result.stderr
    manifest = json.loads((out / "kiln.json").read_text())
    assert manifest["profile"]["name"] == PROFILE
    assert manifest["profile"]["validation"]["atol"] == 1e-3
    validation = manifest["components"]["vision_model"]["validation"]
    assert validation["tolerance"]["atol"] == 1e-3, "--set overrides the family's 1e-4"
    assert validation["passed"] is True
    assert (out / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "validaton.atol=1e-3",
            "unknown key 'validaton' (did you mean 'validation'?); known sections: model, export,",
        ),
        (
            "validation.atl=1e-3",
            "unknown key 'validation.atl' (did you mean 'atol'?); known keys in [validation]:",
        ),
        ("validation.atol=-1", "validation.atol must be > 0, got -1.0"),
        ("validation.atol", "--set expects key=value (e.g. validation.atol=1e-3), got"),
    ],
)
def test_build_with_a_bad_set_fails_before_loading(
    override: str,
    message: str,
    source_dir: Callable[[str], Path],
    tmp_path: Path,
    kiln_main: Callable[..., Outcome],
) -> None:
    out = tmp_path / "artifact"
    args = ("build", source_dir("hf-classifier"), "-p", PROFILE, "-o", out, "--set", override)
    assert_one_line_error(kiln_main(*args), message)
    assert not out.exists()
    result = invoke(*args)
    assert result.exit_code == 1
    assert isinstance(result.exception, ProfileError)


def test_build_with_an_unknown_profile(
    source_dir: Callable[[str], Path], kiln_main: Callable[..., Outcome]
) -> None:
    outcome = kiln_main("build", source_dir("hf-classifier"), "-p", "vit-onnx-fp32")
    assert_one_line_error(
        outcome,
        "no profile 'vit-onnx-fp32': not a file and not a bundled profile",
        "see `kiln profiles list`",
    )


def test_build_unknown_timm_name_is_a_user_error(
    tmp_path: Path, kiln_main: Callable[..., Outcome]
) -> None:
    pytest.importorskip("timm")
    outcome = kiln_main("build", "timm:not_a_model_xyz", "-p", PROFILE, "-o", tmp_path / "x")
    assert_one_line_error(outcome, "timm has no pretrained model 'not_a_model_xyz'", progress=True)


# --- profiles -------------------------------------------------------------------------------


def test_profiles_list_shows_every_bundled_profile() -> None:
    result = invoke("profiles", "list")
    assert result.exit_code == 0, result.output
    names = bundled_profile_names()
    assert {"vit-onnxruntime-fp32", "vit-openvino-fp32", "vit-torch-fp32"} <= set(names)
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if "│" in line}
    assert set(names) <= set(rows)
    assert "onnxruntime" in rows["vit-onnxruntime-fp32"]
    assert "openvino" in rows["vit-openvino-bf16"]
    assert "bf16" in rows["vit-openvino-bf16"]


def test_profiles_list_filters_by_every_word_and_speaks_json() -> None:
    result = invoke("profiles", "list", "sd", "openvino", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    expected = [
        name for name in bundled_profile_names() if name.startswith("sd-") and "openvino" in name
    ]
    assert [row["name"] for row in rows] == expected  # sdxl-* is another family
    assert {row["family"] for row in rows} == {"sd"} and {row["format"] for row in rows} == {
        "openvino"
    }
    assert set(rows[0]) == {
        "name", "family", "format", "runtime", "compute", "weights", "scheme", "description"
    }  # fmt: skip
    schemes = json.loads(invoke("profiles", "list", "vit", "int8-static", "--json").stdout)
    assert schemes and all(row["scheme"] == "int8-static" for row in schemes)
    none = invoke("profiles", "list", "vit", "nothing-like-it")
    assert none.exit_code == 1 and "no bundled profile matches 'vit nothing-like-it'" in str(
        none.exception
    )


def test_profiles_schemes_prints_the_registered_handlers() -> None:
    result = invoke("profiles", "schemes")
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if "│" in line}
    header = [cell.strip() for cell in result.stdout.splitlines()[1].split("┃")[1:-1]]
    assert header == [
        "scheme", "onnx", "openvino", "coreml", "tensorrt", "torch", "executorch", "what it does"
    ]  # fmt: skip
    cells = [cell.strip() for cell in rows["int8-hybrid"].split("│")[1:-1]]
    assert cells[:6] == ["int8-hybrid", "—", "yes", "—", "—", "—"]
    assert "palettize4-weights" in rows and "int8-dynamic" in rows


def test_profiles_show_applies_set_and_round_trips(tmp_path: Path) -> None:
    result = invoke("profiles", "show", "vit-openvino-fp32", "--set", "runtime.threads=2")
    assert result.exit_code == 0, result.output
    assert "\nthreads = 2\n" in result.stdout
    data = tomllib.loads(result.stdout)
    assert data["name"] == "vit-openvino-fp32"
    assert data["runtime"]["threads"] == 2
    assert data["export"]["format"] == "openvino"
    assert data["schema_version"] == 2
    # Every default is written out, and the file reads back as the same profile.
    assert data["validation"]["batch_sizes"] == [1, 4]
    saved = tmp_path / "shown.toml"
    saved.write_text(result.stdout)
    assert load_profile(saved) == load_profile("vit-openvino-fp32", ["runtime.threads=2"])


def test_profiles_show_unknown_profile(kiln_main: Callable[..., Outcome]) -> None:
    assert_one_line_error(
        kiln_main("profiles", "show", "vit-openvino-fp23"),
        "no profile 'vit-openvino-fp23'",
        "(did you mean 'vit-openvino-fp32'?)",
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (
            '[export]\nformt = "onnx"\n',
            "unknown key 'export.formt' (did you mean 'format'?)",
        ),
        ("[export\n", "is not valid TOML"),
        (
            '[precision]\ncompute = "bf16"\n',
            "runtime 'onnxruntime' cannot compute in bf16; supported: fp16, fp32",
        ),
        ('[export]\nopset = "18"\n', "export.opset must be int, got str '18'"),
    ],
)
def test_profiles_validate(content: str, problem: str, tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    shutil.copy(bundled_profiles_dir() / f"{PROFILE}.toml", good)
    result = invoke("profiles", "validate", good)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"ok {good}"

    bad = tmp_path / "bad.toml"
    bad.write_text(f'schema_version = 1\nname = "bad"\nfamily = "vit"\n{content}')
    result = invoke("profiles", "validate", good, bad)
    assert result.exit_code == 1
    assert f"ok {good}" in result.stdout
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"invalid profile {bad}") and problem in line, line


# --- classify -------------------------------------------------------------------------------


def test_classify_prints_a_table(classifier: Path, image_files: list[Path]) -> None:
    result = invoke("classify", classifier, *image_files, "-k", "2")
    assert result.exit_code == 0, result.output
    with load(classifier) as pipeline:
        expected = pipeline([str(p) for p in image_files], top_k=2)
    rows = table_rows(result.stdout)
    assert len(rows) == 2 * len(image_files)
    for i, (path, predictions) in enumerate(zip(image_files, expected, strict=True)):
        first, second = rows[2 * i], rows[2 * i + 1]
        assert first == [str(path), "1", predictions[0].label, f"{predictions[0].score:.4f}"]
        assert second == ["", "2", predictions[1].label, f"{predictions[1].score:.4f}"]


@pytest.mark.parametrize(("top_k", "expected_k"), [(3, 3), (1, 1), (50, 10)])
def test_classify_json(
    top_k: int, expected_k: int, classifier: Path, image_files: list[Path]
) -> None:
    result = invoke("classify", classifier, *image_files, "--json", "-k", top_k, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [item["image"] for item in payload] == [str(p) for p in image_files]
    with load(classifier) as pipeline:
        expected = pipeline([str(p) for p in image_files], top_k=top_k)
    for item, predictions in zip(payload, expected, strict=True):
        got = item["predictions"]
        assert len(got) == expected_k
        assert all(set(p) == {"label", "score", "index"} for p in got)
        scores = [p["score"] for p in got]
        assert scores == sorted(scores, reverse=True)
        assert 0 < sum(scores) <= 1 + 1e-6
        assert all(p["label"] == f"class_{p['index']}" for p in got)
        assert [p["index"] for p in got] == [p.index for p in predictions]
        np.testing.assert_allclose(scores, [p.score for p in predictions], rtol=1e-6)


def test_classify_expands_directories(
    classifier: Path, rgb_images: list[np.ndarray], tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    Image.fromarray(rgb_images[0]).save(folder / "b.png")
    Image.fromarray(rgb_images[1]).save(folder / "nested" / "a.JPG")
    Image.fromarray(rgb_images[2]).save(folder / "a.bmp")
    (folder / "notes.txt").write_text("not an image")
    (folder / "nested" / "model.onnx").write_bytes(b"not an image either")
    single = tmp_path / "single.png"
    Image.fromarray(rgb_images[0]).save(single)

    result = invoke("classify", classifier, single, folder, "--json", "-k", 1)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [item["image"] for item in payload] == [
        str(single),
        str(folder / "a.bmp"),
        str(folder / "b.png"),
        str(folder / "nested" / "a.JPG"),
    ]
    # The same pixels get the same answer whichever way they came in.
    assert payload[0]["predictions"] == payload[2]["predictions"]


def test_classify_empty_directory(
    classifier: Path, tmp_path: Path, kiln_main: Callable[..., Outcome]
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    assert_one_line_error(
        kiln_main("classify", classifier, tmp_path / "empty"),
        f"directory '{tmp_path / 'empty'}' holds no image files",
    )


def test_classify_an_embedding_artifact(
    backbone: Path, image: Path, kiln_main: Callable[..., Outcome]
) -> None:
    assert_one_line_error(
        kiln_main("classify", backbone, image),
        "this artifact was built for image-feature-extraction, not image-classification; "
        "use `kiln embed`, or rebuild with --set model.task=image-classification",
    )


def test_classify_table_prints_paths_verbatim(
    classifier: Path, rgb_images: list[np.ndarray], tmp_path: Path
) -> None:
    path = tmp_path / "cat[draft].png"
    Image.fromarray(rgb_images[0]).save(path)
    result = invoke("classify", classifier, path, "-k", "1")
    assert result.exit_code == 0, result.output
    assert str(path) in result.stdout, result.stdout


# --- embed ----------------------------------------------------------------------------------


def test_embed_writes_unit_vectors(backbone: Path, image_files: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "vectors" / "out.npy"
    result = invoke("embed", backbone, *image_files, "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote {out}: 3 × 32 float32"
    vectors = np.load(out)
    assert vectors.shape == (3, 32)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    with load(backbone) as pipeline:
        expected = pipeline([str(p) for p in image_files])
    np.testing.assert_allclose(vectors, expected, atol=1e-6)


@pytest.mark.parametrize("pooling", ["auto", "cls", "mean"])
def test_embed_no_normalize(
    pooling: str, backbone: Path, image_files: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "raw.npy"
    result = invoke(
        "embed", backbone, *image_files, "-o", out, "--no-normalize", "--pooling", pooling
    )
    assert result.exit_code == 0, result.output
    raw = np.load(out)
    with load(backbone) as pipeline:
        expected = pipeline([str(p) for p in image_files], pooling=pooling, normalize=False)
    np.testing.assert_allclose(raw, expected, atol=1e-6)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)


def test_embed_layer_not_exported(
    backbone: Path, image: Path, tmp_path: Path, kiln_main: Callable[..., Outcome]
) -> None:
    out = tmp_path / "out.npy"
    assert_one_line_error(
        kiln_main("embed", backbone, image, "-o", out, "--layer", "1"),
        "this artifact exports no hidden state for layer 1 (exported: none); "
        "rebuild with --set 'model.hidden_layers=[1]'",
    )
    assert not out.exists()


def test_embed_a_classification_artifact(
    classifier: Path, image: Path, tmp_path: Path, kiln_main: Callable[..., Outcome]
) -> None:
    assert_one_line_error(
        kiln_main("embed", classifier, image, "-o", tmp_path / "out.npy"),
        "built for image-classification, not image-feature-extraction; use `kiln classify`",
    )


def test_embed_requires_an_output() -> None:
    result = invoke("embed", "artifact", "image.png")
    assert result.exit_code == 2, "click usage errors exit with 2"
    assert "Missing option '-o' / '--output'" in result.output


# --- info / verify --------------------------------------------------------------------------


def test_info_summarises_the_manifest(classifier: Path, source_dir: Callable[[str], Path]) -> None:
    result = invoke("info", classifier)
    assert result.exit_code == 0, result.output
    summary = info_summary(result.stdout)
    assert summary["artifact"] == str(classifier)
    assert summary["family / task"] == "vit / image-classification"
    assert summary["source"] == str(source_dir("hf-classifier"))
    assert summary["profile"] == PROFILE
    assert summary["format / runtime"] == "onnx / onnxruntime"
    assert summary["precision"] == "compute fp32, weights fp32"
    assert re.fullmatch(r"3 files, \d+\.\d MB", summary["files"])
    assert re.search(r"in [\d.]+ s, peak RSS [\d.]+ GB, modelkiln ", summary["built"])
    ((component, inputs, outputs, validation, used),) = table_rows(result.stdout)
    assert component == "vision_model"
    assert inputs == "pixel_values float32['batch', 3, 32, 32]"
    assert outputs == "logits float32['batch', 10]"
    assert re.fullmatch(
        r"logits: max-abs \S+, cosine 1\.0+(, SQNR \d+\.\d dB)?, top-1 1\.000", validation
    )
    assert "inference_precision f32" in used


@pytest.mark.openvino
def test_info_shows_quantization_and_the_end_to_end_check(built: Callable[..., Path]) -> None:
    artifact = built(
        "hf-classifier",
        "vit-openvino-int8",
        'validation.data="digits"',
        "validation.max_accuracy_drop=3.0",
    )
    result = invoke("info", artifact)
    assert result.exit_code == 0, result.output
    summary = info_summary(result.stdout)
    assert re.fullmatch(
        r"vision_model int8-weights: 14 weights, 0\.\d → 0\.\d MB", summary["quantization"]
    )
    assert re.fullmatch(
        r"360 images of digits: top-1 \d+\.\d\d % \(torch fp32 \d+\.\d\d %, drop -?\d\.\d\d\)",
        summary["end to end"],
    )
    ((*_, validation, _),) = table_rows(result.stdout)
    assert re.search(r"SQNR \d+\.\d dB", validation)


def test_info_json(classifier: Path) -> None:
    result = invoke("info", classifier, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data == json.loads((classifier / "kiln.json").read_text())
    assert set(data["components"]) == {"vision_model"}
    assert data["profile"]["name"] == PROFILE
    assert "probed" not in data


def test_info_probe(classifier: Path) -> None:
    result = invoke("info", classifier, "--probe")
    assert result.exit_code == 0, result.output
    assert "runtime here" in result.stdout
    ((*_, used, here),) = table_rows(result.stdout)
    assert here == used, "the same runtime, here and at build"
    assert here.startswith("providers ['CPUExecutionProvider'], inference_precision f32")

    data = json.loads(invoke("info", classifier, "--probe", "--json").stdout)
    probed = data["probed"]["vision_model"]
    assert probed["runtime"] == "onnxruntime"
    assert probed["inference_precision"] == "f32"
    assert probed["providers"] == ["CPUExecutionProvider"]


@pytest.mark.openvino
def test_info_probe_with_another_runtime(classifier: Path) -> None:
    result = invoke("info", classifier, "--probe", "--json", "--runtime", "openvino")
    assert result.exit_code == 0, result.output
    probed = json.loads(result.stdout)["probed"]["vision_model"]
    assert probed["runtime"] == "openvino"
    assert probed["inference_precision"] == "f32", "an fp32 profile runs in f32 on any CPU"


def test_verify_ok(classifier: Path) -> None:
    result = invoke("verify", classifier)
    assert result.exit_code == 0, result.output
    count = len(json.loads((classifier / "kiln.json").read_text())["files"])
    assert result.stdout.strip() == f"ok {classifier}: {count} files match kiln.json"


def test_verify_finds_a_flipped_byte(classifier: Path, tmp_path: Path) -> None:
    copy = copy_artifact(classifier, tmp_path / "copy")
    model = copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    outcome = kiln("verify", copy)
    assert outcome.code == 1
    assert "Traceback" not in outcome.err
    assert outcome.err_lines[0].startswith("✓ hashing 3 files")  # the progress line
    assert outcome.err_lines[1:] == [
        "✗ model.onnx has changed (sha256 differs from the manifest)",
        f"error: {copy} failed verification: 1 problem(s)",
    ]
    # Loading checks sizes only (hashes on request): a same-size change is verify's job.
    assert invoke("verify", classifier).exit_code == 0, "the original is untouched"


def test_missing_file_is_reported_everywhere(
    classifier: Path, image: Path, tmp_path: Path, kiln_main: Callable[..., Outcome]
) -> None:
    copy = copy_artifact(classifier, tmp_path / "copy")
    (copy / "model.onnx").unlink()
    (copy / "preprocessor_config.json").write_text("{}")
    line = assert_one_line_error(
        kiln("classify", copy, image),
        f"artifact {copy} is incomplete or corrupted: model.onnx is missing (and 1 more); "
        "rebuild it (`kiln verify` lists every problem)",
    )
    assert line.startswith("error: artifact")
    verify = kiln_main("verify", copy)
    assert verify.code == 1
    assert "✗ model.onnx is missing" in verify.err
    assert "✗ preprocessor_config.json has 2 bytes, the manifest says" in verify.err
    assert f"error: {copy} failed verification: 2 problem(s)" in verify.err


# --- env ------------------------------------------------------------------------------------


def test_env() -> None:
    result = invoke("env")
    assert result.exit_code == 0, result.output
    assert "CPU features:" in result.stdout
    assert "onnxruntime" in result.stdout
    assert "numpy" in result.stdout


def test_env_shows_the_pip_extra() -> None:
    result = invoke("env")
    assert result.exit_code == 0, result.output
    assert "modelkiln[onnxruntime]" in result.stdout


def test_env_json() -> None:
    result = invoke("env", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    features = report["host"]["cpu"]["features"]
    assert isinstance(features, list)
    assert set(features) <= set(CPU_FEATURES)
    runtimes = {r["name"]: r for r in report["runtimes"]}
    assert {"onnxruntime", "openvino", "torch"} <= set(runtimes)
    assert runtimes["onnxruntime"]["available"] is True
    assert runtimes["onnxruntime"]["formats"] == ["onnx"]
    assert runtimes["onnxruntime"]["extra"] == "onnxruntime"
    assert runtimes["onnxruntime"]["version"] == report["libraries"]["onnxruntime"]
    assert "numpy" in report["libraries"]


# --- bad input: one line, non-zero exit, no traceback ---------------------------------------


def write_text_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.png"
    path.write_text("this is text, not a PNG\n")
    return path


def write_truncated_png(tmp_path: Path) -> Path:
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    whole = tmp_path / "whole.png"
    Image.fromarray(noise).save(whole)
    data = whole.read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    return path


def corrupt_manifest(artifact: Path, tmp_path: Path) -> Path:
    copy = copy_artifact(artifact, tmp_path / "corrupt")
    (copy / "kiln.json").write_text('{"family": "vit", ')
    return copy


def empty_dir(tmp_path: Path) -> Path:
    (tmp_path / "not-an-artifact").mkdir()
    return tmp_path / "not-an-artifact"


# (id, args built from (artifact, image, tmp_path), fragments the one line must hold)
BAD_INPUTS: list[tuple[str, Callable[[Path, Path, Path], Sequence[object]], tuple[str, ...]]] = [
    (
        "text-file",
        lambda a, i, t: ["classify", a, write_text_file(t)],
        ("notes.png' is not an image file Pillow can read", "pass a PNG, JPEG"),
    ),
    (
        "missing-image",
        lambda a, i, t: ["classify", a, t / "nope.png"],
        ("no such image file: '", "nope.png'; check the path"),
    ),
    (
        "truncated-png",
        lambda a, i, t: ["classify", a, write_truncated_png(t)],
        ("truncated.png' is truncated or corrupt and cannot be decoded", "re-export"),
    ),
    (
        "max-pixels",
        lambda a, i, t: ["classify", a, i, "--max-pixels", "10"],
        ("image_0.png' is 50×40", "over the limit of", "--max-pixels"),
    ),
    (
        "no-artifact-dir",
        lambda a, i, t: ["classify", t / "missing", i],
        ("no artifact at", "missing: the directory does not exist"),
    ),
    (
        "artifact-is-a-file",
        lambda a, i, t: ["info", i],
        ("image_0.png is a file, not an artifact directory",),
    ),
    (
        "no-kiln-json",
        lambda a, i, t: ["classify", empty_dir(t), i],
        (
            "not-an-artifact is not a modelkiln artifact (no kiln.json); "
            "build one with `kiln build SOURCE --profile PROFILE -o DIR`",
        ),
    ),
    (
        "corrupted-kiln-json",
        lambda a, i, t: ["classify", corrupt_manifest(a, t), i],
        ("kiln.json is not valid JSON (", "); rebuild the artifact"),
    ),
    (
        "runtime-typo",
        lambda a, i, t: ["classify", a, i, "--runtime", "openvion"],
        ("unknown runtime 'openvion' (did you mean 'openvino'?); known: ",),
    ),
    (
        "runtime-cannot-run-format",
        lambda a, i, t: ["classify", a, i, "--runtime", "torch"],
        ("runtime 'torch' cannot run a onnx artifact; use one of: onnxruntime, openvino",),
    ),
    (
        "onnxruntime-device",
        lambda a, i, t: ["classify", a, i, "--device", "tpu"],
        ("onnxruntime device 'tpu' is not supported; use one of: cpu, cuda",),
    ),
]
# Real processes for a sample: image errors, artifact errors and a registry error.
SUBPROCESS_CASES = {
    "text-file",
    "truncated-png",
    "no-artifact-dir",
    "corrupted-kiln-json",
    "runtime-typo",
}


@pytest.mark.parametrize(
    ("make_args", "fragments"),
    [pytest.param(make, fragments, id=name) for name, make, fragments in BAD_INPUTS],
)
def test_bad_input_in_process(
    make_args: Callable[[Path, Path, Path], Sequence[object]],
    fragments: tuple[str, ...],
    classifier: Path,
    image: Path,
    tmp_path: Path,
    kiln_main: Callable[..., Outcome],
) -> None:
    args = make_args(classifier, image, tmp_path)
    assert_one_line_error(kiln_main(*args), *fragments)
    # The click group itself lets the KilnError through, typed.
    result = invoke(*args)
    assert result.exit_code == 1
    assert isinstance(result.exception, ArtifactError | InputError | UnsupportedError)


@pytest.mark.parametrize(
    ("make_args", "fragments"),
    [
        pytest.param(make, fragments, id=name)
        for name, make, fragments in BAD_INPUTS
        if name in SUBPROCESS_CASES
    ],
)
def test_bad_input_in_a_real_process(
    make_args: Callable[[Path, Path, Path], Sequence[object]],
    fragments: tuple[str, ...],
    classifier: Path,
    image: Path,
    tmp_path: Path,
) -> None:
    outcome = kiln(*make_args(classifier, image, tmp_path))
    assert_one_line_error(outcome, *fragments)
    assert outcome.out == ""


def test_verbose_prints_the_traceback(tmp_path: Path, image: Path) -> None:
    outcome = kiln("-v", "classify", tmp_path / "missing", image)
    assert outcome.code == 2
    assert "Traceback" in outcome.err
    assert "ArtifactError" in outcome.err
    assert (
        outcome.err_lines[-1]
        == f"error: no artifact at {tmp_path / 'missing'}: the directory does not exist"
    )


def test_max_pixels_message_names_the_real_sizes(
    classifier: Path, image: Path, kiln_main: Callable[..., Outcome]
) -> None:
    line = assert_one_line_error(kiln_main("classify", classifier, image, "--max-pixels", "10"))
    assert "(0.0 MP), over the limit of 0.0 MP" not in line, line


def test_runtime_not_installed(
    classifier: Path,
    image: Path,
    monkeypatch: pytest.MonkeyPatch,
    kiln_main: Callable[..., Outcome],
) -> None:
    from modelkiln.runtimes.onnxruntime import OnnxRuntime

    monkeypatch.setattr(OnnxRuntime, "is_available", classmethod(lambda cls: False))
    assert_one_line_error(
        kiln_main("classify", classifier, image),
        "onnxruntime is not installed; install it with: pip install 'modelkiln[onnxruntime]'",
    )
    report = json.loads(invoke("env", "--json").stdout)
    assert {r["name"]: r["available"] for r in report["runtimes"]}["onnxruntime"] is False


@pytest.mark.parametrize(
    ("profile", "package", "extra"),
    [
        ("vit-onnxruntime-fp32", "onnxscript", "onnx"),
        pytest.param("vit-openvino-fp32", "openvino", "openvino-build", marks=pytest.mark.openvino),
        ("vit-torch-fp32", "safetensors", "build"),
    ],
)
def test_a_missing_build_package_names_the_build_extra(
    profile: str,
    package: str,
    extra: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kiln_main: Callable[..., Outcome],
) -> None:
    """Running needs the backend's extra; building needs more, and says which extra has it."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == package else find_spec(name, *a),
    )
    assert_one_line_error(
        kiln_main("build", tmp_path, "--profile", profile, "-o", tmp_path / "out"),
        f"{package} is not installed; install it with: pip install 'modelkiln[{extra}]'",
    )


# --- image modes ----------------------------------------------------------------------------


def test_image_modes_classify_like_their_rgb_equivalent(classifier: Path, tmp_path: Path) -> None:
    """Grayscale, RGBA, palette and 16-bit PNGs classify fine, as the RGB image they show."""
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, size=(36, 44), dtype=np.uint8)
    rgb = rng.integers(0, 256, size=(36, 44, 3), dtype=np.uint8)
    rgba = np.dstack([rgb, rng.integers(0, 256, size=(36, 44), dtype=np.uint8)])
    palette = Image.fromarray(rgb).quantize(colors=16)
    files = {
        "gray.png": (Image.fromarray(gray), np.dstack([gray] * 3)),
        "rgba.png": (Image.fromarray(rgba), rgb),
        "palette.png": (palette, np.asarray(palette.convert("RGB"))),
        "gray16.png": (
            Image.fromarray(gray.astype(np.uint16) * 257),
            np.dstack([gray] * 3),
        ),
    }
    paths = []
    for name, (picture, _) in files.items():
        picture.save(tmp_path / name)
        paths.append(tmp_path / name)
    assert Image.open(tmp_path / "gray16.png").mode in ("I;16", "I")
    assert Image.open(tmp_path / "palette.png").mode == "P"

    result = invoke("classify", classifier, *paths, "--json", "-k", "10")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    with load(classifier) as pipeline:
        expected = pipeline([equivalent for _, equivalent in files.values()], top_k=10)
    for item, predictions in zip(payload, expected, strict=True):
        got = sorted(item["predictions"], key=lambda p: p["index"])
        want = sorted(predictions, key=lambda p: p.index)
        np.testing.assert_allclose(
            [p["score"] for p in got], [p.score for p in want], atol=1e-6, err_msg=item["image"]
        )


# --- generate -------------------------------------------------------------------------------


@pytest.fixture
def diffusion(built: Callable[..., Path]) -> Path:
    return built("sd", "sd-torch-fp32")


def rgb_png(path: Path, size: tuple[int, int], seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.torch
@pytest.mark.slow
def test_generate_matches_the_python_api_in_every_mode(
    diffusion: Path, tmp_path: Path, kiln_main: Callable[..., Outcome]
) -> None:
    init = rgb_png(tmp_path / "init.png", (40, 24), seed=1)  # any size: resized to the model's
    mask = tmp_path / "mask.png"
    Image.fromarray(np.tile(np.array([0, 255], np.uint8).repeat(8), (16, 1))).save(mask)
    common = ["--prompt", "a red cube", "--steps", 2, "--seed", 3]
    outcome = kiln_main("generate", diffusion, *common, "--num-images", 2, "-o", tmp_path / "t.png")
    assert outcome.code == 0, outcome.err
    assert "wrote" in outcome.out and "t-1.png (32×32)" in outcome.out
    kiln_main("generate", diffusion, *common, "--image", init, "-o", tmp_path / "i.png")
    kiln_main(
        "generate", diffusion, *common, "--image", init, "--mask", mask, "-o", tmp_path / "m.png"
    )
    with load(diffusion) as pipeline:
        settings = {"steps": 2, "seed": 3}
        expected = {
            "t-0.png": pipeline.text_to_image("a red cube", num_images=2, **settings)[0],
            "t-1.png": pipeline.text_to_image("a red cube", num_images=2, **settings)[1],
            "i.png": pipeline.image_to_image("a red cube", init, strength=0.8, **settings)[0],
            "m.png": pipeline.inpaint("a red cube", init, mask, strength=1.0, **settings)[0],
        }
    for name, image in expected.items():
        written = np.asarray(Image.open(tmp_path / name))
        np.testing.assert_array_equal(written, np.asarray(image), err_msg=name)
    assert not np.array_equal(np.asarray(expected["t-0.png"]), np.asarray(expected["i.png"]))


@pytest.mark.torch
@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--mask", "mask.png"], ("--mask needs --image: the image to inpaint",)),
        (["--strength", "0.5"], ("--strength applies to --image",)),
        (["--scheduler", "eulr"], ("unknown scheduler 'eulr' (did you mean 'euler'?)",)),
        (["--image", "nope.png"], ("no such image file: 'nope.png'",)),
        (["--width", "30"], ("width must be a positive multiple of 8 up to 16384, got 30",)),
    ],
)
def test_generate_bad_input(
    extra: list[str],
    fragments: tuple[str, ...],
    diffusion: Path,
    tmp_path: Path,
    kiln_main: Callable[..., Outcome],
) -> None:
    out = tmp_path / "out.png"
    assert_one_line_error(
        kiln_main("generate", diffusion, "--prompt", "a cat", *extra, "-o", out), *fragments
    )
    assert not out.exists()


def test_generate_with_a_classifier(
    classifier: Path, tmp_path: Path, kiln_main: Callable[..., Outcome]
) -> None:
    assert_one_line_error(
        kiln_main("generate", classifier, "--prompt", "a cat", "-o", tmp_path / "x.png"),
        "built for image-classification, not image generation; use `kiln classify`",
    )


def test_generate_with_a_broken_artifact_in_a_real_process(tmp_path: Path) -> None:
    assert_one_line_error(
        kiln("generate", tmp_path / "missing", "--prompt", "a cat", "-o", tmp_path / "x.png"),
        "no artifact at",
    )


@pytest.mark.torch
def test_generate_says_once_that_a_long_prompt_was_truncated(
    diffusion: Path, tmp_path: Path
) -> None:
    outcome = kiln(
        "generate", diffusion, "--prompt", "a cat " * 60, "--steps", 1, "-o", tmp_path / "x.png"
    )
    assert outcome.code == 0, outcome.err
    warnings = [line for line in outcome.err_lines if "the text encoder reads the first 77" in line]
    assert len(warnings) == 1, outcome.err
    assert warnings[0].count("WARNING") == 1 and "modelkiln." not in warnings[0]


def test_progress_counts_steps_with_an_eta_and_leaves_spinners_uncounted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Denoising shows "12/50" and the time left; a task without a count shows neither."""
    import io

    from rich.console import Console

    from modelkiln.cli import console

    buffer = io.StringIO()
    monkeypatch.setattr(console, "err", Console(file=buffer, force_terminal=True, width=120))
    with console.progress_display() as progress:
        with progress.task("denoising (text, 5 steps)", total=5) as advance:
            for _ in range(5):
                advance(1)
        with progress.task("loading"):
            pass
    final = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buffer.getvalue()).splitlines()[-2:]
    denoising, loading = (line for line in final if "denoising" in line or "loading" in line)
    assert re.search(r"5/5 .*0:00:0\d .*0:00:00", denoising), denoising
    assert "/" not in loading.split("loading")[1], loading


def test_global_flags_go_anywhere_before_a_double_dash() -> None:
    from modelkiln.cli import hoist_global_flags

    assert hoist_global_flags(["build", "x", "-p", "y", "-v", "--", "-q"]) == [
        "-v", "build", "x", "-p", "y", "--", "-q",
    ]  # fmt: skip
    assert hoist_global_flags(["-q", "env", "--quiet"]) == ["-q", "--quiet", "env"]


def test_quiet_prints_results_without_progress_and_verbose_follows_the_subcommand(
    kiln_main: Callable[..., Outcome], source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    out = tmp_path / "artifact"
    quiet = kiln_main("build", source_dir("hf-classifier"), "-p", PROFILE, "-o", out, "-q")
    assert quiet.code == 0, quiet.err
    assert quiet.out.strip() == f"built {out}"
    assert "✓" not in quiet.err  # the validation summary stays: it is a result
    assert "validation against torch" in quiet.err and "logits" in quiet.err
    verbose = kiln_main("info", tmp_path / "missing", "-v")
    assert verbose.code == 2 and "Traceback" in verbose.err
    both = kiln_main("env", "-q", "-v")
    assert both.code == 2 and "-v and -q contradict each other" in both.err
