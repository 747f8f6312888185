"""GEGLU exported as two matmuls (models/geglu_split.py): the UNet computes what diffusers'
does, its OpenVINO graph has no split left, and a hook on the projection (a run-time LoRA
slot's) still runs."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.torch


def _unet_and_inputs() -> tuple[Any, tuple[Any, ...]]:
    import torch

    from modelkiln.testing.diffusion import tiny_unet

    torch.manual_seed(0)
    unet = tiny_unet().eval()
    inputs = (torch.randn(2, 4, 16, 16), torch.tensor([500]), torch.randn(2, 7, 32))
    return unet, inputs


def _output(unet: Any, inputs: tuple[Any, ...]) -> Any:
    import torch

    with torch.no_grad():
        return unet(*inputs, return_dict=False)[0]


def test_the_split_unet_computes_diffusers_unet() -> None:
    import torch

    from modelkiln.models.geglu_split import split_geglu_projections

    unet, inputs = _unet_and_inputs()
    expected = _output(unet, inputs)
    split = split_geglu_projections(unet)
    # The same dot products, summed in another order by the kernels.
    torch.testing.assert_close(_output(split, inputs), expected, rtol=0, atol=1e-5)


@pytest.mark.openvino
def test_the_split_unet_converts_to_openvino_without_a_split() -> None:
    import openvino as ov
    import torch

    from modelkiln.models.geglu_split import split_geglu_projections

    def split_ops(unet: Any, inputs: tuple[Any, ...]) -> int:
        class Positional(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.unet = unet

            def forward(self, *args: Any) -> Any:
                return self.unet(*args, return_dict=False)[0]

        with torch.no_grad():
            model = ov.convert_model(Positional(), example_input=inputs)
        kinds = [op.get_type_name() for op in model.get_ops()]
        return kinds.count("Split") + kinds.count("VariadicSplit")

    unet, inputs = _unet_and_inputs()
    assert split_ops(unet, inputs) > 0  # the GEGLUs' chunks, its only splits
    assert split_ops(split_geglu_projections(unet), inputs) == 0


def test_a_hook_on_the_projection_still_runs() -> None:
    import torch

    from modelkiln.models.geglu_split import split_geglu_projections

    def add_one(module: Any, args: Any, output: Any) -> Any:
        return output + 1.0

    unet, inputs = _unet_and_inputs()
    plain = _output(unet, inputs)
    projections = [m.proj for m in unet.modules() if type(m).__name__ == "GEGLU"]
    assert projections
    for projection in projections:
        projection.register_forward_hook(add_one)
    hooked = _output(unet, inputs)
    split = _output(split_geglu_projections(unet), inputs)
    assert (hooked - plain).abs().max() > 1e-3  # the hook changes the output ...
    torch.testing.assert_close(split, hooked, rtol=0, atol=0)  # ... split or not


@pytest.mark.executorch
def test_projections_torchao_quantized_keep_diffusers_forward() -> None:
    """ExecuTorch's int8: torchao's weight subclass would be sliced into constants that
    torch.export cannot lift; such a GEGLU projects and chunks as diffusers does."""
    import torch

    from modelkiln.models.geglu_split import split_geglu_projections
    from modelkiln.quantize.executorch import torchao_int8_dynamic
    from modelkiln.quantize.schemes import Int8Dynamic

    unet, inputs = _unet_and_inputs()
    quantized, _ = torchao_int8_dynamic(unet, Int8Dynamic())
    expected = _output(quantized, inputs)
    split = split_geglu_projections(quantized)
    torch.testing.assert_close(_output(split, inputs), expected, rtol=0, atol=0)
    program = torch.export.export(split, inputs, kwargs={"return_dict": False}, strict=False)
    assert not program.constants, "a sliced quantized weight was lifted as a constant"
