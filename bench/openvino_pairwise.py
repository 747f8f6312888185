"""OpenVINO IRs timed call by call, interleaved in one process: robust to machine drift.

    python bench/openvino_pairwise.py NAME=IR.xml NAME=IR.xml ... [--batch 8] [--calls 8]

Every IR is compiled with the same settings (2 threads, latency hint, bf16 inference precision:
OpenVINO's default on AMX) and the calls alternate between them, so that a slow phase of a
shared machine hits all of them alike. Use it to compare two exports of the same model, e.g.
ours against optimum-intel's (bench/vit_speed.py --peers writes it under WORK/peers/).
Prints each IR's median and its calls in ms.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("irs", nargs="+", help="NAME=path/to/model.xml")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import numpy as np
    import openvino as ov

    core = ov.Core()
    config = {
        "INFERENCE_NUM_THREADS": args.threads,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "bf16",
    }
    pixels = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224))
    feed = {0: pixels.astype(np.float32)}
    requests = {}
    for item in args.irs:
        name, _, path = item.partition("=")
        requests[name] = core.compile_model(path, "CPU", config).create_infer_request()
        for _ in range(2):  # warm-up
            requests[name].infer(feed)
    samples: dict[str, list[float]] = {name: [] for name in requests}
    for _ in range(args.calls):
        for name, request in requests.items():
            started = time.perf_counter()
            request.infer(feed)
            samples[name].append(time.perf_counter() - started)
    for name, values in samples.items():
        calls = ", ".join(f"{1e3 * v:.0f}" for v in values)
        print(f"{name}: median {1e3 * statistics.median(values):.0f} ms (calls: {calls})")


if __name__ == "__main__":
    main()
