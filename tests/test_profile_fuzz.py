"""The profile parser under fuzzing: whatever the bytes, keys, values or --set overrides, it
either returns a profile (whose TOML reads back to the same profile) or raises one of the
project's errors, never a bare TypeError, UnicodeDecodeError or RecursionError."""

from __future__ import annotations

import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelkiln.errors import KilnError
from modelkiln.plan import load_plan
from modelkiln.profiles import Profile, bundled_profile_names, read_profile

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BASES = sorted(bundled_profile_names())


def keys_of(data: dict[str, Any], prefix: str = "") -> set[str]:
    found = set()
    for key, value in data.items():
        found.add(prefix + key)
        if isinstance(value, dict):
            found |= keys_of(value, f"{prefix}{key}.")
    return found


# Names the schema knows, so that mutations land in the sections and keys that are checked.
SCHEMA_KEYS = sorted(set().union(*(keys_of(read_profile(name).to_dict()) for name in BASES)))

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["fp32", "fp16", "bf16", "int8", "onnx", "openvino", "auto", "none", ""]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        child = data.get(part)
        if not isinstance(child, dict):
            child = data[part] = {}
        data = child
    data[last] = value


def expect_profile_or_kiln_error(action: Any) -> Profile | None:
    try:
        return action()
    except KilnError:
        return None


def assert_reads_back(profile: Profile) -> None:
    assert Profile.from_dict(tomllib.loads(profile.to_toml())) == profile


@FUZZ
@given(st.binary(max_size=3000))
def test_any_bytes_as_a_profile_file(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzzed.toml"
        path.write_bytes(content)
        profile = expect_profile_or_kiln_error(lambda: read_profile(path))
    if profile is not None:
        assert_reads_back(profile)


@FUZZ
@given(
    st.sampled_from(BASES),
    st.lists(st.tuples(st.sampled_from(SCHEMA_KEYS) | st.text(max_size=12), values), max_size=4),
)
def test_mutated_bundled_profiles(base: str, mutations: list[tuple[str, Any]]) -> None:
    data = read_profile(base).to_dict()
    for dotted, value in mutations:
        set_path(data, dotted, value)
    profile = expect_profile_or_kiln_error(lambda: Profile.from_dict(data))
    if profile is not None:
        assert_reads_back(profile)
        expect_profile_or_kiln_error(lambda: load_plan(profile))


@FUZZ
@given(
    st.sampled_from(BASES),
    st.lists(
        st.tuples(st.sampled_from(SCHEMA_KEYS) | st.text(max_size=12), st.text(max_size=24)).map(
            lambda pair: f"{pair[0]}={pair[1]}"
        )
        | st.text(max_size=30),
        max_size=4,
    ),
)
def test_any_set_overrides(base: str, overrides: list[str]) -> None:
    plan = expect_profile_or_kiln_error(lambda: load_plan(base, overrides))
    if plan is not None:
        assert_reads_back(plan.profile)


@pytest.mark.parametrize("base", BASES)
def test_every_bundled_profile_reads_back(base: str) -> None:
    assert_reads_back(read_profile(base))
