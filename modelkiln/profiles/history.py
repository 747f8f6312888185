"""The profile schema's history: how a schema_version 1 document reads in version 2.

Frozen: a new backend or scheme never edits this. Old profile files and the profiles recorded
in old kiln.json files pass through `upgrade` when they are read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SCHEMA_VERSION = 2


# Keys schema_version 1 kept in generic sections that belong to one backend's section since 2,
# and their values then: the upgrade moves what differs and drops the rest. Frozen history: a
# new backend never edits this.
MOVED_IN_V2: dict[str, tuple[str, Any]] = {
    "export.via": ("openvino.via", "torch"),
    "export.fusions": ("onnxruntime.fusions", "auto"),
    "runtime.performance_hint": ("openvino.performance_hint", None),
    "runtime.graph_optimization": ("onnxruntime.graph_optimization", "all"),
}
# schema_version 1's [quantization] keys and defaults (one flat table for every scheme), and
# the backend sections it wrote in full into every kiln.json.
V1_QUANTIZATION = {
    "symmetric": False,
    "group_size": 128,
    "ratio": 1.0,
    "per_channel": False,
    "method": "minmax",
    "model_type": "transformer",
    "palettization": "kmeans",
}
V1_SECTIONS: dict[str, dict[str, Any]] = {
    "coreml": {"target": "iOS17", "compute_units": "all", "flexible_shapes": "enumerated"},
    "tensorrt": {"optimization_level": 3, "timing_cache": True, "engine_cache": True},
}


def upgrade(data: Mapping[str, Any], origin: str = "profile") -> dict[str, Any]:
    """A profile document in the current schema: version 1 (profile files, and the profiles
    recorded in old kiln.json files) is rewritten; version 2 is returned as is."""
    if data.get("schema_version") != 1:
        return dict(data)
    upgraded: dict[str, Any] = {
        k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()
    }
    upgraded["schema_version"] = SCHEMA_VERSION
    for old, (new, default) in MOVED_IN_V2.items():
        old_section, old_key = old.split(".")
        section = upgraded.get(old_section)
        if not isinstance(section, dict) or old_key not in section:
            continue
        value = section.pop(old_key)
        if value != default:
            new_section, new_key = new.split(".")
            upgraded.setdefault(new_section, {})[new_key] = value
    quantization = upgraded.get("quantization")
    if isinstance(quantization, dict):
        for key, default in V1_QUANTIZATION.items():
            if quantization.get(key, default) == default:
                quantization.pop(key, None)
    for name, defaults in V1_SECTIONS.items():
        section = upgraded.get(name)
        if isinstance(section, dict):
            for key, default in defaults.items():
                if section.get(key, default) == default:
                    section.pop(key, None)
            if not section:
                upgraded.pop(name)
    return upgraded
