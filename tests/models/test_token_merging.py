"""Token merging (ToMe) in ViT classification exports: the merge itself, the exports on
every CPU backend against the merged torch module, and its cost against the unmerged model
on the digits set."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from modelkiln import build, digits, load, open_artifact
from modelkiln.errors import UnsupportedError

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def test_the_most_similar_pairs_merge_into_their_size_weighted_mean() -> None:
    from modelkiln.models.token_merging import merge_tokens

    # A class token, then patches alternating between sets A (even) and B (odd): A0 ~ B0,
    # A1 ~ B1 (both nearly parallel), A2 unlike anything.
    cls = [9.0, 9.0]
    a0, b0, a1, b1, a2, b2 = [1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [-1.0, -1.0], [-5, 3]
    hidden = torch.tensor([[cls, a0, b0, a1, b1, a2, b2]])
    sizes = torch.tensor([[[1.0], [1.0], [3.0], [1.0], [1.0], [1.0], [1.0]]])
    merged, counts = merge_tokens(hidden, sizes, r=2, prefix=1)
    assert merged.shape == (1, 5, 2) and counts.shape == (1, 5, 1)
    # the class token kept; A2 unmatched; B0 took A0 (weights 1 and 3), B1 took A1
    np.testing.assert_allclose(merged[0, 0], cls)
    np.testing.assert_allclose(merged[0, 1], a2)
    np.testing.assert_allclose(merged[0, 2], (np.array(a0) * 1 + np.array(b0) * 3) / 4)
    np.testing.assert_allclose(merged[0, 3], (np.array(a1) + np.array(b1)) / 2)
    np.testing.assert_allclose(merged[0, 4], b2)
    assert counts[0, :, 0].tolist() == [1.0, 1.0, 4.0, 2.0, 1.0]
    # The patches' total, weighted by size, is what it was: merging only averages.
    before = (hidden * sizes)[:, 1:].sum(1)
    np.testing.assert_allclose((merged * counts)[:, 1:].sum(1), before, rtol=1e-6)
    # r is capped at half the patch tokens; r = 0 merges nothing
    assert merge_tokens(hidden, sizes, r=10, prefix=1)[0].shape == (1, 4, 2)
    assert merge_tokens(hidden, sizes, r=0, prefix=1)[0] is hidden


@pytest.mark.parametrize(
    "profile",
    [
        pytest.param("vit-onnxruntime-fp32", marks=pytest.mark.onnxruntime),
        pytest.param("vit-openvino-fp32", marks=pytest.mark.openvino),
        pytest.param("vit-executorch-fp32", marks=pytest.mark.executorch),
    ],
)
def test_merged_exports_match_the_merged_module_and_are_gated_against_the_unmerged(
    profile: str, built: Callable[..., Path], rgb_images: list[np.ndarray]
) -> None:
    artifact = built("hf-classifier", profile, "model.token_merging=3")
    manifest = open_artifact(artifact).manifest
    assert manifest.model_info["approximations"] == {"token_merging": 3}
    (record,) = manifest.components.values()
    # the export against the merged torch module: the component's own fp32 tolerance
    assert record.validation.passed
    assert record.validation.outputs["logits"].max_abs < 1e-3
    exact = built("hf-classifier", profile)
    with load(artifact) as merged, load(exact) as unmerged:
        pixels = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
        ours = merged.session.run({"pixel_values": pixels})["logits"]
        theirs = unmerged.session.run({"pixel_values": pixels})["logits"]
        assert ours.shape == theirs.shape
        assert not np.allclose(ours, theirs, atol=1e-4)  # fewer tokens: other numbers
        assert len(merged(rgb_images)) == len(rgb_images)


@pytest.mark.slow
@pytest.mark.onnxruntime
def test_merging_costs_little_on_the_digits_vit_and_the_gate_says_how_much(
    tmp_path: Path,
) -> None:
    model = digits.trained_model()
    # The gate on accuracy: merged logits move (cosine ~0.9), the predicted digit rarely.
    bounds = ["validation.min_cosine=0.5", "validation.min_top1_agreement=0.9"]
    gate = ['validation.data="digits"', "validation.max_accuracy_drop=3", *bounds]
    exact = build(model, "vit-onnxruntime-fp32", tmp_path / "exact", overrides=gate)
    merged = build(
        model,
        "vit-onnxruntime-fp32",
        tmp_path / "merged",
        overrides=[*gate, "model.token_merging=8"],
    )
    reference = open_artifact(exact).manifest.end_to_end
    record = open_artifact(merged).manifest.end_to_end
    assert reference is not None and record is not None
    # 64 patches -> 32 after four blocks; measured against the unmerged torch model
    assert reference.accuracy_drop == 0.0 and reference.accuracy is not None
    assert record.accuracy_drop is not None and 0.0 <= record.accuracy_drop <= 3.0
    agreement = record.outputs["logits"].top1_agreement
    assert agreement is not None and 0.95 <= agreement < 1.0
    from modelkiln.errors import ValidationError

    # r = 32 halves the patches in every block (64 -> 4): 0.8 points lost here
    with pytest.raises(
        ValidationError, match=r"top-1 .*max_accuracy_drop.*lower model\.token_merging"
    ):
        build(
            model,
            "vit-onnxruntime-fp32",
            tmp_path / "too-much",
            overrides=[
                'validation.data="digits"',
                "validation.max_accuracy_drop=0.5",
                *bounds,
                "model.token_merging=32",
            ],
        )


def test_token_merging_is_refused_where_it_does_not_apply(
    source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    with pytest.raises(UnsupportedError, match=r"model\.token_merging does not apply to sd models"):
        build(
            source_dir("sd"), "sd-torch-fp32", tmp_path / "sd", overrides=["model.token_merging=4"]
        )
    with pytest.raises(UnsupportedError, match="applies to image classification"):
        build(
            source_dir("hf-classifier"),
            "vit-onnxruntime-fp32",
            tmp_path / "features",
            overrides=["model.token_merging=4", 'model.task="image-feature-extraction"'],
        )


@pytest.mark.onnxruntime
def test_fp16_exports_merge_in_fp32_and_a_kernel_onnxruntime_lacks_is_one_clear_error(
    built: Callable[..., Path], tmp_path: Path
) -> None:
    import onnx
    from onnx import TensorProto, helper

    from modelkiln.runtimes.base import RuntimeOptions
    from modelkiln.runtimes.onnxruntime import OnnxRuntime
    from modelkiln.specs import TensorSpec

    # ONNX Runtime's CPU ScatterElements has no fp16 reduction: the fp16 conversion keeps it
    # (and the merge's sums) in fp32.
    artifact = built("hf-classifier", "vit-onnxruntime-fp16", "model.token_merging=3")
    (record,) = open_artifact(artifact).manifest.components.values()
    assert record.validation.passed
    # Had it not, running the model would have been this error, not a raw ONNX Runtime one.
    data = helper.make_tensor_value_info("data", TensorProto.FLOAT16, [2, 2])
    graph = helper.make_graph(
        [
            helper.make_node(
                "ScatterElements", ["data", "index", "data"], ["out"], axis=0, reduction="add"
            )
        ],
        "fp16-scatter",
        [data],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT16, [2, 2])],
        [helper.make_tensor("index", TensorProto.INT64, [2, 2], [0, 0, 1, 1])],
    )
    path = tmp_path / "scatter.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    spec = {"data": TensorSpec("float16", (2, 2))}
    session = OnnxRuntime().open(
        path, "scatter", spec, {"out": TensorSpec("float16", (2, 2))}, RuntimeOptions()
    )
    with pytest.raises(UnsupportedError, match=r"scatter: ONNX Runtime cannot run this model: "):
        session.run({"data": np.ones((2, 2), np.float16)})
