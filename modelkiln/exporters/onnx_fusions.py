"""ONNX Runtime's fused transformer ops in our exported graphs (onnxscript's ort_fusions).

torch's dynamo exporter writes each attention as ~25 small ops, with an IsNaN/Where guard after
the softmax (torch's SDPA decomposition zeroes fully masked rows), and GELU as Erf arithmetic;
ONNX Runtime fuses neither pattern when it loads a model. onnxscript's rewriter turns them into
ONNX Runtime's com.microsoft Attention and Gelu, and onnxruntime's dynamic quantizer turns that
Attention into QAttention (int8 Q/K/V projection), as optimum's ORTOptimizer does for graphs of
the TorchScript exporter. What it buys on ViT-B/16: docs/quantization.md, "Quantization results".

Not SkipLayerNormalization or BiasGelu, which onnxscript offers too: on ViT-B/16 they ran slower
than LayerNormalization + Add and Gelu + Add (onnxruntime 1.32, AVX-512/AMX CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from modelkiln.backends import resolved_runtime
from modelkiln.errors import ExportError, first_line
from modelkiln.runtimes.onnxruntime import OnnxRuntimeSettings

if TYPE_CHECKING:
    from modelkiln.profiles import Profile
# The quantization schemes whose quantizer reaches inside a fused Attention (onnxruntime's
# dynamic quantizer has QAttention): their graphs get Attention, one packed Q/K/V projection.
SCHEMES_THAT_QUANTIZE_ATTENTION = frozenset({"none", "int8-dynamic"})
# The static quantizer (QDQ) quantizes MatMuls only: its graphs stop at MultiHeadAttention,
# whose Q, K and V come from projections left as MatMuls for it to quantize, so that only the
# attention's core (scores, softmax, weighted sum) is the fused fp32 kernel.
SCHEMES_THAT_QUANTIZE_PROJECTIONS = frozenset({"int8-static"})
ATTENTION = "attention"
MULTI_HEAD = "multi-head attention"


def fusions_wanted(profile: Profile) -> str | None:
    """How far `[onnxruntime] fusions = "auto"` fuses this component's graph: ATTENTION,
    MULTI_HEAD (projections left for the quantizer), or None.

    The fused ops are ONNX Runtime's own (other runtimes of an ONNX file, TensorRT or OpenVINO's
    ONNX reader, would not know them), and its CPU attention kernels are fp32 only.
    """
    if not (
        OnnxRuntimeSettings.of(profile).fusions == "auto"
        and profile.export.format == "onnx"
        and resolved_runtime(profile) == "onnxruntime"
        and profile.runtime.device == "cpu"
        and profile.precision.weights == "fp32"
    ):
        return None
    scheme = profile.quantization.scheme
    if scheme in SCHEMES_THAT_QUANTIZE_ATTENTION:
        return ATTENTION
    return MULTI_HEAD if scheme in SCHEMES_THAT_QUANTIZE_PROJECTIONS else None


def fuse_for_onnxruntime(model: Any, level: str = ATTENTION) -> dict[str, int]:
    """Rewrite the onnx_ir model in place, fusing up to `level`; returns how many of each
    com.microsoft op it has."""
    import onnx_ir
    from onnxscript.optimizer import fold_constants, optimize
    from onnxscript.rewriter.ort_fusions import shape_optimization

    try:
        # The attention patterns match on shapes, so they must be known and folded first.
        onnx_ir.passes.common.ShapeInferencePass()(model)
        shape_optimization.rules.apply_to_model(model)
        optimize(model)
        for fuse in _fusions(pack_projections=level == ATTENTION):
            fuse(model)
        optimize(model)
        # The fused Attention takes Q, K and V weights as one Concat of the three: fold it into
        # one initializer, which onnxruntime's quantizer needs to find a weight to quantize.
        fold_constants(model, should_fold=_feeds_attention_weights)
        _drop_equal_qkv_sizes(model)
        onnx_ir.passes.common.RemoveUnusedNodesPass()(model)
    except Exception as error:  # the rewriter raises many unrelated types
        raise ExportError(
            f"fusing ONNX Runtime's attention/GELU ops failed: {first_line(error)}; "
            "set [onnxruntime] fusions = 'none' to keep the exporter's graph"
        ) from error
    return _fused_ops(model)


def _fusions(pack_projections: bool) -> tuple[Callable[[Any], int], ...]:
    from onnxscript.rewriter.ort_fusions import (
        attention,
        erfgelu,
        mha,
        mha_bias,
        sdpa,
        sdpa_via_mha,
    )

    # In this order: each step matches what the one before produced (SDPA -> MultiHeadAttention
    # -> MultiHeadAttention with bias -> Attention with one packed Q/K/V projection); an SDPA
    # that no MultiHeadAttention pattern matched (timm's packed qkv) becomes one directly.
    packed = (attention.fuse_attention,) if pack_projections else ()
    return (
        erfgelu.fuse_erfgelu,
        lambda model: sdpa.fuse_sdpa(model, apply_shape_inference=True),
        mha.fuse_mha2,
        mha_bias.fuse_mha_bias,
        *packed,
        sdpa_via_mha.replace_sdpa_by_mha,
    )


def _feeds_attention_weights(node: Any) -> bool | None:
    if node.op_type != "Concat":
        return None
    return (
        any(
            consumer.op_type == "Attention" and consumer.inputs.index(node.outputs[0]) in (1, 2)
            for consumer in node.outputs[0].consumers()
        )
        or None
    )


def _drop_equal_qkv_sizes(model: Any) -> None:
    """qkv_hidden_sizes with three equal sizes says nothing Attention does not assume, and
    onnxruntime's quantizer leaves an Attention that has the attribute in fp32."""
    for node in model.graph:
        if node.op_type != "Attention":
            continue
        sizes = node.attributes.get("qkv_hidden_sizes")
        if sizes is not None and len(set(sizes.as_ints())) == 1:
            del node.attributes["qkv_hidden_sizes"]


def _fused_ops(model: Any) -> dict[str, int]:
    ops = [node.op_type for node in model.graph if node.domain == "com.microsoft"]
    return {op: ops.count(op) for op in sorted(set(ops))}
