"""This machine's matmul roofline and the time floor it puts under ViT-B/16 and an SD-1.5 step.

    python bench/roofline.py [--threads 2] [--seconds 1.0] [--eager] [--out FILE.json]

Peaks: the best dense square-matmul rate per precision on --threads threads
(`modelkiln.bench.roofline.measure_peaks`: fp32 and bf16 torch.mm, int8 the faster of
torch._int_mm and onnxruntime's MatMulInteger). Floors: each model's forward FLOPs (matmuls,
convolutions and attention, a multiply-add = 2) over each precision's peak, the time no
kernel at that precision can beat:

  ViT-B/16 224        transformers' ViTForImageClassification from ViTConfig's defaults
                      (bench/vit_speed.py's source), batch 1 and 8
  SD-1.5 UNet step    diffusers' UNet2DConditionModel from the SD-1.5 config
                      (modelkiln.testing's random_sd15, bench/sd_speed.py's source), batch 2
                      (classifier-free guidance), 4x64x64 latents, 77x768 text states: 512x512

FLOPs are counted on meta tensors (the architecture without weights: no compute, no memory).
--eager also times torch fp32 eager on random weights (ViT: median of 3 calls, the UNet: of 2,
after a warm-up; the UNet takes ~3.5 GB) and gives its "x floor" against the fp32 floor.
Prints a markdown table; --out FILE.json writes the same as JSON, and the table as FILE.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

VIT_BATCHES = (1, 8)
UNET_BATCH = 2
TIMESTEP = 500.0


def vit(device: str) -> tuple[Any, Callable[[int], tuple[Any, ...]]]:
    """ViT-B/16 224 as bench/vit_speed.py makes it, and its inputs at a batch."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    with torch.device(device):
        config: Any = ViTConfig(num_labels=1000)  # type: ignore[call-arg]
        model = ViTForImageClassification(config).eval()
    return model, lambda batch: (torch.randn(batch, 3, 224, 224, device=device),)


def unet(device: str) -> tuple[Any, Callable[[int], tuple[Any, ...]]]:
    """The SD-1.5 UNet as modelkiln.testing.random_sd15 makes it, and one step's inputs."""
    import torch
    from diffusers import UNet2DConditionModel

    from modelkiln.testing.diffusion import SD15_UNET_CONFIG

    torch.manual_seed(0)
    with torch.device(device):
        model: Any = UNet2DConditionModel(**SD15_UNET_CONFIG)
        model.eval()
    side, width = model.config.sample_size, model.config.cross_attention_dim

    def inputs(batch: int) -> tuple[Any, ...]:
        sample = torch.randn(batch, 4, side, side, device=device)
        return sample, TIMESTEP, torch.randn(batch, 77, width, device=device)

    return model, inputs


# name -> (model maker, batch, eager runs)
MODELS: dict[str, tuple[Callable[[str], Any], int, int]] = {
    **{f"ViT-B/16 224, batch {b}": (vit, b, 3) for b in VIT_BATCHES},
    f"SD-1.5 UNet step, batch {UNET_BATCH}, 64x64 latents": (unet, UNET_BATCH, 2),
}


def eager_seconds(model: Any, args: tuple[Any, ...], runs: int, threads: int) -> float:
    """Median seconds of torch fp32 eager calls after one warm-up call."""
    import torch

    torch.set_num_threads(threads)
    samples = []
    with torch.inference_mode():
        model(*args)
        for _ in range(runs):
            started = time.perf_counter()
            model(*args)
            samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def report(threads: int, seconds: float, eager: bool) -> dict[str, Any]:
    from performance_table import machine_line

    from modelkiln.bench.roofline import Floor, count_flops, measure_peaks

    print(f"measuring matmul peaks on {threads} threads ...", flush=True)
    peaks = measure_peaks(threads, seconds=seconds)
    models = []
    for name, (maker, batch, runs) in MODELS.items():
        model, inputs = maker("meta")
        flops = count_flops(model, *inputs(batch))
        floors = {peak.precision: Floor(flops, peak) for peak in peaks}
        row: dict[str, Any] = {
            "model": name,
            "batch": batch,
            "flops": flops,
            "floor_s": {precision: floor.seconds for precision, floor in floors.items()},
        }
        if eager and "fp32" in floors:
            print(f"timing torch fp32 eager: {name} ...", flush=True)
            model, inputs = maker("cpu")
            measured = eager_seconds(model, inputs(batch), runs, threads)
            row["torch_fp32_eager_s"] = measured
            row["torch_fp32_eager_x_floor"] = floors["fp32"].times(measured)
        del model
        models.append(row)
    return {
        "machine": machine_line(threads),
        "threads": threads,
        "peaks": [asdict(peak) for peak in peaks],
        "models": models,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        result["machine"],
        "",
        "| precision | peak GOP/s | kernel path | size (m=n=k) |",
        "|---|---|---|---|",
    ]
    for peak in result["peaks"]:
        lines.append(
            f"| {peak['precision']} | {peak['ops_per_s'] / 1e9:.0f} | {peak['how']} "
            f"| {peak['size']} |"
        )
    precisions = [peak["precision"] for peak in result["peaks"]]
    eager = any("torch_fp32_eager_s" in row for row in result["models"])
    header = ["model", "GFLOPs", *(f"floor at {p} peak" for p in precisions)]
    header += ["torch fp32 eager (x fp32 floor)"] if eager else []
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["models"]:
        cells = [row["model"], f"{row['flops'] / 1e9:.1f}"]
        cells += [f"{row['floor_s'][p] * 1e3:.1f} ms" for p in precisions]
        if "torch_fp32_eager_s" in row:
            cells.append(
                f"{row['torch_fp32_eager_s'] * 1e3:.0f} ms ({row['torch_fp32_eager_x_floor']:.2f}x)"
            )
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "GFLOPs: one forward's matmuls, convolutions and attention (a multiply-add = 2); the "
        "floor is GFLOPs / peak, a lower bound no kernel at that precision beats.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--seconds", type=float, default=1.0, help="timed seconds per matmul size and path"
    )
    parser.add_argument(
        "--eager", action="store_true", help="also time torch fp32 eager and its x floor"
    )
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()
    result = report(args.threads, args.seconds, args.eager)
    table = markdown(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        args.out.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
