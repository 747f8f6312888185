"""Few steps against many on the same artifact: an SD-1.5-sized model (random weights, the real
configs) built with `sd-lcm-openvino-int8`, then `kiln generate` 512x512 at the profile's
defaults (LCM scheduler, 4 steps, guidance 1.0: one UNet call per step) against 20 steps with
the model's own scheduler and guidance 7.5 (CFG: the UNet runs a batch of 2), alternating.

    python bench/few_steps.py --work /tmp/kiln-lcm [--rounds 2]

The weights are random, so the image is noise: the point is the time a few-step model (an LCM
checkpoint, or a base model with the LCM-LoRA fused by --lora) saves end to end. Prints the
medians as Markdown and writes WORK/few_steps.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROFILE = "sd-lcm-openvino-int8"
RUNS = {
    "LCM defaults: 4 steps, guidance 1.0": [],
    "20 steps, PNDM, guidance 7.5": ["--steps", "20", "--scheduler", "pndm", "--guidance", "7.5"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    kiln = str(Path(sys.executable).with_name("kiln"))
    source, artifact = work / "sd15", work / f"art-{PROFILE}"
    if not (source / "model_index.json").is_file():
        code = "import sys; from modelkiln.testing import random_sd15; random_sd15(sys.argv[1])"
        subprocess.run([sys.executable, "-c", code, str(source)], check=True)
    if not (artifact / "kiln.json").is_file():
        started = time.perf_counter()
        subprocess.run([kiln, "build", str(source), "-p", PROFILE, "-o", str(artifact)], check=True)
        print(f"built in {time.perf_counter() - started:.0f} s", flush=True)
    seconds: dict[str, list[float]] = {name: [] for name in RUNS}
    for round_ in range(args.rounds):
        for name, extra in RUNS.items():
            command = [kiln, "generate", str(artifact), "--prompt", "a lighthouse at dusk"]
            command += [*extra, "-o", str(work / f"round{round_}.png")]
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            seconds[name].append(time.perf_counter() - started)
            print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    (work / "few_steps.json").write_text(json.dumps({"seconds": seconds}, indent=2))
    baseline = medians["20 steps, PNDM, guidance 7.5"]
    print(f"\n| `{PROFILE}`, SD-1.5-sized, 512x512, 1 image | end to end | vs 20 steps |")
    print("| --- | --- | --- |")
    for name, value in medians.items():
        print(f"| {name} | {value:.1f} s | {baseline / value:.2f}x |")


if __name__ == "__main__":
    main()
