"""int4 weights quantized as a streamed export is written (quantize/onnx_streamed.py): the
model it writes is the one onnxruntime's MatMulNBitsQuantizer makes from the fp32 export,
initializer for initializer, and no weight is read before the saver reaches it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelkiln.quantize.onnx import ACCURACY_LEVEL, matmul_nbits_quantizer
from modelkiln.quantize.onnx_streamed import quantize_matmuls_as_written
from modelkiln.quantize.schemes import Int4Weights

pytestmark = [pytest.mark.torch, pytest.mark.onnxruntime]


def _exported() -> Any:
    """An onnx_ir model of linears: 64 inputs (whole groups), 40 (padded to 48 with groups
    of 16), a weight used twice, and an activation x activation MatMul."""
    import torch

    class Layers(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = torch.nn.Linear(64, 40)
            self.second = torch.nn.Linear(40, 64, bias=False)
            self.tied = torch.nn.Parameter(torch.randn(64, 64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hidden = self.second(torch.relu(self.first(x)))
            hidden = hidden @ self.tied @ self.tied
            return hidden @ hidden.transpose(-1, -2)

    torch.manual_seed(0)
    example = (torch.randn(2, 5, 64),)
    program = torch.onnx.export(Layers().eval(), example, dynamo=True, optimize=True)
    assert program is not None
    return program.model


def _arrays(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_the_streamed_rewrite_writes_what_onnxruntimes_quantizer_writes(
    symmetric: bool, tmp_path: Path
) -> None:
    import onnx
    import onnx_ir
    import onnxruntime as ort

    settings = Int4Weights(group_size=16, symmetric=symmetric)
    fp32 = tmp_path / "fp32.onnx"
    onnx_ir.save(_exported(), fp32)
    quantizer = matmul_nbits_quantizer()(
        onnx.load(str(fp32)),
        bits=4,
        block_size=settings.group_size,
        is_symmetric=symmetric,
        accuracy_level=ACCURACY_LEVEL,
    )
    quantizer.process()
    theirs = tmp_path / "theirs.onnx"
    onnx.save_model(quantizer.model.model, str(theirs))

    model = onnx_ir.load(fp32)
    # Every weight read only when saved: reads are counted.
    reads: list[str] = []
    for value in list(model.graph.initializers.values()):
        source = value.const_value

        def read(source: Any = source, name: str = value.name) -> Any:
            reads.append(name)
            return source

        value.const_value = onnx_ir.LazyTensor(read, dtype=source.dtype, shape=source.shape)
    record = quantize_matmuls_as_written(model, settings, ACCURACY_LEVEL)
    assert reads == []
    ours = tmp_path / "ours.onnx"
    onnx_ir.save(model, ours, external_data="ours.onnx_data")
    assert sorted(reads) == sorted(set(reads))  # each weight read once

    # first, second, the tied weight twice (quantized once: onnxruntime stores it twice)
    assert record["quantized_weights"] == 4
    assert record["padded_layers"] == 1  # second: 40 inputs in groups of 16
    ours_graph, theirs_graph = onnx.load(str(ours)).graph, onnx.load(str(theirs)).graph
    nbits = [
        [
            (n.name, list(n.input), {a.name: a.i for a in n.attribute})
            for n in graph.node
            if n.op_type == "MatMulNBits"
        ]
        for graph in (ours_graph, theirs_graph)
    ]
    assert nbits[0] == nbits[1] and len(nbits[0]) == 4
    expected, actual = _arrays(theirs), _arrays(ours)
    assert list(actual) == list(expected)
    for name, array in expected.items():
        assert actual[name].dtype == array.dtype and np.array_equal(actual[name], array), name

    x = np.random.default_rng(1).standard_normal((2, 5, 64)).astype(np.float32)
    runs = [
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        for path in (ours, theirs, fp32)
    ]
    assert np.array_equal(runs[0], runs[1])
    cosine = float((runs[0] * runs[2]).sum() / np.linalg.norm(runs[0]) / np.linalg.norm(runs[2]))
    assert 0.95 < cosine < 1.0 - 1e-6  # quantized: close, not equal


def test_a_gemm_becomes_the_matmulnbits_of_its_transposed_weight_and_a_head_stays_float(
    tmp_path: Path,
) -> None:
    """A Linear on a 2-D input exports as Gemm(transB=1) with a bias; onnxruntime's quantizer
    skips it. Ours quantizes it as the quantizer quantizes the same layer written as a MatMul
    of the transposed weight, bias added by MatMulNBits; the head writing the output stays."""
    import onnx
    import onnx_ir
    import onnxruntime as ort
    import torch
    from onnx import helper, numpy_helper

    class Modulation(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(48, 64)
            self.head = torch.nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.nn.functional.silu(self.linear(x)))

    torch.manual_seed(0)
    module = Modulation().eval()
    program = torch.onnx.export(module, (torch.randn(3, 48),), dynamo=True, optimize=True)
    assert program is not None
    gemms = [node for node in program.model.graph if node.op_type == "Gemm"]
    assert len(gemms) == 2 and all(node.attributes["transB"].value == 1 for node in gemms)
    settings = Int4Weights(group_size=16, symmetric=False)
    record = quantize_matmuls_as_written(program.model, settings, ACCURACY_LEVEL)
    assert record["quantized_weights"] == record["from_gemm"] == 1
    assert record["float_matmuls"] == {"MatMul": 0, "Gemm": 1}  # the head
    ours = tmp_path / "ours.onnx"
    onnx_ir.save(program.model, ours)

    # The same layer as onnxruntime's quantizer takes it: MatMul(x, W^T) + b.
    weight = module.linear.weight.detach().numpy()
    matmul = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"], name="linear")],
            "linear",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 48])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 64])],
            [numpy_helper.from_array(np.ascontiguousarray(weight.T), "w")],
        )
    )
    quantizer = matmul_nbits_quantizer()(
        matmul, bits=4, block_size=16, is_symmetric=False, accuracy_level=ACCURACY_LEVEL
    )
    quantizer.process()
    theirs = {
        t.name.removeprefix("w"): numpy_helper.to_array(t)
        for t in quantizer.model.model.graph.initializer
    }
    nbits = next(n for n in onnx.load(str(ours)).graph.node if n.op_type == "MatMulNBits")
    assert nbits.input[4] == "" and nbits.input[5] == "linear.bias"
    stem = nbits.input[1].removesuffix("_Q4")
    arrays = _arrays(ours)
    for suffix, array in theirs.items():
        assert np.array_equal(arrays[stem + suffix], array), suffix

    x = np.random.default_rng(2).standard_normal((3, 48)).astype(np.float32)
    session = ort.InferenceSession(str(ours), providers=["CPUExecutionProvider"])
    actual = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    cosine = float((actual * expected).sum() / np.linalg.norm(actual) / np.linalg.norm(expected))
    assert 0.98 < cosine < 1.0 - 1e-6
