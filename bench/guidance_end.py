"""What stopping classifier-free guidance early saves, end to end, and what it costs.

    python bench/guidance_end.py --work /tmp/kiln-bench [--profile sd-openvino-int8]
                                 [--ends 1.0,0.5] [--steps 20] [--runs 2] [--threads 2]

One artifact of an SD-1.5-sized pipeline with random weights (WORK/sd15 and
WORK/artifacts/PROFILE, shared with bench/sd_speed.py, built once), loaded once; a 512x512
text-to-image generation (--steps steps, guidance 7.5, seed 0) at each --ends value
(`guidance_end`: the share of the steps that are guided), timed interleaved in rounds
(bench/interleaved.py), after one untimed 1-step call each. Quality: PSNR and SSIM of each
image against the fully guided one (guidance_end 1.0), same seed. Writes
WORK/guidance_end.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PROMPT = "a photograph of an astronaut riding a horse"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--profile", default="sd-openvino-int8")
    parser.add_argument("--ends", default="1.0,0.5")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a tiny SD: checks the script")
    args = parser.parse_args()
    ends = [float(value) for value in args.ends.split(",")]
    if 1.0 not in ends:
        ends.insert(0, 1.0)  # the reference of the quality columns
    source = args.work / ("tiny" if args.tiny else "sd15")
    maker = "tiny_sd" if args.tiny else "random_sd15"
    if not (source / "model_index.json").is_file():
        print(f"writing a random pipeline ({maker}) to {source} ...", flush=True)
        code = f"from modelkiln.testing import {maker}; {maker}({str(source)!r})"
        subprocess.run([sys.executable, "-c", code], check=True)
    artifact = args.work / "artifacts" / args.profile
    if not (artifact / "kiln.json").is_file():
        print(f"building {args.profile} ...", flush=True)
        command = [sys.executable, "-m", "modelkiln", "build", str(source)]
        subprocess.run([*command, "--profile", args.profile, "-o", str(artifact)], check=True)
    report = measure(artifact, ends, args)
    (args.work / "guidance_end.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (args.work / "guidance_end.md").write_text(table)
    print(table)


def measure(artifact: Path, ends: list[float], args: argparse.Namespace) -> dict[str, Any]:
    from modelkiln import load
    from modelkiln.bench.interleaved import time_interleaved
    from modelkiln.env import cpu_info
    from modelkiln.image_quality import psnr, ssim

    images: dict[str, Any] = {}
    with load(artifact, threads=args.threads) as pipeline:
        size = pipeline.size

        def generate(end: float, steps: int) -> Any:
            settings = {"steps": steps, "guidance": 7.5, "seed": 0, "guidance_end": end}
            return pipeline.text_to_image(PROMPT, **settings)[0]

        @contextmanager
        def opener(label: str) -> Iterator[Callable[[], object]]:
            end = float(label)

            def call() -> None:
                images[label] = generate(end, args.steps)

            yield call

        for end in ends:  # compile and first-call costs, untimed
            generate(end, 1)
        labels = [str(end) for end in ends]
        timings = time_interleaved(labels, opener, rounds=args.runs, block=1, warmup=0)
    full = images["1.0"]
    cpu = cpu_info()
    rows = []
    for label in labels:
        timing = timings[label]
        rows.append(
            {
                "guidance_end": float(label),
                "seconds": timing.median,
                "rounds_s": list(timing.rounds),
                "speedup": timings["1.0"].median / timing.median,
                "psnr_db": None if label == "1.0" else psnr(images[label], full),
                "ssim": None if label == "1.0" else ssim(images[label], full),
            }
        )
    return {
        "machine": f"{cpu['model']} ({', '.join(cpu['features'])}), {args.threads} threads",
        "profile": args.profile,
        "model": "a tiny SD" if args.tiny else "SD-1.5-sized",
        "size": list(size),
        "steps": args.steps,
        "runs": args.runs,
        "rows": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    height, width = report["size"]
    lines = [
        f"`{report['profile']}`, {report['model']} with random weights, {width}×{height}, "
        f"{report['steps']} steps, guidance 7.5, one image; {report['machine']}; medians of "
        f"{report['runs']} interleaved runs.",
        "",
        "| guidance_end | end to end | vs fully guided | PSNR / SSIM vs fully guided |",
        "| --- | --- | --- | --- |",
    ]
    for row in report["rows"]:
        quality = "—" if row["psnr_db"] is None else f"{row['psnr_db']:.1f} dB / {row['ssim']:.3f}"
        lines.append(
            f"| {row['guidance_end']:g} | {row['seconds']:.1f} s "
            f"| {row['speedup']:.2f}× | {quality} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
