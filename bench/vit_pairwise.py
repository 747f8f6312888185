"""ViT-B/16 speed ratios that a drifting machine cannot skew: torch eager fp32 and our artifacts
timed call by call, interleaved, in one process.

    python bench/vit_pairwise.py --work /tmp/kiln-vit [--profiles a,b] [--batch 8] [--calls 10]

Uses what bench/vit_speed.py built under WORK (the random ViT-B/16 source and
WORK/artifacts/PROFILE; run it first). Each round calls torch once, then every artifact once,
on the same pixels, so that a slow phase of a shared host hits all of them alike; the ratio
is torch's median over the artifact's median. vit_speed.py's per-process rounds are the
table; this is the check of its headline ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_PROFILES = "vit-openvino-int8-static,vit-openvino-bf16"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--profiles", default=DEFAULT_PROFILES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import numpy as np
    import torch
    from transformers import ViTForImageClassification

    from modelkiln import load

    torch.set_num_threads(args.threads)
    model = ViTForImageClassification.from_pretrained(args.work / "vit-b16").eval()
    pixels = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224))
    pixels = pixels.astype(np.float32)
    tensor = torch.from_numpy(pixels)

    def run_torch() -> Any:
        with torch.inference_mode():
            return model(tensor).logits

    calls: dict[str, Callable[[], Any]] = {"torch-fp32-eager": run_torch}
    for profile in args.profiles.split(","):
        session = load(args.work / "artifacts" / profile, threads=args.threads).session
        calls[profile] = lambda session=session: session.run({"pixel_values": pixels})
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():  # warm-up
        call()
        call()
    for _ in range(args.calls):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - started)
    base = statistics.median(samples["torch-fp32-eager"])
    print(
        f"ViT-B/16 224, batch {args.batch}, {args.threads} threads, {args.calls} interleaved calls"
    )
    for name, times in samples.items():
        median = statistics.median(times)
        spread = f"{1e3 * min(times):.0f}-{1e3 * max(times):.0f} ms"
        print(f"{name:28s} {1e3 * median:7.0f} ms ({base / median:.2f}x)  range {spread}")


if __name__ == "__main__":
    main()
