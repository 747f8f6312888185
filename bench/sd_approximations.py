"""What each of SD's speed approximations saves end to end, and what it costs in quality.

    python bench/sd_approximations.py --work /tmp/kiln-bench [--profiles sd-openvino-int8,...]
        [--deep-cache 3] [--variants "exact;guidance_end=0.5;cache_interval=3"] [--torch]
        [--steps 20] [--runs 2] [--threads 2]

An SD-1.5-sized pipeline with random weights (WORK/sd15, shared with bench/sd_speed.py),
built once per profile with `model.deep_cache = --deep-cache` (so that it can run DeepCache;
`cache_interval=1` runs its whole UNet every step: the exact pipeline) under
WORK/artifacts/PROFILE-deep-cache-N, each loaded once. Each variant is a set of generation
settings (`exact`: none; `guidance_end=0.5,cache_interval=3`: both) run on every profile's
artifact; each runs a 512x512 text-to-image generation (--steps steps, guidance 7.5, seed 0).
With --torch, diffusers' own pipeline in fp32 (the baseline of the `vs torch` column) is one
more label. Each pipeline runs in a child process of its own (modelkiln/bench/child_call.py;
runtimes in one process slow each other down); all labels are timed interleaved in rounds
(bench/interleaved.py), after one untimed 1-step call each. Quality: PSNR and SSIM of each
image against its profile's exact variant's, same seed. Writes WORK/sd_approximations.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

PROMPT = "a photograph of an astronaut riding a horse"
EXACT = "exact"
TORCH = "torch fp32 (diffusers)"
GUIDANCE = 7.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--profiles", default="sd-openvino-int8", help="comma-separated")
    parser.add_argument("--deep-cache", type=int, default=3, help="the build's model.deep_cache")
    parser.add_argument("--variants", default="exact;guidance_end=0.5;cache_interval=3")
    parser.add_argument("--torch", action="store_true", help="diffusers fp32 as a baseline")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a tiny SD: checks the script")
    args = parser.parse_args()
    variants = {label: settings_of(label) for label in args.variants.split(";")}
    variants.setdefault(EXACT, {})  # the reference of the quality columns
    source = args.work / ("tiny" if args.tiny else "sd15")
    maker = "tiny_sd" if args.tiny else "random_sd15"
    if not (source / "model_index.json").is_file():
        print(f"writing a random pipeline ({maker}) to {source} ...", flush=True)
        code = f"from modelkiln.testing import {maker}; {maker}({str(source)!r})"
        subprocess.run([sys.executable, "-c", code], check=True)
    artifacts = {profile: built(source, profile, args) for profile in args.profiles.split(",")}
    report = measure(artifacts, source, variants, args)
    (args.work / "sd_approximations.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (args.work / "sd_approximations.md").write_text(table)
    print(table)


def built(source: Path, profile: str, args: argparse.Namespace) -> Path:
    """The profile's artifact of `source` with deep_cache, built unless it is there."""
    artifact = args.work / "artifacts" / f"{profile}-deep-cache-{args.deep_cache}"
    if not (artifact / "kiln.json").is_file():
        print(f"building {artifact.name} ...", flush=True)
        command = [sys.executable, "-m", "modelkiln", "build", str(source)]
        command += ["--profile", profile, "-o", str(artifact)]
        command += ["--set", f"model.deep_cache={args.deep_cache}"]
        subprocess.run(command, check=True)
    return artifact


def settings_of(label: str) -> dict[str, float | int]:
    """`guidance_end=0.5,cache_interval=3` -> the generation settings (`exact`: none)."""
    if label == EXACT:
        return {}
    settings: dict[str, float | int] = {}
    for part in label.split(","):
        key, _, value = part.partition("=")
        settings[key.strip()] = int(value) if key.strip() == "cache_interval" else float(value)
    return settings


