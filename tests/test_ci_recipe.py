"""kiln ci init: the written job is valid YAML, every kiln command in it parses with our CLI,
and its baseline step really fetches an artifact."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from cli_support import invoke, parse_command_line

from modelkiln.ci_recipe import Recipe


def _steps(path: Path, provider: str) -> list[str]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    if provider == "github":
        steps = document["jobs"]["gate"]["steps"]
        assert document[True] == ["pull_request"]  # YAML 1.1 reads the key `on` as True
        return [step["run"] for step in steps if "run" in step]
    job = document["kiln-gate"]
    assert job["artifacts"]["reports"]["junit"] == "gate.xml"
    return list(job["script"])


@pytest.mark.parametrize("provider", ["github", "gitlab"])
def test_the_written_job_runs_commands_our_cli_accepts(
    provider: str, built: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    artifact = built("hf-classifier", "vit-onnxruntime-fp32")
    arguments = [
        "ci", "init", "--provider", provider, "--source", "models/my vit",
        "-p", "vit-openvino-int8", "--baseline", f"file://{artifact}",
        "--cache", "s3://ci/kiln", "--batch-size", "1,4",
    ]  # fmt: skip
    written = invoke(*arguments)
    assert written.exit_code == 0, written.output
    target = tmp_path / (
        ".github/workflows/kiln-gate.yml" if provider == "github" else ".gitlab-ci.yml"
    )
    steps = _steps(target, provider)
    assert steps[0] == "pip install 'modelkiln[bench,openvino-build]' s3fs"
    kiln_steps = [shlex.split(step) for step in steps if step.startswith("kiln ")]
    assert [words[1] for words in kiln_steps] == ["build", "compare"]
    assert kiln_steps[0][2] == "models/my vit"  # quoted for the shell
    assert "--rerun" in kiln_steps[1] and "1,4" in kiln_steps[1]
    for words in kiln_steps:
        parse_command_line(words)  # unknown options would raise here

    # The baseline step, run as the job would: the artifact lands in baseline/.
    fetch = next(step for step in steps if step.startswith("python -c"))
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the job's python
    subprocess.run(fetch, shell=True, check=True, cwd=tmp_path, env={**os.environ, "PATH": path})
    assert (tmp_path / "baseline" / "kiln.json").read_bytes() == (
        artifact / "kiln.json"
    ).read_bytes()

    again = invoke(*arguments)
    assert again.exit_code == 1 and "exists; add --force" in str(again.exception)
    assert invoke(*arguments, "--force").exit_code == 0


def test_the_install_line_follows_the_format_and_the_stores() -> None:
    local = Recipe("m", "vit-onnxruntime-int8", "release/vit", "/mnt/cache")
    assert local.install() == "pip install 'modelkiln[bench,onnx]'"
    assert local.steps()[2] == "cp -r release/vit baseline"
    remote = Recipe("m", "sd-coreml-fp16", "gs://r/sd", "az://c/kiln", package="modelkiln @ x")
    assert remote.install() == "pip install 'modelkiln[bench,coreml-build] @ x' adlfs gcsfs"
