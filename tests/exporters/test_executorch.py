"""ExecuTorch: the tiny ViT lowered to XNNPACK and run by executorch.runtime against torch,
the CLI on it, int8 through PT2E, the not-run path of Core ML- and Vulkan-partitioned
programs, a dynamic batch that the lowering must not pin, the SD programs' bounded batch, and
the profile errors. (SD and SDXL images against the torch runtime: tests/models.)"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from modelkiln import load, open_artifact
from modelkiln.errors import ExportError, InputError, ProfileError, UnsupportedError
from modelkiln.image_quality import psnr
from modelkiln.plan import load_profile

if TYPE_CHECKING:
    from cli_support import Outcome

pytestmark = [pytest.mark.torch, pytest.mark.executorch]

CALIBRATE = ('calibration.data="digits"', "calibration.size=16", "calibration.batch_size=4")


@pytest.mark.parametrize(
    ("source", "output"), [("hf-classifier", "logits"), ("hf-backbone", "pooler_output")]
)
def test_program_runs_every_batch_up_to_its_bound_like_torch(
    source: str, output: str, built: Callable[..., Path]
) -> None:
    artifact = built(source, "vit-executorch-fp32")
    manifest = open_artifact(artifact, verify=True).manifest
    (record,) = manifest.components.values()
    assert record.entry == "model.pte" and record.validation.passed
    assert record.runtime["delegate"] == "xnnpack" and record.runtime["delegated_nodes"] > 0
    delegation = json.loads((artifact / "delegation.json").read_text())
    assert delegation["partitioner"] == "xnnpack" and delegation["inference_precision"] == "f32"
    atol = load_profile("vit-executorch-fp32").validation.atol
    assert atol is not None
    with load(artifact) as pipeline, load(built(source, "vit-torch-fp32")) as reference:
        rng = np.random.default_rng(0)
        for batch in (1, 3, 32):  # 32: shapes.max_batch_size
            pixels = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
            ours = pipeline.session.run({"pixel_values": pixels})
            theirs = reference.session.run({"pixel_values": pixels})
            assert set(theirs) <= set(ours)
            assert np.abs(ours[output] - theirs[output]).max() <= atol
            if output == "logits":
                assert (ours[output].argmax(1) == theirs[output].argmax(1)).all()
        too_many = np.zeros((33, 3, 32, 32), np.float32)
        with pytest.raises(InputError, match=r"beyond the largest .*shapes\.max_batch_size"):
            pipeline.session.run({"pixel_values": too_many})


def test_classify_and_embed_through_the_cli(
    built: Callable[..., Path],
    kiln_main: Callable[..., Outcome],
    image_files: list[Path],
    tmp_path: Path,
) -> None:
    classifier = built("hf-classifier", "vit-executorch-fp32")
    outcome = kiln_main("classify", str(classifier), *map(str, image_files), "-k", "2", "--json")
    assert outcome.code == 0, outcome
    classified = json.loads(outcome.out)
    assert [len(item["predictions"]) for item in classified] == [2] * len(image_files)
    backbone = built("hf-backbone", "vit-executorch-fp32")
    vectors = tmp_path / "vectors.npy"
    outcome = kiln_main("embed", str(backbone), *map(str, image_files), "-o", str(vectors))
    assert outcome.code == 0, outcome
    assert np.load(vectors).shape == (len(image_files), 32)


def test_build_through_the_cli(
    source_dir: Callable[[str], Path], kiln_main: Callable[..., Outcome], tmp_path: Path
) -> None:
    out = tmp_path / "artifact"
    outcome = kiln_main(
        "build", str(source_dir("hf-classifier")), "--profile", "vit-executorch-fp32",
        "--output", str(out), "--set", "shapes.dynamic_batch=false",
        "--set", "validation.batch_sizes=[1]",
    )  # fmt: skip
    assert outcome.code == 0, outcome
    (record,) = open_artifact(out).manifest.components.values()
    # A static batch: the program takes exactly shapes.batch_size images.
    assert record.inputs["pixel_values"].shape == (1, 3, 32, 32)
    assert record.validation.passed


def test_int8_static_build_passes_its_gate_and_records_pt2e(built: Callable[..., Path]) -> None:
    artifact = built("hf-classifier", "vit-executorch-int8", *CALIBRATE)
    (record,) = open_artifact(artifact).manifest.components.values()
    quantization = record.quantization
    assert quantization is not None and quantization.scheme == "int8-static"
    assert quantization.quantized_weights >= 12  # 2 blocks x 6 Linear layers
    assert quantization.details["calibration_batches"] == 4
    assert quantization.bytes_after < quantization.bytes_before
    assert record.validation.passed and record.validation.inputs is not None
    assert record.runtime["inference_precision"] == "int8"
    assert record.validation.outputs["logits"].min_cosine >= 0.99
    # PT2E captured the module as the export traces it (exporters/xnnpack_rewrites.py):
    # the norms and the attention are XNNPACK's, around the int8 Linear layers.
    portable = json.loads((artifact / "delegation.json").read_text())["portable_ops"]
    assert not {"aten_native_layer_norm_default", "aten_any_dim"} & set(portable), portable


@pytest.mark.parametrize(
    ("partitioner", "delegate"), [("coreml", "CoreMLBackend"), ("vulkan", "VulkanBackend")]
)
def test_a_program_for_a_delegate_this_runtime_lacks_is_recorded_as_not_run(
    partitioner: str, delegate: str, built: Callable[..., Path]
) -> None:
    artifact = built(
        "hf-classifier", "vit-executorch-fp32", f"executorch.partitioner={partitioner}"
    )
    (record,) = open_artifact(artifact).manifest.components.values()
    validation = record.validation
    assert validation.passed is None and validation.reference is not None
    assert validation.not_run is not None and delegate in validation.not_run
    delegation = json.loads((artifact / "delegation.json").read_text())
    assert delegation["partitioner"] == partitioner and delegation["delegated_nodes"] > 0
    with pytest.raises(UnsupportedError, match=f"no {delegate}"):
        load(artifact)


def geglu() -> tuple[Any, Any]:
    """The UNet's feed-forward gate in small (`chunk` returns a list of tensors), and its
    torch.export with a batch of 1..16."""
    import torch

    class Geglu(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            value, gate = (x * 2.0).chunk(2, dim=-1)
            return value * torch.nn.functional.gelu(gate)

    batch = torch.export.Dim("batch", min=1, max=16)
    with torch.no_grad():
        program = torch.export.export(
            Geglu(), (torch.randn(2, 8),), dynamic_shapes=({0: batch},), strict=False
        )
    return Geglu(), program


def test_a_list_returning_op_keeps_the_batch_dynamic(monkeypatch: pytest.MonkeyPatch) -> None:
    """exir's IR verifier pins a symbolic batch that reaches an op returning a tensor list
    (it takes len() of the first tensor): lower() skips it for dynamic programs, and refuses
    a program whose batch was pinned anyway instead of writing one that fails at run time."""
    import executorch.exir
    import torch
    from executorch.runtime import Runtime as ETRuntime

    from modelkiln.exporters.executorch import lower, symbolic_axes

    module, program = geglu()
    assert symbolic_axes(program) == {"x[0]"}
    buffer, _ = lower(program, "xnnpack")
    method = ETRuntime.get().load_program(buffer).load_method("forward")
    for batch in (1, 5, 16):
        x = torch.randn(batch, 8)
        (out,) = method.execute([x])
        torch.testing.assert_close(out, module(x), atol=1e-5, rtol=1e-5)
    verifying = executorch.exir.EdgeCompileConfig
    monkeypatch.setattr(
        executorch.exir, "EdgeCompileConfig", lambda **_: verifying(_check_ir_validity=True)
    )
    with pytest.raises(ExportError, match=r"fixed the dynamic x\[0\] to the example's size"):
        lower(geglu()[1], "xnnpack")


def test_matmuls_on_slices_of_one_weight_are_delegated_with_their_own_weights() -> None:
    """models/geglu_split.py's projection halves: F.linear on weight[:half] and weight[half:].
    XNNPACK delegates a matmul only when its weight is a weight of the program, so the
    lowering folds each slice into one, and each half keeps its own values."""
    import torch
    from executorch.runtime import Runtime as ETRuntime

    from modelkiln.exporters.executorch import lower

    class Halves(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weight, bias = self.proj.weight, self.proj.bias
            value = torch.nn.functional.linear(x, weight[:6], bias[:6])
            gate = torch.nn.functional.linear(x, weight[6:], bias[6:])
            return value * torch.nn.functional.gelu(gate)

    torch.manual_seed(0)
    module = Halves().eval()
    batch = torch.export.Dim("batch", min=1, max=16)
    with torch.no_grad():
        program = torch.export.export(
            module, (torch.randn(2, 8),), dynamic_shapes=({0: batch},), strict=False
        )
    buffer, delegation = lower(program, "xnnpack")
    assert not any("mm" in op or "linear" in op for op in delegation["portable_ops"])
    method = ETRuntime.get().load_program(buffer).load_method("forward")
    for rows in (1, 7):
        x = torch.randn(rows, 8)
        (out,) = method.execute([x])
        with torch.no_grad():
            torch.testing.assert_close(out, module(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_sd_programs_run_any_number_of_images_in_chunks_of_their_bound(
    built: Callable[..., Path],
) -> None:
    artifact = built("sd", "sd-executorch-fp32")
    manifest = open_artifact(artifact, verify=True).manifest
    assert set(manifest.components) == {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    for record in manifest.components.values():
        assert record.entry.endswith("/model.pte") and record.validation.passed
        assert record.runtime["delegate"] == "xnnpack" and record.runtime["delegated_nodes"] > 0
    # Every matmul on XNNPACK, the GEGLU halves' too (lower()'s constant folding).
    delegation = json.loads((artifact / "unet" / "delegation.json").read_text())
    assert not any("mm" in op or "linear" in op for op in delegation["portable_ops"])
    with load(artifact) as pipeline, load(built("sd", "sd-torch-fp32")) as reference:
        unet = pipeline.sessions["unet"]
        # shapes.max_batch_size = 2 images; the UNet takes the CFG pair of each.
        assert (unet.max_batch, pipeline.sessions["text_encoder"].max_batch) == (4, 2)
        ours = pipeline.text_to_image("a cat", steps=2, num_images=5, seed=1)
        theirs = reference.text_to_image("a cat", steps=2, num_images=5, seed=1)
        assert len(ours) == 5
        assert all(psnr(a, b) >= 35 for a, b in zip(ours, theirs, strict=True))
        feeds = {name: spec.default() for name, spec in unet.input_specs.items()}
        feeds = {n: np.repeat(v, 5, axis=0) if v.ndim > 1 else v for n, v in feeds.items()}
        with pytest.raises(InputError, match=r"shape \[5, 4, 16, 16\], beyond the largest"):
            unet.run(feeds)


def test_a_classifier_takes_batches_beyond_its_bound(built: Callable[..., Path]) -> None:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(35)]
    with load(built("hf-classifier", "vit-executorch-fp32")) as classifier:
        assert classifier.session.max_batch == 32
        big = classifier.logits(images, batch_size=64)
        small = classifier.logits(images, batch_size=8)
    assert big.shape == (35, 10)
    np.testing.assert_allclose(big, small, atol=1e-5)


def test_profile_errors_are_one_line_and_name_the_fix() -> None:
    with pytest.raises(
        ProfileError, match=r"executorch\.partitioner.*xnnpak.*did you mean 'xnnpack'"
    ):
        load_profile("vit-executorch-fp32", ["executorch.partitioner=xnnpak"])
    with pytest.raises(UnsupportedError, match=r"set executorch\.partitioner = 'xnnpack'"):
        load_profile("vit-executorch-int8", ["executorch.partitioner=vulkan"])
    with pytest.raises(UnsupportedError, match=r"set quantization\.symmetric = false"):
        load_profile("vit-executorch-int8", ["quantization.symmetric=true"])
    with pytest.raises(UnsupportedError, match=r"shapes\.dynamic_resolution = false"):
        load_profile("vit-executorch-fp32", ["shapes.dynamic_resolution=true"])
    with pytest.raises(UnsupportedError, match=r"int8 activations: use int8-dynamic"):
        load_profile("vit-executorch-fp32", ["quantization.scheme=int8-weights"])
    with pytest.raises(UnsupportedError, match=r"serve the vit, sd, sdxl families so far"):
        load_profile("sd3-onnxruntime-fp32", ["export.format=executorch", "runtime.name=auto"])
