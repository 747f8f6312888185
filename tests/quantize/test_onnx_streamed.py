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
