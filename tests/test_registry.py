"""Registry completeness: every registered name imports, and the pieces fit together."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from modelkiln.backends import BACKENDS, Backend, BackendSettings, format_owner, formats
from modelkiln.errors import UnsupportedError
from modelkiln.exporters import Exporter, exporter_for
from modelkiln.models import FAMILIES, ModelFamily
from modelkiln.pipelines.base import Pipeline
from modelkiln.plan import load_profile
from modelkiln.profiles import bundled_profile_names
from modelkiln.quantize import SCHEMES, SchemeConfig, support
from modelkiln.registry import Registry
from modelkiln.runtimes import Runtime, runtime_named

ROOT = Path(__file__).resolve().parents[1]


def test_every_backend_names_its_runtime_exporters_and_settings() -> None:
    for name in BACKENDS:
        backend = BACKENDS.get(name)
        assert issubclass(backend, Backend) and backend.name == name
        runtime = backend.runtime_class()
        assert issubclass(runtime, Runtime) and runtime.name == name
        assert issubclass(backend.settings, BackendSettings)
        assert backend.settings.section in ("", name), "a backend's section is named after it"
        for format in backend.exporters:
            exporter = backend.exporter_class(format)
            assert issubclass(exporter, Exporter)
            assert exporter.format == format and exporter.backend == name


def test_every_format_has_one_owner_whose_runtime_runs_it() -> None:
    assert formats() == ["onnx", "openvino", "coreml", "tensorrt", "torch", "executorch"]
    assert len(set(formats())) == len(formats())
    for format in formats():
        owner = format_owner(format)
        assert format in owner.runtime_class().formats
        assert exporter_for(format).format == format


def test_every_runtime_format_has_an_exporter() -> None:
    for name in BACKENDS:
        assert set(runtime_named(name).formats) <= set(formats())


def test_every_family_names_pipelines_that_import() -> None:
    for name in FAMILIES:
        family = FAMILIES.get(name)
        assert issubclass(family, ModelFamily) and family.name == name
        for task in family.tasks:
            pipeline = family.pipeline_for(task)
            assert pipeline in family.pipelines
            assert issubclass(family.pipeline_class(pipeline), Pipeline)
        assert set(family.usage) <= set(family.tasks)


def test_every_scheme_has_a_config_and_some_handler() -> None:
    handled = {scheme for handlers in support().values() for scheme in handlers}
    for name in SCHEMES:
        config = SCHEMES.get(name)
        assert issubclass(config, SchemeConfig) and config.name == name
        assert name in handled, f"no backend handles {name}"
        config()  # a profile may name the scheme alone: every key has a default


def test_one_vocabulary_backend_names_are_extras_and_markers() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    markers = {m.split(":")[0] for m in pyproject["tool"]["pytest"]["ini_options"]["markers"]}
    for name in BACKENDS:
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
        match=r"unknown runtime 'openvion' \(did you mean 'openvino'\?\); known: coreml, executorch, onnxruntime, openvino, tensorrt, torch",
    ):
        runtime_named("openvion")
    with pytest.raises(UnsupportedError, match=r"unknown format 'onx' \(did you mean 'onnx'\?\)"):
        format_owner("onx")


def test_register_adds_objects_and_paths_refuses_conflicts_and_unregisters() -> None:
    registry: Registry[object] = Registry("thing", {"a": "json:dumps"})
    registry.register("b", "json:loads")
    marker = object()
    registry.register("c", marker)
    assert registry.names() == ["a", "b", "c"]
    import json

    assert registry.get("b") is json.loads
    assert registry.get("c") is marker
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a", "json:loads")
    registry.unregister("c")
    assert "c" not in registry
    with pytest.raises(UnsupportedError, match="unknown thing 'c'"):
        registry.get("c")
