"""kiln doctor: extras read from our own metadata, missing pieces with their pip line."""

from __future__ import annotations

import json

import pytest
from cli_support import invoke

from modelkiln import doctor

DECLARED = [
    "numpy>=1.24",
    "onnxruntime>=1.19; extra == 'onnxruntime'",
    "modelkiln[onnxruntime]; extra == 'onnx'",
    "onnx>=1.17; extra == 'onnx'",
    "no-such-package-kiln>=1; extra == 'onnx'",
    'numpy>=999; extra == "bench"',
]


def test_an_extra_is_what_pyproject_declares_self_references_expanded() -> None:
    assert doctor.requirements_of("onnx", DECLARED) == [
        "onnxruntime>=1.19",
        "onnx>=1.17",
        "no-such-package-kiln>=1",
    ]
    assert doctor.missing(doctor.requirements_of("onnx", DECLARED)) == ["no-such-package-kiln>=1"]
    (numpy,) = doctor.missing(doctor.requirements_of("bench", DECLARED))
    assert numpy.startswith("numpy>=999 (found ")  # installed, at a version it excludes
    # The real metadata: the bench extra is what pyproject.toml lists.
    assert sorted(r.split(">")[0] for r in doctor.requirements_of("bench")) == [
        "jsonschema",
        "matplotlib",
        "scipy",
    ]


def test_a_missing_extra_gets_its_pip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "missing", lambda requirements: requirements[:1])
    build = {c.name: c for c in doctor.checks() if c.area == "build"}
    assert (
        not build["ray"].ok
        and build["ray"].fix == "pip install -c constraints.txt 'modelkiln[ray]'"
    )
    assert "--executor ray" in build["ray"].detail and "missing fsspec" in build["ray"].detail
    assert doctor.pip_line("openvino") == "pip install 'modelkiln[openvino]'"  # no torch in it


def test_the_cpu_says_what_bf16_and_int8_profiles_gain() -> None:
    amx = {c.name: c for c in doctor.cpu_checks(["avx512f", "amx_bf16", "amx_int8"])}
    assert amx["bf16"].ok and "AMX tiles" in amx["bf16"].detail
    assert amx["int8"].ok and "AMX tiles" in amx["int8"].detail
    epyc = {c.name: c for c in doctor.cpu_checks(["avx512_vnni", "avx512_bf16"])}
    assert "AVX-512 BF16" in epyc["bf16"].detail and "VNNI" in epyc["int8"].detail
    old = {c.name: c for c in doctor.cpu_checks(["avx2"])}
    assert not old["bf16"].ok and old["bf16"].fix == "prefer fp32 or int8 profiles on this CPU"
    assert not old["int8"].ok


def test_the_cli_prints_every_check_and_json_carries_the_fields() -> None:
    result = invoke("doctor", "--json")
    assert result.exit_code == 0, result.output
    checks = json.loads(result.output)
    assert {c["area"] for c in checks} == {"run", "build", "cpu"}
    assert all(set(c) == {"area", "name", "ok", "detail", "fix"} for c in checks)
    by_name = {c["name"]: c for c in checks if c["area"] == "run"}
    assert by_name["onnxruntime"]["ok"]  # the test environment has it
    if not by_name["tensorrt"]["ok"]:
        assert by_name["tensorrt"]["fix"].endswith("'modelkiln[tensorrt]'")
        assert "NVIDIA CUDA GPU" in by_name["tensorrt"]["detail"]
    table = invoke("doctor")
    assert table.exit_code == 0
    assert f"of {len(checks)} checks pass" in table.output
