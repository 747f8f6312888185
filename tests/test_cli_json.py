"""`--json` on every kiln command: stdout is one JSON document holding the fields docs/cli.md
lists for the command (read from the doc itself, so the two cannot drift), with real values;
the doc's exit-code table is exit_codes.DOCUMENTED; every option says what it does.

Commands run in-process through click (cli_support.kiln_json) on the session's tiny builds.
`kiln lora-adapter`'s document is checked in models/test_runtime_lora.py, beside the SD build
with LoRA slots it needs (a minute to build).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
from cli_support import CLI_DOC, Outcome, documented_fields, invoke, json_result, kiln_json

from modelkiln import load, open_artifact
from modelkiln.cli import cli
from modelkiln.cli.exit_codes import DOCUMENTED

pytestmark = pytest.mark.onnxruntime

PROFILE = "vit-onnxruntime-fp32"


@pytest.fixture
def classifier(built: Callable[..., Path]) -> Path:
    return built("hf-classifier", PROFILE)


def copy_artifact(artifact: Path, target: Path) -> Path:
    """Tests may change a copy, never a shared built(...) artifact."""
    return Path(shutil.copytree(artifact, target))


# --- the reference and the command tree -----------------------------------------------------


def commands(group: click.Group = cli, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
    """Every command kiln runs, by its full name ("profiles list"), groups left out."""
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def test_every_command_speaks_json_and_the_reference_documents_it() -> None:
    sections = documented_fields()
    names = dict(commands())
    without = [name for name, command in names.items() if "--json" not in _options(command)]
    assert without == []
    # `build --matrix` is build's other document.
    assert {section.split(" --")[0] for section in sections} == set(names)
    assert all(sections.values()), "every section lists its fields"


def test_the_exit_code_table_is_exit_codes_documented() -> None:
    text = CLI_DOC.read_text(encoding="utf-8").split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    table = {
        int(code): meaning for code, meaning in re.findall(r"^\| (\d+) \| (.+) \|$", text, re.M)
    }
    assert table == DOCUMENTED


def _options(command: click.Command) -> list[str]:
    return [opt for param in command.params for opt in param.opts]


def test_every_option_has_help_and_every_argument_is_named_in_its_docstring() -> None:
    undocumented = []
    for name, command in commands():
        for param in command.params:
            if isinstance(param, click.Option):
                if not param.help and param.name not in ("help", "version"):
                    undocumented.append(f"kiln {name} {param.opts[-1]}")
            elif str(param.name).upper() not in (command.help or ""):
                undocumented.append(f"kiln {name} {str(param.name).upper()}")
    assert undocumented == []


# --- building -------------------------------------------------------------------------------


def test_build_json_says_what_it_replaced_and_where_the_cache_stood(
    source_dir: Callable[[str], Path], classifier: Path, tmp_path: Path
) -> None:
    source, cache = source_dir("hf-classifier"), tmp_path / "cache"
    fresh = tmp_path / "fresh"
    built, result = json_result(
        "build", "build", source, "-p", PROFILE, "-o", fresh, "--cache", cache
    )
    assert "replacing" not in result.stderr
    manifest = open_artifact(fresh).manifest
    assert built["artifact"] == str(fresh) and built["replaced"] is False
    assert (built["profile"], built["format"], built["runtime"]) == (PROFILE, "onnx", "onnxruntime")
    check = built["validation"]["vision_model"]
    assert check["passed"] is True
    assert 0 <= check["outputs"]["logits"]["max_abs"] <= check["tolerance"]["atol"]
    assert built["end_to_end"] is None  # the profile asks for no end-to-end check
    assert built["cache"] == {
        "location": str(cache),
        "key": manifest.build.key,
        "restored": False,
        "stored": True,
    }

    # Over an artifact (a copy of another build): said on stderr first, restored from the cache.
    earlier = copy_artifact(classifier, tmp_path / "earlier")
    created = datetime.fromisoformat(open_artifact(earlier).manifest.build.created)
    replaced, result = json_result(
        "build", "build", source, "-p", PROFILE, "-o", earlier, "--cache", cache
    )
    when = created.strftime("%Y-%m-%d %H:%M UTC")
    assert result.stderr.splitlines()[0] == (
        f"replacing the artifact at {earlier} ({PROFILE}, built {when})"
    )
    assert replaced["replaced"] is True and replaced["artifact"] == str(earlier)
    assert replaced["cache"]["restored"] is True and replaced["cache"]["stored"] is False
    assert open_artifact(earlier).manifest.build.key == manifest.build.key

    matrix = tmp_path / "matrix.toml"
    matrix.write_text(
        f'schema_version = 1\nsources = ["{source}"]\nprofiles = ["{PROFILE}"]\n'
        '[build]\noutput = "built"\n',
        encoding="utf-8",
    )
    grid = kiln_json("build --matrix", "build", "--matrix", matrix, "--cache", cache)
    ((only,),) = [grid["artifacts"]]
    assert Path(only["artifact"]) == tmp_path / "built" / source.name / PROFILE
    assert PROFILE in only["label"]

    listed = kiln_json("cache list", "cache", "list", "--cache", cache)
    ((entry,),) = [listed["entries"]]
    assert entry["key"] == manifest.build.key and entry["profile"] == PROFILE
    assert listed["size_bytes"] == entry["size_bytes"] > 0
    pruned = kiln_json("cache prune", "cache", "prune", "--all", "--cache", cache)
    assert pruned["removed"] == [entry] and pruned["freed_bytes"] == entry["size_bytes"]
    assert kiln_json("cache list", "cache", "list", "--cache", cache)["entries"] == []


def test_a_failed_build_leaves_the_artifact_it_would_replace(
    source_dir: Callable[[str], Path],
    classifier: Path,
    tmp_path: Path,
    kiln_main: Callable[..., Outcome],
) -> None:
    earlier = copy_artifact(classifier, tmp_path / "earlier")
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    # No export matches torch to 1e-12: the validation fails after the export was written.
    outcome = kiln_main(
        "build", source_dir("hf-classifier"), "-p", PROFILE, "-o", earlier,
        "--set", "validation.atol=1e-12", "--json",
    )  # fmt: skip
    assert outcome.code == 2, outcome.err
    assert outcome.out == ""  # no document for a build that did not happen
    assert outcome.err_lines[0].startswith(f"replacing the artifact at {earlier} ({PROFILE}")
    assert outcome.err_lines[-1].startswith("error: ")
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier"]  # no staging left
    assert kiln_json("verify", "verify", earlier)["passed"] is True


def test_a_folder_that_is_not_an_artifact_is_not_announced(
    source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own file")
    result = invoke("build", source_dir("hf-classifier"), "-p", PROFILE, "-o", mine, "--json")
    assert result.exit_code == 1  # the build refuses the user's folder, as before
    assert "replacing" not in result.stderr and result.stdout == ""
    assert (mine / "notes.txt").read_text() == "the user's own file"


@pytest.mark.torch
def test_convert_json(source_dir: Callable[[str], Path], tmp_path: Path) -> None:
    single = tmp_path / "tiny.safetensors"
    converted = kiln_json("convert", "convert", source_dir("sd"), single)
    assert converted == {"source": str(source_dir("sd")), "files": [str(single)]}
    assert single.stat().st_size > 0


# --- profiles -------------------------------------------------------------------------------


def test_profiles_json(tmp_path: Path) -> None:
    rows = kiln_json("profiles list", "profiles", "list", "vit", "onnxruntime")
    assert PROFILE in [row["name"] for row in rows]
    shown = kiln_json("profiles show", "profiles", "show", PROFILE, "--set", "runtime.threads=2")
    assert shown["name"] == PROFILE and shown["runtime"]["threads"] == 2
    assert shown["export"]["format"] == "onnx"

    bad = tmp_path / "bad.toml"
    bad.write_text('schema_version = 2\nname = "bad"\nfamily = "vit"\n[export]\nformt = "onnx"\n')
    checked = kiln_json("profiles validate", "profiles", "validate", PROFILE, bad, code=1)
    assert checked["passed"] is False
    good, invalid = checked["profiles"]
    assert good == {"file": PROFILE, "name": PROFILE, "passed": True, "error": None}
    assert invalid["file"] == str(bad) and invalid["passed"] is False
    assert "unknown key 'export.formt'" in invalid["error"]
    assert kiln_json("profiles validate", "profiles", "validate", PROFILE)["passed"] is True

    schemes = kiln_json("profiles schemes", "profiles", "schemes")
    assert "onnx" in schemes["formats"]
    by_name = {scheme["name"]: scheme for scheme in schemes["schemes"]}
    assert by_name["int8-hybrid"]["formats"] == ["openvino"]


# --- running --------------------------------------------------------------------------------


def test_classify_and_embed_json(
    classifier: Path, built: Callable[..., Path], image_files: list[Path], tmp_path: Path
) -> None:
    classified = kiln_json("classify", "classify", classifier, *image_files, "-k", 3)
    assert [item["image"] for item in classified] == [str(p) for p in image_files]
    assert all(len(item["predictions"]) == 3 for item in classified)

    vectors = tmp_path / "vectors"  # .npy added, as np.save does
    embedded = kiln_json(
        "embed", "embed", built("hf-backbone", PROFILE), *image_files, "-o", vectors
    )
    assert embedded["files"] == [str(tmp_path / "vectors.npy")]
    assert embedded["images"] == [str(p) for p in image_files]
    assert embedded["shape"] == [3, 32] and embedded["dtype"] == "float32"
    assert embedded["normalized"] is True
    assert np.load(tmp_path / "vectors.npy").shape == (3, 32)


@pytest.mark.torch
def test_generate_json(built: Callable[..., Path], tmp_path: Path) -> None:
    artifact = built("sd", "sd-torch-fp32")
    output = tmp_path / "cube.png"
    generated = kiln_json(
        "generate", "generate", artifact, "--prompt", "a red cube", "--steps", 1,
        "--num-images", 2, "--seed", 7, "-o", output,
    )  # fmt: skip
    files = [tmp_path / "cube-0.png", tmp_path / "cube-1.png"]
    assert generated["files"] == [str(path) for path in files]
    assert all(path.is_file() for path in files)
    with load(artifact) as pipeline:
        height, width = pipeline.size
    assert (generated["width"], generated["height"]) == (width, height)
    assert generated["seed"] == 7 and generated["prompt"] == "a red cube"


# --- artifacts ------------------------------------------------------------------------------


def test_info_json_is_the_manifest(classifier: Path) -> None:
    info = kiln_json("info", "info", classifier, "--probe")
    assert {k: v for k, v in info.items() if k != "probed"} == json.loads(
        (classifier / "kiln.json").read_text()
    )
    assert info["probed"]["vision_model"]["runtime"] == "onnxruntime"


def test_verify_json(classifier: Path, tmp_path: Path) -> None:
    intact = kiln_json("verify", "verify", classifier)
    count = len(open_artifact(classifier).manifest.files)
    assert intact == {
        "artifact": str(classifier),
        "bundle": False,
        "passed": True,
        "checked": count,
        "problems": [],
    }
    damaged = copy_artifact(classifier, tmp_path / "damaged")
    model = damaged / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    found = kiln_json("verify", "verify", damaged, code=1)
    assert found["passed"] is False and found["checked"] == count
    assert found["problems"] == ["model.onnx has changed (sha256 differs from the manifest)"]


def with_pending_validation(artifact: Path, target: Path, offset: float) -> Path:
    """A copy of `artifact` whose component is left to `kiln validate`, as a Core ML build off
    macOS leaves it: the reference outputs saved (the artifact's own, shifted by `offset`)."""
    from modelkiln.artifact import sha256_file
    from modelkiln.evaluation.components import save_reference
    from modelkiln.records import seal

    copy = copy_artifact(artifact, target)
    feeds = [{"pixel_values": np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype("f4")}]
    with open_artifact(copy).session("vision_model") as session:
        expected = [{k: v + offset for k, v in session.run(feeds[0]).items()}]
    relative = save_reference(copy, "vision_model", feeds, expected)
    manifest = json.loads((copy / "kiln.json").read_text())
    validation = manifest["components"]["vision_model"]["validation"]
    validation.update(passed=None, reference=relative)
    del validation["outputs"]
    reference = copy / relative
    manifest["files"][relative] = {
        "size": reference.stat().st_size,
        "sha256": sha256_file(reference),
    }
    (copy / "kiln.json").write_text(json.dumps(seal(manifest), indent=2))
    return copy


def test_validate_json(classifier: Path, tmp_path: Path) -> None:
    done_at_build = kiln_json("validate", "validate", classifier)
    assert done_at_build == {"artifact": str(classifier), "passed": True, "components": {}}

    pending = with_pending_validation(classifier, tmp_path / "pending", offset=0.0)
    checked = kiln_json("validate", "validate", pending)
    assert checked["passed"] is True
    record = checked["components"]["vision_model"]
    assert record["passed"] is True and record["outputs"]["logits"]["max_abs"] == 0.0

    missed = with_pending_validation(classifier, tmp_path / "missed", offset=1.0)
    failed = kiln_json("validate", "validate", missed, code=1)
    assert failed["passed"] is False
    assert failed["components"]["vision_model"]["passed"] is False
    assert "vision_model" in failed["components"]["vision_model"]["error"]


def test_package_json_and_verify_the_bundle(classifier: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "vit.zip"
    packed = kiln_json("package", "package", classifier, "-t", "linux-x86_64", "-o", bundle)
    assert packed["files"] == [str(bundle)] and bundle.is_file()
    assert packed["target"] == packed["manifest"]["target"] == "linux-x86_64"
    contents = packed["manifest"]["files"]
    assert packed["size_bytes"] == sum(record["size"] for record in contents.values())
    assert "model.onnx" in contents
    checked = kiln_json("verify", "verify", bundle)
    assert checked["bundle"] is True and checked["passed"] is True
    assert checked["checked"] == len(contents)


def test_clean_json(tmp_path: Path) -> None:
    leftover = tmp_path / ".out.building-x1y2"
    leftover.mkdir()
    (leftover / "model.onnx").write_bytes(bytes(2_000_000))
    cleaned = kiln_json("clean", "clean", tmp_path)
    ((done,),) = [cleaned["directories"]]
    assert done["directory"] == str(tmp_path)
    assert [Path(path).name for path in done["removed"]] == [leftover.name]
    assert done["restored"] == [] and done["freed_bytes"] >= 2_000_000
    assert not leftover.exists()


# --- this machine ---------------------------------------------------------------------------


def test_env_and_doctor_json() -> None:
    env = kiln_json("env", "env")
    assert {r["name"]: r["available"] for r in env["runtimes"]}["onnxruntime"] is True
    checks = kiln_json("doctor", "doctor")
    assert {"run", "build", "cpu"} == {check["area"] for check in checks}


@pytest.mark.slow
@pytest.mark.torch
def test_demo_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    import modelkiln.demo

    # Two backends of the demo's four: the document is the same, the minutes fewer.
    profiles = ("vit-torch-fp32", PROFILE)
    monkeypatch.setattr(
        modelkiln.demo, "run_demo", functools.partial(modelkiln.demo.run_demo, profiles=profiles)
    )
    demo = kiln_json("demo", "demo", "-w", tmp_path, "--runs", 3)
    assert [row["profile"] for row in demo["rows"]] == list(profiles)
    assert demo["work_dir"] == str(tmp_path) and demo["test_images"] == 360
    assert all(row["agreement"] >= 99.0 and row["median_ms"] > 0 for row in demo["rows"])


# --- measuring ------------------------------------------------------------------------------


def slowed(entry: dict[str, Any], factor: float) -> dict[str, Any]:
    """The entry measured `factor` times slower."""
    latency = {
        key: [v * factor for v in value] if key == "samples" else value * factor
        for key, value in entry["latency"].items()
        if key != "runs"
    }
    return {
        **entry,
        "latency": {**entry["latency"], **latency},
        "throughput_per_s": entry["throughput_per_s"] / factor,
    }


def test_bench_and_compare_json(classifier: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    bench = kiln_json(
        "bench", "bench", classifier, "--batch-size", "1,2,4", "--warmup", 1, "--runs", 8,
        "--no-isolate", "--no-reference", "-o", out,
    )  # fmt: skip
    assert bench["report"] == str(out / "report.json")
    assert str(out / "report.json") in bench["files"]
    assert all(Path(path).is_file() and Path(path).parent == out for path in bench["files"])
    report = json.loads((out / "report.json").read_text())
    assert [e["key"] for e in bench["entries"]] == [e["key"] for e in report["entries"]]
    assert [e["batch_size"] for e in bench["entries"]] == [1, 2, 4]
    assert bench["entries"][0]["p50_s"] == report["entries"][0]["latency"]["p50_s"]
    assert all(entry["accuracy"] is None for entry in bench["entries"])

    same = kiln_json("compare", "compare", out / "report.json", out / "report.json")
    assert same["passed"] is True and same["failed"] is False
    assert same["verdict"].startswith("passed") and same["new"] == same["missing"] == []
    assert {row["status"] for row in same["rows"]} == {"ok"}
    assert len(same["rows"]) == 3 * 3  # latency, throughput, peak RSS of each entry
    assert same["files"] == []

    # The baseline without b4, the current without b2 and three times slower at b1.
    b1, b2, b4 = report["entries"]
    baseline, current = tmp_path / "baseline.json", tmp_path / "current.json"
    baseline.write_text(json.dumps({**report, "entries": [b1, b2]}))
    current.write_text(json.dumps({**report, "entries": [slowed(b1, 3.0), b4]}))
    junit, plot = tmp_path / "junit.xml", tmp_path / "moved.png"
    gate = kiln_json(
        "compare", "compare", baseline, current, "--junit", junit, "--plot", plot, code=1
    )
    assert gate["passed"] is False and gate["failed"] is True
    assert gate["verdict"].startswith("FAILED")
    latency = next(r for r in gate["rows"] if r["key"] == b1["key"] and r["unit"] == "s")
    assert latency["status"] == "regressed"
    assert latency["change"] == pytest.approx(2.0)  # +200 %
    assert latency["bound"] == pytest.approx(0.10)
    assert [item["key"] for item in gate["missing"]] == [b2["key"]]
    assert [item["key"] for item in gate["new"]] == [b4["key"]]
    assert gate["files"] == [str(junit), str(plot)] and junit.is_file()
    assert plot.read_bytes().startswith(b"\x89PNG")  # the before/after picture of b1
    wrong = invoke("compare", baseline, current, "--plot", tmp_path / "moved.jpg")
    assert wrong.exit_code == 2 and "the plot is a PNG; name it *.png" in wrong.output


def test_ci_init_json(tmp_path: Path) -> None:
    output = tmp_path / "gate.yml"
    written = kiln_json(
        "ci init", "ci", "init", "--source", "models/vit", "-p", PROFILE,
        "--baseline", "s3://bucket/base", "--cache", "s3://bucket/cache", "-o", output,
    )  # fmt: skip
    assert written == {"provider": "github", "files": [str(output)]}
    assert "kiln compare" in output.read_text()


def test_json_holds_no_infinity() -> None:
    """Identical outputs have an infinite SQNR: null in the document, as kiln.json writes it."""
    from click.testing import CliRunner

    from modelkiln.cli.jsonout import emit_json

    @click.command()
    def scores() -> None:
        emit_json({"sqnr_db": float("inf"), "runs": [float("nan"), 1.5], "at": Path("a/b")})

    printed = CliRunner().invoke(scores).stdout
    assert json.loads(printed) == {"sqnr_db": None, "runs": [None, 1.5], "at": "a/b"}
    assert "Infinity" not in printed and "NaN" not in printed
