"""Compressed MatMul weights decompressed once at load, where a float matmul is faster.

nncf stores int8 (and int4/nf4) weights as an integer constant and a Convert -> (Subtract) ->
Multiply chain that OpenVINO's CPU plugin fuses into the matmul: every call decompresses the
weights again, and by default quantizes the activations to int8 in groups of 32 as well.
With AMX a bf16 matmul on weights decompressed once outruns that (measured on an Intel Xeon
with AMX, 2 threads: ViT-B/16 batch 8 with int8 weights 255 -> 168 ms, as fast as the bf16
IR; an SD-1.5-sized hybrid UNet step 1.09 -> 0.98 s), for twice the weights' memory at run
time. The file stays as built; the numbers are those of its dequantized weights, which the
compressed kernel computes too with its dynamic activation quantization off.

Only weight-only matmuls are touched: one whose activations are FakeQuantized runs in int8,
and its weights must stay in the pattern OpenVINO's int8 kernels read (the hybrid scheme's
convolutions and attention keep theirs).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

# What lies between a compressed constant and the MatMul that reads it.
DECOMPRESSION_OPS = frozenset({"Convert", "Subtract", "Multiply", "Reshape", "Transpose"})
# Between a FakeQuantize and the MatMul whose activations it quantizes.
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Convert"})
EIGHT_BIT = frozenset({"u8", "i8"})
FOUR_BIT = frozenset({"u4", "i4", "nf4"})


def _producer(node: Any, port: int = 0) -> Any:
    return node.input(port).get_source_output().get_node()


def _compressed_constant(weights: Any) -> Any | None:
    """The 8- or 4-bit integer constant a decompression chain ending at `weights` starts
    from, or None if `weights` is not such a chain."""
    node = weights
    while node.get_type_name() in DECOMPRESSION_OPS:
        node = _producer(node)
    if node.get_type_name() != "Constant" or node is weights:
        return None
    return node if _element(node) in EIGHT_BIT | FOUR_BIT else None


def _element(node: Any) -> str:
    return str(node.get_output_element_type(0).get_type_name())


def _fake_quantized(activations: Any) -> bool:
    node = activations
    while node.get_type_name() in LAYOUT_OPS:
        node = _producer(node)
    return bool(node.get_type_name() == "FakeQuantize")


def weight_only_matmuls(model: Any, bits: Collection[str]) -> list[tuple[Any, Any]]:
    """(MatMul, its compressed constant) for the model's MatMuls with float activations and
    weights compressed to one of `bits`."""
    found = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        constant = _compressed_constant(_producer(op, 1))
        if (
            constant is not None
            and _element(constant) in bits
            and not _fake_quantized(_producer(op, 0))
        ):
            found.append((op, constant))
    return found


def _fold(matmuls: list[tuple[Any, Any]]) -> int:
    """Fold each MatMul's weight chain into a float constant, in place; returns how many
    MatMuls now read float weights."""
    import openvino as ov
    from openvino.passes import ConstantFolding, Manager

    if not matmuls:
        return 0
    # A model of just the weight chains: OpenVINO's constant folding replaces each chain's
    # output for all its consumers, the MatMuls of the loaded model among them, and folds
    # nothing else.
    chains = ov.Model([op.input(1).get_source_output() for op, _ in matmuls], [], "weights")
    manager = Manager()
    manager.register_pass(ConstantFolding())
    manager.run_passes(chains)
    return sum(_producer(op, 1).get_type_name() == "Constant" for op, _ in matmuls)


def decompress_at_load(
    model: Any,
    setting: str,
    device: str,
    precision: str,
    features: Collection[str] | None = None,
) -> int:
    """What `[openvino] decompress_weights` asks of this model on this machine, done; returns
    how many MatMuls read float weights now.

    "auto" is "int8" on a CPU with AMX-BF16 computing in bf16 (where it was measured faster)
    when the weights in bf16 take under a quarter of the machine's memory (a model loaded
    at the edge of the memory keeps its compression), and "none" elsewhere. `features`:
    the CPU's, as `kiln env` lists them (this machine's by default)."""
    if setting == "auto":
        from modelkiln.memory_budget import machine_memory_bytes
        from modelkiln.runtimes.base import cpu_features

        found = cpu_features() if features is None else features
        if not ("amx_bf16" in found and device == "CPU" and precision == "bf16"):
            return 0
        matmuls = weight_only_matmuls(model, EIGHT_BIT)
        # int8: one byte a weight, two in bf16
        bf16_bytes = 2 * sum(int(constant.get_byte_size()) for _, constant in matmuls)
        return _fold(matmuls) if bf16_bytes <= machine_memory_bytes() / 4 else 0
    bits = {"int8": EIGHT_BIT, "all": EIGHT_BIT | FOUR_BIT}.get(setting, frozenset())
    return _fold(weight_only_matmuls(model, bits)) if bits else 0
