"""ONNX Runtime's fused attention/GELU ops in the exports that ONNX Runtime runs on the CPU."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from modelkiln import load, open_artifact
from modelkiln.exporters.onnx_fusions import fusions_wanted
from modelkiln.plan import load_profile

pytestmark = [pytest.mark.torch, pytest.mark.onnxruntime]

# What torch's dynamo exporter writes for GELU and attention, and the fusions replace.
UNFUSED_OPS = ("Erf", "Softmax")


def _ops(artifact: Path) -> Counter[str]:
    import onnx

    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
    return Counter(node.op_type for node in graph.node)


@pytest.mark.parametrize(
    ("source", "fused"),
    [
        ("hf-classifier", {"Attention": 2, "Gelu": 2}),
        # timm projects Q, K and V with one Linear: its attention becomes MultiHeadAttention.
        ("timm-classifier", {"MultiHeadAttention": 2, "Gelu": 2}),
    ],
)
def test_onnxruntime_exports_are_fused_and_match_the_unfused_graph(
    built: Callable[..., Path], source: str, fused: dict[str, int], rgb_images: list[np.ndarray]
) -> None:
    artifact = built(source, "vit-onnxruntime-fp32")
    plain = built(source, "vit-onnxruntime-fp32", "onnxruntime.fusions=none")

    ops, plain_ops = _ops(artifact), _ops(plain)
    assert {op: ops[op] for op in fused} == fused
    assert not any(ops[op] for op in UNFUSED_OPS)
    assert all(plain_ops[op] for op in UNFUSED_OPS) and not any(plain_ops[op] for op in fused)
    (record,) = open_artifact(artifact).manifest.components.values()
    assert record.runtime["fused_ops"] == fused
    assert record.validation.passed
    (plain_record,) = open_artifact(plain).manifest.components.values()
    assert plain_record.runtime["fused_ops"] == {}

    with load(artifact) as fused_model, load(plain) as plain_model:
        pixels = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
        ours = fused_model.session.run({"pixel_values": pixels})["logits"]
        theirs = plain_model.session.run({"pixel_values": pixels})["logits"]
        np.testing.assert_allclose(ours, theirs, atol=2e-5)
        assert [p[0].index for p in fused_model(rgb_images)] == [
            p[0].index for p in plain_model(rgb_images)
        ]


@pytest.mark.parametrize(
    ("profile", "overrides", "wanted"),
    [
        ("vit-onnxruntime-fp32", (), True),
        ("vit-onnxruntime-int8", (), True),  # QAttention: int8 Q/K/V inside the attention
        ("vit-onnxruntime-fp32", ("onnxruntime.fusions=none",), False),
        ("vit-onnxruntime-fp16", (), False),  # the fused CPU kernels are fp32
        ("vit-onnxruntime-int8-static", (), False),  # QDQ quantizes MatMuls, not Attention
        ("vit-onnxruntime-int4", (), False),
        ("vit-onnxruntime-nf4", (), False),
        ("vit-openvino-fp32", ("openvino.via=onnx",), False),  # other readers lack the ops
        ("vit-onnxruntime-fp32", ("runtime.device=cuda",), False),
    ],
)
def test_which_profiles_fuse(profile: str, overrides: tuple[str, ...], wanted: bool) -> None:
    assert fusions_wanted(load_profile(profile, overrides)) is wanted


def test_a_failing_fusion_fails_the_build_and_names_the_way_out(
    source_dir: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelkiln import build
    from modelkiln.errors import ExportError
    from modelkiln.exporters import onnx_fusions

    def broken(model: object) -> int:
        raise ValueError("pattern matcher exploded")

    monkeypatch.setattr(onnx_fusions, "_fusions", lambda: (broken,))
    target = tmp_path / "artifact"
    with pytest.raises(
        ExportError, match=r"pattern matcher exploded.*\[onnxruntime\] fusions = 'none'"
    ):
        build(source_dir("hf-classifier"), "vit-onnxruntime-fp32", target)
    assert not target.exists()
    plain = build(
        source_dir("hf-classifier"),
        "vit-onnxruntime-fp32",
        target,
        overrides=["onnxruntime.fusions=none"],
    )
    (record,) = open_artifact(plain).manifest.components.values()
    assert record.runtime["fused_ops"] == {}
