"""Registry completeness: every registered name imports, and the pieces fit together."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from modelkiln.errors import UnsupportedError
from modelkiln.exporters import EXPORTERS, Exporter
from modelkiln.loading import PIPELINES
from modelkiln.models import FAMILIES, ModelFamily
from modelkiln.profiles import bundled_profile_names, load_profile
from modelkiln.registry import Registry
from modelkiln.runtimes import RUNTIMES, Runtime

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("registry", "base"),
    [(EXPORTERS, Exporter), (RUNTIMES, Runtime), (FAMILIES, ModelFamily)],
    ids=["exporters", "runtimes", "families"],
)
def test_every_entry_imports_and_has_the_right_type(registry: Registry, base: type) -> None:
    for name in registry:
        entry = registry.get(name)
        assert issubclass(entry, base), name


def test_every_task_has_a_pipeline_with_that_task() -> None:
    for task in PIPELINES:
        assert PIPELINES.get(task).task == task


def test_registry_names_match_their_classes() -> None:
    for name in EXPORTERS:
        assert EXPORTERS.get(name).format == name
    for name in RUNTIMES:
        assert RUNTIMES.get(name).name == name
    for name in FAMILIES:
        assert FAMILIES.get(name).name == name


def test_every_format_has_a_default_runtime_that_runs_it() -> None:
    for name in EXPORTERS:
        runtime = EXPORTERS.get(name).default_runtime
        assert name in RUNTIMES.get(runtime).formats


def test_every_runtime_format_has_an_exporter() -> None:
    for name in RUNTIMES:
        assert set(RUNTIMES.get(name).formats) <= set(EXPORTERS.names())


def test_one_vocabulary_runtime_names_are_extras_and_markers() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    markers = {m.split(":")[0] for m in pyproject["tool"]["pytest"]["ini_options"]["markers"]}
    for name in RUNTIMES:
        assert RUNTIMES.get(name).extra == name
        assert name in extras, f"no pip extra '{name}'"
        assert name in markers, f"no pytest marker '{name}'"


def test_every_family_has_a_bundled_profile_and_tests() -> None:
    families = {load_profile(name).family for name in bundled_profile_names()}
    assert set(FAMILIES.names()) <= families
    for name in FAMILIES:
        assert (ROOT / "tests" / "models" / f"test_{name}.py").is_file(), name


def test_unknown_names_list_known_ones_with_a_suggestion() -> None:
    with pytest.raises(
        UnsupportedError,
        match=r"unknown runtime 'openvion' \(did you mean 'openvino'\?\); known: coreml, onnxruntime, openvino, tensorrt, torch",
    ):
        RUNTIMES.get("openvion")


def test_register_adds_and_refuses_conflicts() -> None:
    registry: Registry[object] = Registry("thing", {"a": "json:dumps"})
    registry.register("b", "json:loads")
    assert registry.names() == ["a", "b"]
    import json

    assert registry.get("b") is json.loads
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a", "json:loads")