def measure(
    artifacts: dict[str, Path],
    source: Path,
    variants: dict[str, dict[str, Any]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    from modelkiln.bench.child_call import call_in_child
    from modelkiln.bench.interleaved import time_interleaved
    from modelkiln.env import cpu_info
    from modelkiln.image_quality import psnr, ssim

    images: dict[str, Any] = {}
    calls: dict[str, Callable[[int], Any]] = {}
    runs: dict[str, tuple[str, str]] = {}  # label -> (profile, variant)
    with ExitStack() as stack:
        # One child process per pipeline: runtimes in one process slow each other down.
        for profile, artifact in artifacts.items():
            generator = stack.enter_context(
                call_in_child(partial(open_generator, artifact, args.threads))
            )
            for variant, chosen in variants.items():
                label = f"{profile}: {variant}"
                runs[label] = (profile, variant)
                calls[label] = partial(generator, chosen)
        if args.torch:
            diffusers = stack.enter_context(
                call_in_child(partial(open_diffusers, source, args.threads))
            )
            calls[TORCH] = partial(diffusers, {})
            runs[TORCH] = ("diffusers", "exact")

        @contextmanager
        def opener(label: str) -> Iterator[Callable[[], object]]:
            def call() -> None:
                images[label] = calls[label](args.steps)

            yield call

        for call in calls.values():  # compile and first-call costs, untimed
            call(1)
        timings = time_interleaved(list(calls), opener, rounds=args.runs, block=1, warmup=0)
        size = images[next(iter(calls))].size[::-1]
    cpu = cpu_info()
    rows = []
    for label, timing in timings.items():
        profile, variant = runs[label]
        exact = f"{profile}: {EXACT}"
        compared = label != TORCH and variant != EXACT
        rows.append(
            {
                "profile": profile,
                "variant": variant,
                "seconds": timing.median,
                "rounds_s": list(timing.rounds),
                "vs_exact": timings[exact].median / timing.median if label != TORCH else None,
                "vs_torch": timings[TORCH].median / timing.median if TORCH in timings else None,
                "psnr_db": psnr(images[label], images[exact]) if compared else None,
                "ssim": ssim(images[label], images[exact]) if compared else None,
            }
        )
    return {
        "machine": f"{cpu['model']} ({', '.join(cpu['features'])}), {args.threads} threads",
        "profiles": list(artifacts),
        "deep_cache": args.deep_cache,
        "model": "a tiny SD" if args.tiny else "SD-1.5-sized",
        "size": list(size),
        "steps": args.steps,
        "runs": args.runs,
        "rows": rows,
    }


@contextmanager
def open_generator(artifact: Path, threads: int) -> Iterator[Callable[..., Any]]:
    """In a child: the artifact loaded; (settings, steps) -> one seeded image, with
    cache_interval 1 unless the settings say (the artifact's default is its build's)."""
    from modelkiln import load

    with load(artifact, threads=threads) as pipeline:

        def generate(chosen: dict[str, Any], steps: int) -> Any:
            settings = {"cache_interval": 1, **chosen}
            settings |= {"steps": steps, "guidance": GUIDANCE, "seed": 0}
            return pipeline.text_to_image(PROMPT, **settings)[0]

        yield generate


@contextmanager
def open_diffusers(source: Path, threads: int) -> Iterator[Callable[..., Any]]:
    """In a child: diffusers' StableDiffusionPipeline in fp32, eager (the torch baseline);
    (settings, steps) -> one seeded image (settings: none apply)."""
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(threads)
    pipeline = StableDiffusionPipeline.from_pretrained(source)
    pipeline.set_progress_bar_config(disable=True)

    def generate(chosen: dict[str, Any], steps: int) -> Any:
        with torch.inference_mode():
            generator = torch.Generator().manual_seed(0)
            return pipeline(
                PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=generator
            ).images[0]

    yield generate


def markdown(report: dict[str, Any]) -> str:
    height, width = report["size"]
    lines = [
        f"{', '.join(f'`{p}`' for p in report['profiles'])}, each built with "
        f"`model.deep_cache = {report['deep_cache']}`, "
        f"{report['model']} with random weights, {width}×{height}, {report['steps']} steps, "
        f"guidance {GUIDANCE}, one image; {report['machine']}; medians of {report['runs']} "
        "interleaved runs.",
        "",
        "| profile | variant | end to end | vs exact | vs torch fp32 | PSNR / SSIM vs exact |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["rows"]:
        quality = "—" if row["psnr_db"] is None else f"{row['psnr_db']:.1f} dB / {row['ssim']:.3f}"
        versus_torch = "—" if row["vs_torch"] is None else f"{row['vs_torch']:.2f}×"
        versus_exact = "—" if row["vs_exact"] is None else f"{row['vs_exact']:.2f}×"
        lines.append(
            f"| {row['profile']} | {row['variant']} | {row['seconds']:.1f} s | {versus_exact} "
            f"| {versus_torch} | {quality} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
