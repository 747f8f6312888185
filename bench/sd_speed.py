"""Stable Diffusion speed: torch fp32 (diffusers) against every bundled CPU SD profile, one run.

    python bench/sd_speed.py --work /tmp/kiln-bench [--profiles a,b] [--steps 20] [--threads 2]

Source: an SD-1.5-sized pipeline with random weights from the real configs (made once under
WORK/sd15 by `modelkiln.testing.random_sd15`; bench/export_memory.py shares it). Each profile
is built once (WORK/artifacts/PROFILE, reused when present) and measured in its own process:

  unet step    one UNet call at batch 2 (classifier-free guidance) on 64x64 latents
  vae decode   one VAE decoder call, 64x64 latents -> 512x512 pixels
  generate     a full 512x512 text-to-image run (PNDM, `--steps` steps, guidance 7.5)

Model calls: medians over --runs after one warm-up call; the generation: one run after a
1-step warm-up. OpenVINO artifacts load with static_shapes (compiled per batch called).
Ratios are torch fp32 time / profile time (higher is faster). PSNR compares each profile's
image with torch fp32's for the same seed. Writes WORK/sd_speed.json and
WORK/sd_speed.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BASELINE = "torch-fp32"
PROMPT = "a photograph of an astronaut riding a horse"
# At the model's native size (512x512 for SD-1.5).
GENERATE = {"steps": 20, "guidance": 7.5, "seed": 0}


def default_profiles() -> list[str]:
    """Every bundled SD-1.x profile that runs on a CPU, except torch (the baseline itself)."""
    from modelkiln.plan import load_profile
    from modelkiln.profiles import bundled_profile_names

    profiles = {name: load_profile(name) for name in bundled_profile_names()}
    return [
        name
        for name, profile in profiles.items()
        if name.startswith("sd-")
        and profile.runtime.device == "cpu"
        and profile.export.format != "torch"
    ]


def timed(call: Callable[[], Any], runs: int) -> float:
    """Median seconds over `runs` calls after one warm-up call."""
    from modelkiln.bench.metrics import measure_latency

    return measure_latency(call, warmup=1, runs=runs).p50


def measure_torch(
    source: Path, image: Path, runs: int, steps: int, unet_only: bool
) -> dict[str, Any]:
    """The baseline: diffusers' own pipeline and modules, fp32 eager, at the native size."""
    import torch
    from diffusers import StableDiffusionPipeline

    started = time.perf_counter()
    pipeline = StableDiffusionPipeline.from_pretrained(source)
    pipeline.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    side, width = pipeline.unet.config.sample_size, pipeline.unet.config.cross_attention_dim
    sample = torch.randn(2, 4, side, side, generator=generator)
    context = torch.randn(2, 77, width, generator=generator)
    latents = torch.randn(1, 4, side, side, generator=generator)
    with torch.inference_mode():
        unet_s = timed(lambda: pipeline.unet(sample, 500.0, context), runs)
        if unet_only:
            return {"load_s": load_s, "unet_step_s": unet_s}
        vae_s = timed(lambda: pipeline.vae.decode(latents), runs)
        pipeline(PROMPT, num_inference_steps=1)  # warm-up: first-call imports and allocations
        started = time.perf_counter()
        result = pipeline(
            PROMPT,
            num_inference_steps=steps,
            guidance_scale=GENERATE["guidance"],
            generator=torch.Generator().manual_seed(GENERATE["seed"]),
        )
        generate_s = time.perf_counter() - started
    result.images[0].save(image)
    return {
        "size": list(result.images[0].size),
        "load_s": load_s,
        "unet_step_s": unet_s,
        "vae_decode_s": vae_s,
        "generate_s": generate_s,
    }


