"""ONNX Runtime's fused attention/GELU ops in the exports that ONNX Runtime runs on the CPU."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from modelkiln import load, open_artifact
from modelkiln.exporters.onnx_fusions import ATTENTION, MULTI_HEAD, fusions_wanted
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
        ("vit-onnxruntime-fp32", (), ATTENTION),
        ("vit-onnxruntime-int8", (), ATTENTION),  # QAttention: int8 Q/K/V inside the attention
        ("vit-onnxruntime-fp32", ("onnxruntime.fusions=none",), None),
        ("vit-onnxruntime-fp16", (), None),  # the fused CPU kernels are fp32
        # QDQ quantizes MatMuls, not Attention: the projections stay MatMuls
        ("vit-onnxruntime-int8-static", (), MULTI_HEAD),
        ("vit-onnxruntime-int4", (), None),
        ("vit-onnxruntime-nf4", (), None),
        ("vit-openvino-fp32", ("openvino.via=onnx",), None),  # other readers lack the ops
        ("vit-onnxruntime-fp32", ("runtime.device=cuda",), None),
    ],
)
def test_which_profiles_fuse(profile: str, overrides: tuple[str, ...], wanted: str | None) -> None:
    assert fusions_wanted(load_profile(profile, overrides)) == wanted


def test_static_int8_fuses_the_attention_core_and_quantizes_its_projections(
    built: Callable[..., Path], rgb_images: list[np.ndarray]
) -> None:
    calibrated = 'calibration.data="digits"'
    artifact = built("hf-classifier", "vit-onnxruntime-int8-static", calibrated)
    plain = built(
        "hf-classifier", "vit-onnxruntime-int8-static", calibrated, "onnxruntime.fusions=none"
    )
    ops, plain_ops = _ops(artifact), _ops(plain)
    assert (ops["MultiHeadAttention"], ops["Gelu"], ops["Attention"]) == (2, 2, 0)
    assert not any(ops[op] for op in UNFUSED_OPS)
    # The same int8 weights and activations: each layer's two score/value MatMuls (never
    # quantized) moved into MultiHeadAttention, the projections stayed for the quantizer.
    assert ops["DequantizeLinear"] == plain_ops["DequantizeLinear"] > 0
    assert ops["QuantizeLinear"] == plain_ops["QuantizeLinear"] > 0
    assert ops["MatMul"] == plain_ops["MatMul"] - 2 * 2
    (record,) = open_artifact(artifact).manifest.components.values()
    assert record.runtime["fused_ops"] == {"Gelu": 2, "MultiHeadAttention": 2}
    with load(artifact) as fused_model, load(plain) as plain_model:
        pixels = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
        ours = fused_model.session.run({"pixel_values": pixels})["logits"]
        theirs = plain_model.session.run({"pixel_values": pixels})["logits"]
        cosine = (ours * theirs).sum() / np.linalg.norm(ours) / np.linalg.norm(theirs)
        assert cosine > 0.9999
        assert [p[0].index for p in fused_model(rgb_images)] == [
            p[0].index for p in plain_model(rgb_images)
        ]


def test_a_failing_fusion_fails_the_build_and_names_the_way_out(
    source_dir: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelkiln import build
    from modelkiln.errors import ExportError
    from modelkiln.exporters import onnx_fusions

    def broken(model: object) -> int:
        raise ValueError("pattern matcher exploded")

    monkeypatch.setattr(onnx_fusions, "_fusions", lambda pack_projections: (broken,))
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


@pytest.mark.openvino
def test_openvino_refuses_onnxruntimes_qattention_and_runs_the_unfused_int8_graph(
    built: Callable[..., Path], rgb_images: list[np.ndarray]
) -> None:
    from modelkiln.errors import UnsupportedError

    fused = built("hf-classifier", "vit-onnxruntime-int8")
    with pytest.raises(
        UnsupportedError,
        match=r"no conversion for com\.microsoft\.QAttention .*run it on onnxruntime, or build "
        r"with \[onnxruntime\] fusions = 'none'$",
    ):
        load(fused, runtime="openvino")
    plain = built("hf-classifier", "vit-onnxruntime-int8", "onnxruntime.fusions=none")
    with load(plain, runtime="openvino") as openvino, load(plain) as onnxruntime:
        # Both run the same int8 graph (DynamicQuantizeLinear, MatMulInteger): same classes.
        assert [p[0].index for p in openvino(rgb_images)] == [
            p[0].index for p in onnxruntime(rgb_images)
        ]
