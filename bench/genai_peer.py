"""modelkiln's numpy diffusion pipeline against OpenVINO GenAI's C++ one, on the same IRs.

    python bench/genai_peer.py --work /tmp/kiln-genai [--steps 20] [--size 512] [--runs 2]
                               [--precisions f32,bf16]

An SD-1.5-sized pipeline with random weights from the real configs
(`modelkiln.testing.random_sd15`) is built once with sd-openvino-fp32 under WORK; that
artifact is what `openvino_genai.Text2ImagePipeline` loads as it is. Each side generates the
same prompt from the same seed (GenAI's TorchGenerator, our copy of torch's generator) with
the artifact's scheduler and guidance 7.5, in its own process, at each inference precision
(OpenVINO's INFERENCE_PRECISION_HINT: GenAI leaves OpenVINO's default, bf16 on CPUs with AMX
or AVX512-BF16, so both sides are told): load time, then the best of RUNS generations, and
the PSNR between the two images. Results: a table and WORK/genai_peer.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PROFILE = "sd-openvino-fp32"
PROMPT = "a photograph of an astronaut riding a horse"
# One side in a fresh process: load, then RUNS timed generations; the last image is saved.
SIDE = """
import json, sys, time
import numpy as np
from PIL import Image
side, artifact, steps, size, runs, out, prompt, precision = sys.argv[1:9]
steps, size, runs = int(steps), int(size), int(runs)
started = time.perf_counter()
if side == "genai":
    import openvino_genai as genai
    pipeline = genai.Text2ImagePipeline(artifact, "CPU", INFERENCE_PRECISION_HINT=precision)
    def generate():
        tensor = pipeline.generate(prompt, width=size, height=size, num_inference_steps=steps,
                                   guidance_scale=7.5, generator=genai.TorchGenerator(0))
        return Image.fromarray(np.asarray(tensor.data[0]))
else:
    import modelkiln
    pipeline = modelkiln.load(artifact, compute_precision={"f32": "fp32"}.get(precision, precision))
    def generate():
        return pipeline.text_to_image(prompt, steps=steps, seed=0, guidance=7.5)[0]
loaded = time.perf_counter() - started
times = []
for _ in range(runs):
    begin = time.perf_counter()
    image = generate()
    times.append(time.perf_counter() - begin)
image.save(out)
from modelkiln.env import peak_rss_bytes
rss = peak_rss_bytes() / 1e9
print(json.dumps({"load_s": loaded, "generate_s": min(times), "peak_rss_gb": rss}))
"""


def artifact(work: Path) -> Path:
    from modelkiln import build, testing

    source = work / "sd15"
    if not source.is_dir():
        testing.random_sd15(source)
    target = work / PROFILE
    if not (target / "kiln.json").is_file():
        build(source, PROFILE, target)
    return target


def run_side(side: str, target: Path, precision: str, args: argparse.Namespace) -> dict[str, float]:
    image = args.work / f"{side}-{precision}.png"
    command = [sys.executable, "-c", SIDE, side, str(target), str(args.steps), str(args.size)]
    command += [str(args.runs), str(image), PROMPT, precision]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def psnr(first: Path, second: Path) -> float:
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(first), np.float64)
    b = np.asarray(Image.open(second), np.float64)
    error = ((a - b) ** 2).mean()
    return float("inf") if error == 0 else float(10 * np.log10(255.0**2 / error))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--precisions", default="f32,bf16")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    target = artifact(args.work)
    results = {}
    for precision in args.precisions.split(","):
        ours = run_side("modelkiln", target, precision, args)
        theirs = run_side("genai", target, precision, args)
        images = (args.work / f"modelkiln-{precision}.png", args.work / f"genai-{precision}.png")
        results[precision] = {"modelkiln": ours, "genai": theirs, "psnr_db": psnr(*images)}
        for side, result in (("modelkiln", ours), ("openvino-genai", theirs)):
            print(
                f"{precision:4} {side:15} load {result['load_s']:6.2f} s  {args.steps} steps "
                f"{result['generate_s']:7.2f} s  peak RSS {result['peak_rss_gb']:5.2f} GB"
            )
        print(
            f"{precision:4} GenAI time / modelkiln time: "
            f"{theirs['generate_s'] / ours['generate_s']:.2f}; "
            f"PSNR between the images {results[precision]['psnr_db']:.1f} dB",
            flush=True,
        )
    (args.work / "genai_peer.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