def measure_artifact(
    artifact: Path, image: Path, runs: int, steps: int, threads: int, unet_only: bool
) -> dict[str, Any]:
    import numpy as np

    from modelkiln import load, open_artifact

    # OpenVINO: a static compilation per batch called, as a server would load it; the
    # warm-up calls compile them.
    manifest = open_artifact(artifact).manifest
    static = {"static_shapes": True} if manifest.runtime == "openvino" else {}
    started = time.perf_counter()
    pipeline = load(artifact, threads=threads, **static)
    load_s = time.perf_counter() - started
    unet, decoder = pipeline.sessions["unet"], pipeline.sessions["vae_decoder"]
    rng = np.random.default_rng(0)
    unet_feeds = {name: spec.random({"batch": 2}, rng) for name, spec in unet.input_specs.items()}
    unet_feeds["timestep"] = np.array(500.0, np.float32)
    vae_feeds = {name: spec.random({"batch": 1}, rng) for name, spec in decoder.input_specs.items()}
    unet_s = timed(lambda: unet.run(unet_feeds), runs)
    precisions = {
        name: record.runtime.get("inference_precision")
        for name, record in manifest.components.items()
    }
    if unet_only:
        pipeline.close()
        return {"load_s": load_s, "unet_step_s": unet_s, "inference_precision": precisions}
    vae_s = timed(lambda: decoder.run(vae_feeds), runs)
    pipeline.text_to_image(PROMPT, steps=1)  # warm-up: first-call imports and allocations
    started = time.perf_counter()
    images = pipeline.text_to_image(PROMPT, **{**GENERATE, "steps": steps})
    generate_s = time.perf_counter() - started
    images[0].save(image)
    pipeline.close()
    return {
        "size": list(images[0].size),
        "load_s": load_s,
        "unet_step_s": unet_s,
        "vae_decode_s": vae_s,
        "generate_s": generate_s,
        "inference_precision": precisions,
    }


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    image = args.work / "images" / f"{args.child}.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    if args.child == BASELINE:
        result = measure_torch(args.source, image, args.runs, args.steps, args.unet_only)
    else:
        artifact = args.work / "artifacts" / args.child
        result = measure_artifact(
            artifact, image, args.runs, args.steps, args.threads, args.unet_only
        )
    from modelkiln.env import peak_rss_bytes

    result["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(result))


def psnr(a: Path, b: Path) -> float:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a), np.float64)
    y = np.asarray(Image.open(b), np.float64)
    error = float(((x - y) ** 2).mean())
    return float("inf") if error == 0 else 10 * float(np.log10(255.0**2 / error))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--profiles", help="default: every bundled SD-1.x CPU profile")
    parser.add_argument("--steps", type=int, default=GENERATE["steps"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a tiny SD: checks the script")
    parser.add_argument(
        "--unet-only", action="store_true", help="only the UNet step (the performance table)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="profile override for every build (e.g. calibration.size=2)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    maker = "tiny_sd" if args.tiny else "random_sd15"
    args.source = source = args.work / ("tiny" if args.tiny else "sd15")
    if args.child:
        child(args)
        return
    if not (source / "model_index.json").is_file():
        print(f"writing a random pipeline ({maker}) to {source} ...", flush=True)
        code = f"from modelkiln.testing import {maker}; {maker}({str(source)!r})"
        subprocess.run([sys.executable, "-c", code], check=True)
    profiles = args.profiles.split(",") if args.profiles else default_profiles()
    for profile in profiles:
        artifact = args.work / "artifacts" / profile
        if not (artifact / "kiln.json").is_file():
            print(f"building {profile} ...", flush=True)
            command = [sys.executable, "-m", "modelkiln", "build", str(source)]
            command += ["--profile", profile, "-o", str(artifact)]
            subprocess.run([*command, *(f"--set={item}" for item in args.overrides)], check=True)
    results: dict[str, dict[str, Any]] = {}
    for name in [BASELINE, *profiles]:
        print(f"measuring {name} ...", flush=True)
        command = [sys.executable, __file__, "--work", str(args.work), "--child", name]
        options = ["--runs", str(args.runs), "--steps", str(args.steps)]
        options += ["--tiny"] if args.tiny else []
        options += ["--unet-only"] if args.unet_only else []
        done = subprocess.run(
            [*command, *options, "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        folder = source if name == BASELINE else args.work / "artifacts" / name
        results[name]["size_bytes"] = sum(
            p.stat().st_size for p in folder.rglob("*") if p.is_file()
        )
        print(f"  {results[name]}", flush=True)
    base = results[BASELINE]
    baseline_image = args.work / "images" / f"{BASELINE}.png"
    for name, result in results.items():
        for key in ("unet_step_s", "vae_decode_s", "generate_s"):
            if key in result:
                result[key.removesuffix("_s") + "_speedup"] = base[key] / result[key]
        if not args.unet_only:
            result["psnr_vs_torch_db"] = psnr(args.work / "images" / f"{name}.png", baseline_image)
    report = {
        "machine": {
            "cpu": cpu_model(),
            "threads": args.threads,
            "python": platform.python_version(),
        },
        "settings": {
            **GENERATE,
            "steps": args.steps,
            "runs": args.runs,
            "prompt": PROMPT,
            "build_overrides": args.overrides,
            "unet_only": args.unet_only,
        },
        "results": results,
    }
    (args.work / "sd_speed.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (args.work / "sd_speed.md").write_text(table)
    print(table)


def markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    machine = report["machine"]
    lines = [
        f"SD-1.5-sized, random weights, {machine['cpu']}, {machine['threads']} threads; "
        "ratio = torch fp32 time / time.",
        "",
    ]
    if settings.get("unet_only"):
        lines += ["| backend | UNet step (batch 2, 64×64 latents) | size |", "|---|---|---|"]
        for name, r in report["results"].items():
            lines.append(
                f"| {name} | {r['unet_step_s']:.2f} s ({r['unet_step_speedup']:.2f}×) "
                f"| {r['size_bytes'] / 1e9:.2f} GB |"
            )
        return "\n".join(lines) + "\n"
    width, height = report["results"][BASELINE]["size"]
    lines += [
        f"| backend | UNet step (batch 2) | VAE decode | {width}×{height} "
        f"{settings['steps']}-step generation | PSNR vs torch | size | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        lines.append(
            f"| {name} | {r['unet_step_s']:.2f} s ({r['unet_step_speedup']:.2f}×) "
            f"| {r['vae_decode_s']:.2f} s ({r['vae_decode_speedup']:.2f}×) "
            f"| {r['generate_s']:.1f} s ({r['generate_speedup']:.2f}×) "
            f"| {r['psnr_vs_torch_db']:.1f} dB | {r['size_bytes'] / 1e9:.2f} GB "
            f"| {r['peak_rss_bytes'] / 1e9:.1f} GB |"
        )
    return "\n".join(lines) + "\n"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
