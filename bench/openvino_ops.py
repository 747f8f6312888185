"""Where an OpenVINO IR's time goes on this CPU: OpenVINO's own per-op counters, summed.

    python bench/openvino_ops.py IR.xml [--shape NAME=D0,D1,...] [--threads 2] [--calls 10]
                                        [--nodes PATTERN] [--float-attention]

Compiles the IR as our OpenVINO runtime does (latency hint, bf16 inference precision where
the CPU has it, the thread count given) with PERF_COUNT on, runs it on random inputs of the
shapes given (an input's own static shape otherwise) and prints the median call and the
milliseconds per call of each (layer type, kernel) pair, largest first: the int8 attention
subgraphs, the FullyConnected layers on AMX, the reference kernels nobody wanted.
`--nodes PATTERN` lists the single layers whose names contain PATTERN instead (one
transformer block, say). `--float-attention` first bypasses the FakeQuantize nodes nncf put
on the query and key in front of each ScaledDotProductAttention, so the attention runs in
bf16: the experiment docs/performance.md reports.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from typing import Any

# Nodes between a FakeQuantize and the attention that only move data.
LAYOUT_OPS = frozenset({"Transpose", "Reshape"})


def float_attention(model: Any) -> int:
    """Bypass the FakeQuantize feeding each attention's query and key; returns how many."""
    bypassed = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "ScaledDotProductAttention":
            continue
        for port in range(2):  # query, key
            consumer, node = op.input(port), op.input(port).get_source_output().get_node()
            while node.get_type_name() in LAYOUT_OPS:
                consumer, node = node.input(0), node.input(0).get_source_output().get_node()
            if node.get_type_name() == "FakeQuantize":
                consumer.replace_source_output(node.input(0).get_source_output())
                bypassed += 1
    return bypassed


def random_feed(model: Any, shapes: dict[str, list[int]]) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    feed = {}
    for port in model.inputs:
        name = port.get_any_name()
        shape = shapes.get(name) or [d.get_length() for d in port.get_partial_shape()]
        dtype = port.get_element_type().to_dtype()
        if np.issubdtype(dtype, np.integer):
            feed[name] = rng.integers(0, 100, size=shape).astype(dtype)
        else:
            feed[name] = rng.standard_normal(shape).astype(dtype)
    return feed


def parse_shapes(items: list[str]) -> dict[str, list[int]]:
    shapes = {}
    for item in items:
        name, _, dims = item.partition("=")
        shapes[name] = [int(d) for d in dims.split(",")]
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ir", help="path/to/openvino_model.xml")
    parser.add_argument("--shape", action="append", default=[], help="NAME=D0,D1,...")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--nodes", help="list the layers whose names contain this")
    parser.add_argument("--float-attention", action="store_true")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    import openvino as ov

    from modelkiln.cpu import cpu_info

    core = ov.Core()
    model = core.read_model(args.ir)
    if args.float_attention:
        print(f"FakeQuantize bypassed in front of attention: {float_attention(model)}")
    shapes = parse_shapes(args.shape)
    if shapes:
        model.reshape({name: ov.PartialShape(dims) for name, dims in shapes.items()})
    config: dict[str, Any] = {
        "INFERENCE_NUM_THREADS": args.threads,
        "PERFORMANCE_HINT": "LATENCY",
        "PERF_COUNT": True,
    }
    if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        config["INFERENCE_PRECISION_HINT"] = "bf16"
    request = core.compile_model(model, "CPU", config).create_infer_request()
    feed = random_feed(model, shapes)
    for _ in range(2):  # warm-up
        request.infer(feed)
    calls: list[float] = []
    per_kind: collections.Counter[tuple[str, str]] = collections.Counter()
    per_node: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for _ in range(args.calls):
        started = time.perf_counter()
        request.infer(feed)
        calls.append(time.perf_counter() - started)
        for info in request.profiling_info:
            ms = info.real_time.total_seconds() * 1e3 / args.calls
            per_kind[info.node_type, info.exec_type] += ms
            if args.nodes and args.nodes in info.node_name:
                per_node[info.node_name, info.node_type, info.exec_type] += ms
    cpu = cpu_info()
    features = ", ".join(cpu["features"])
    print(f"{cpu['model']} ({features}), {args.threads} threads, {args.calls} calls")
    print(f"median call {1e3 * statistics.median(calls):.1f} ms; per call, by layer:")
    rows = per_node.most_common() if args.nodes else per_kind.most_common(args.top)
    for key, ms in rows:
        print(f"{ms:9.2f} ms  {'  '.join(key)}")


if __name__ == "__main__":
    main()
