"""The memory-lean ONNX path (meta-device graph + weights streamed from safetensors) must write
the same model as exporting the loaded module."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from modelkiln.models import detect_family
from modelkiln.plan import load_profile
from modelkiln.sources import resolve_source

pytestmark = [pytest.mark.torch, pytest.mark.onnxruntime]


def test_streamed_export_equals_in_memory_export(
    source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    import onnx

    from modelkiln.exporters.onnx import onnx_from_torch

    profile = load_profile("sd-onnxruntime-fp32", overrides=["export.external_data=always"])
    source = resolve_source(source_dir("sd"))
    loaded = detect_family(source).load(source, profile)
    spec = next(c for c in loaded.components if c.name == "unet")
    assert spec.meta_module is not None and spec.checkpoint  # this test needs the streamed path

    streamed = onnx_from_torch(spec, spec.module, profile, tmp_path / "streamed" / "model.onnx")
    in_memory_spec = dataclasses.replace(spec, meta_module=None, checkpoint=())
    in_memory = onnx_from_torch(
        in_memory_spec, spec.module, profile, tmp_path / "memory" / "model.onnx"
    )

    # one external-data file beside each model, with the same bytes
    assert sorted(p.name for p in streamed.parent.iterdir()) == ["model.onnx", "model.onnx_data"]
    assert (streamed.parent / "model.onnx_data").read_bytes() == (
        in_memory.parent / "model.onnx_data"
    ).read_bytes()
    a, b = onnx.load(str(streamed)), onnx.load(str(in_memory))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    # The same weights in the same order; folded constants get generated names ("val_12")
    # that may be numbered differently, so they are compared by position.
    assert len(a.graph.initializer) == len(b.graph.initializer) > 10
    for x, y in zip(a.graph.initializer, b.graph.initializer, strict=True):
        if not x.name.startswith("val_"):
            assert x.name == y.name
        np.testing.assert_array_equal(
            onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y), err_msg=x.name
        )


def test_missing_checkpoint_weights_fall_back_to_memory(
    source_dir: Callable[[str], Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A weight the checkpoint lacks (CLIP's position_ids buffer, say) means no streaming."""
    from modelkiln.exporters.onnx import onnx_from_torch

    profile = load_profile("sd-onnxruntime-fp32")
    source = resolve_source(source_dir("sd"))
    loaded = detect_family(source).load(source, profile)
    spec = next(c for c in loaded.components if c.name == "unet")
    broken = dataclasses.replace(spec, checkpoint=(_empty_checkpoint(tmp_path),))
    caplog.set_level("INFO", logger="modelkiln.exporters.onnx")
    path = onnx_from_torch(broken, spec.module, profile, tmp_path / "out" / "model.onnx")
    assert path.is_file()
    assert any("not in the checkpoint" in r.message for r in caplog.records)


def _empty_checkpoint(directory: Path) -> Path:
    from safetensors.numpy import save_file

    path = directory / "other.safetensors"
    save_file({"unrelated": np.zeros(2, np.float32)}, str(path))
    return path


def test_a_streamed_transformer_keeps_its_weights_on_disk_until_saved(
    source_dir: Callable[[str], Path],
) -> None:
    """The MatMuls' transposed weights are folded lazily: before saving, the program holds
    no weight in memory (onnxscript's optimizer would have materialised every one)."""
    import onnx_ir

    from modelkiln.exporters.onnx import _streamed_program

    profile = load_profile("sd3-onnxruntime-fp32")
    source = resolve_source(source_dir("sd3"))
    loaded = detect_family(source).load(source, profile)
    spec = next(c for c in loaded.components if c.name == "transformer")
    program = _streamed_program(spec, profile)
    assert program is not None
    values = [value.const_value for value in program.model.graph.initializers.values()]
    lazy = sum(v.nbytes for v in values if isinstance(v, onnx_ir.LazyTensor))
    held = sum(v.nbytes for v in values if v is not None and not isinstance(v, onnx_ir.LazyTensor))
    assert lazy > 400_000 and held < 0.01 * lazy
    initializers = set(program.model.graph.initializers.values())
    transposed = [
        n for n in program.model.graph if n.op_type == "Transpose" and n.inputs[0] in initializers
    ]
    assert transposed == []


def test_a_buffer_the_checkpoint_lacks_is_seen_before_exporting_twice(
    source_dir: Callable[[str], Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CLIP's position_ids buffer is not saved: the text encoder is exported once, from
    memory, without a meta-device export first."""
    from modelkiln.exporters import onnx as onnx_exporter

    profile = load_profile("sd-onnxruntime-fp32")
    source = resolve_source(source_dir("sd"))
    loaded = detect_family(source).load(source, profile)
    spec = next(c for c in loaded.components if c.name == "text_encoder")
    exports: list[bool] = []
    export = onnx_exporter._export

    def counted(*args: object, meta: bool) -> object:
        exports.append(meta)
        return export(*args, meta=meta)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx_exporter, "_export", counted)
    caplog.set_level("INFO", logger="modelkiln.exporters.onnx")
    path = onnx_exporter.onnx_from_torch(spec, spec.module, profile, tmp_path / "model.onnx")
    assert path.is_file() and exports == [False]
    assert any("(model.embeddings.position_ids, ...)" in r.message for r in caplog.records)
