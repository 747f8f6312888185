"""Tiny SD / SDXL pipelines: image quality of every quantized diffusion profile vs fp32.

    python bench/diffusion_quality.py --work /tmp/kiln-dq [--calibration-size 2]

Builds the tiny random pipelines of modelkiln.testing (SD: 2-block UNet, 32x32 images; SDXL:
two text encoders) with each bundled quantized diffusion profile. Each build runs the
profile's own end-to-end gate: its [validation] prompts through the artifact and through the
fp32 torch pipeline with the same seeds; this script collects those PSNR / SSIM figures and
every component's SQNR against torch fp32 from kiln.json. Random weights: the numbers show
what each scheme costs relative to the others, not what a trained model's images look like.
Writes WORK/diffusion_quality.md.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from modelkiln import build, open_artifact
from modelkiln.plan import load_profile
from modelkiln.profiles import bundled_profile_names
from modelkiln.runtimes import runs_here
from modelkiln.testing import tiny_sd, tiny_sdxl


def quantized_diffusion_profiles() -> list[str]:
    names = []
    for name in bundled_profile_names():
        profile = load_profile(name)
        quantized = profile.quantization.scheme != "none" or profile.schemes()
        if profile.family in ("sd", "sdxl") and quantized and runs_here(profile):
            names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--calibration-size", type=int, default=2)
    args = parser.parse_args()
    sources = {"sd": args.work / "tiny-sd", "sdxl": args.work / "tiny-sdxl"}
    for family, folder in sources.items():
        if not (folder / "model_index.json").is_file():
            (tiny_sd if family == "sd" else tiny_sdxl)(folder)
    lines = [
        "| tiny pipeline, profile | schemes | image PSNR vs fp32 | SSIM | component SQNR |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in quantized_diffusion_profiles():
        profile = load_profile(name)
        artifact = args.work / "artifacts" / name
        if not (artifact / "kiln.json").is_file():
            print(f"building {name} ...", flush=True)
            overrides = [f"calibration.size={args.calibration_size}"]
            build(sources[profile.family], name, artifact, overrides=overrides)
        manifest = open_artifact(artifact).manifest
        schemes = ", ".join(
            f"{n} {r.quantization.scheme if r.quantization else 'none'}"
            for n, r in manifest.components.items()
        )
        sqnr = ", ".join(
            f"{n} {min(o.sqnr_db or math.inf for o in r.validation.outputs.values()):.1f} dB"
            for n, r in manifest.components.items()
        )
        record = manifest.end_to_end
        assert record is not None, f"{name} has no end-to-end record"
        psnr = ", ".join("identical" if p is None else f"{p:.1f} dB" for p in record.psnr_db)
        ssim = ", ".join(f"{s:.3f}" for s in record.ssim)
        lines.append(f"| `{name}` | {schemes} | {psnr} | {ssim} | {sqnr} |")
    table = "\n".join(lines) + "\n"
    (args.work / "diffusion_quality.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
