"""Peak memory and time of exporting an SD-1.5-sized UNet: modelkiln's exporters against the
plain library calls, each in a fresh process so that its peak RSS is its own.

    python bench/export_memory.py --work /tmp/kiln-bench [--steps legacy,dynamo,...]

The source is a StableDiffusionPipeline directory with random weights from the real SD-1.5
configs (`modelkiln.testing.random_sd15`, made once under WORK/sd15). Steps:

  legacy          torch.onnx.export(dynamo=False) of the loaded UNet wrapper
  dynamo          torch.onnx.export(dynamo=True) of the loaded wrapper, saved with external data
  ov-torch        openvino.convert_model(wrapper) + save_model
  kiln-onnx       modelkiln's ONNX exporter (weights streamed from the checkpoint)
  kiln-openvino   modelkiln's OpenVINO exporter (sd-openvino-fp32: via that ONNX)
  build-onnx      `kiln build` with sd-onnxruntime-fp32: every component, validated at 512x512
  build-openvino  `kiln build` with sd-openvino-fp32
(the builds go to WORK/artifacts/PROFILE, where bench/sd_speed.py reuses them)

Peak RSS is the larger of the step's own ru_maxrss and its largest child's (our OpenVINO path
converts large models in a fresh process). Results: WORK/export_memory.json and a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BOUND = 1.3  # the target: peak RSS <= BOUND x the UNet's fp32 weight bytes
STEPS = (
    "legacy",
    "dynamo",
    "ov-torch",
    "kiln-onnx",
    "kiln-openvino",
    "build-onnx",
    "build-openvino",
)
BUILD_PROFILES = {"build-onnx": "sd-onnxruntime-fp32", "build-openvino": "sd-openvino-fp32"}


def peak_rss() -> int:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) * 1024  # KiB on Linux


def unet_spec(source: Path, profile_name: str) -> tuple[Any, Any]:
    from modelkiln.models import detect_family
    from modelkiln.plan import load_profile
    from modelkiln.sources import resolve_source

    profile = load_profile(profile_name)
    resolved = resolve_source(str(source))
    loaded = detect_family(resolved).load(resolved, profile)
    spec = next(c for c in loaded.components if c.name == "unet")
    return spec, profile.for_component("unet")


def example_args(spec: Any, profile: Any) -> tuple[Any, ...]:
    import torch

    from modelkiln.exporters.base import export_dims

    dims, _ = export_dims(spec, profile)
    example = spec.dummy_inputs(dims)
    return tuple(torch.from_numpy(example[name]) for name in spec.inputs)


def run_step(step: str, source: Path, out: Path) -> dict[str, Any]:
    """The step itself, in this (fresh) process."""
    import torch

    torch.set_num_threads(2)
    started = time.perf_counter()
    if step in BUILD_PROFILES:
        from modelkiln import build

        # Where bench/sd_speed.py looks for its artifacts, so that it can reuse these builds.
        out = out.parent.parent / "artifacts" / BUILD_PROFILES[step]
        build(source, BUILD_PROFILES[step], out)
    elif step in ("kiln-onnx", "kiln-openvino"):
        from modelkiln.exporters import exporter_for

        name = "sd-onnxruntime-fp32" if step == "kiln-onnx" else "sd-openvino-fp32"
        spec, profile = unet_spec(source, name)
        exporter = exporter_for(profile.export.format)()
        exporter.export(spec, functools.cache(spec.module), profile, out)
    else:
        spec, profile = unet_spec(source, "sd-onnxruntime-fp32")
        module = spec.module()
        args = example_args(spec, profile)
        out.mkdir(parents=True, exist_ok=True)
        batch = {0: torch.export.Dim("batch", min=1)}
        with torch.no_grad():
            if step == "legacy":
                torch.onnx.export(
                    module,
                    args,
                    str(out / "model.onnx"),
                    dynamo=False,
                    input_names=list(spec.inputs),
                    output_names=list(spec.outputs),
                    dynamic_axes={"sample": {0: "batch"}, "encoder_hidden_states": {0: "batch"}},
                    opset_version=18,
                )
            elif step == "dynamo":
                program = torch.onnx.export(
                    module,
                    args,
                    dynamo=True,
                    input_names=list(spec.inputs),
                    output_names=list(spec.outputs),
                    dynamic_shapes=({**batch}, {}, {**batch}),
                    opset_version=18,
                )
                program.save(str(out / "model.onnx"), external_data=True)
            elif step == "ov-torch":
                import openvino as ov

                model = ov.convert_model(module, example_input=args)
                ov.save_model(model, str(out / "openvino_model.xml"), compress_to_fp16=False)
            else:
                raise SystemExit(f"unknown step {step!r}; known: {', '.join(STEPS)}")
    files = [p for p in out.rglob("*") if p.is_file()]
    return {
        "step": step,
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_bytes": peak_rss(),
        "files": len(files),
        "bytes_written": sum(p.stat().st_size for p in files),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--tiny", action="store_true", help="a tiny SD: checks the script")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # a child runs one step
    args = parser.parse_args()
    maker = "tiny_sd" if args.tiny else "random_sd15"
    source = args.work / ("tiny" if args.tiny else "sd15")
    if args.step:
        print(json.dumps(run_step(args.step, source, args.work / "out" / args.step)))
        return
    if not (source / "model_index.json").is_file():
        print(f"writing a random pipeline ({maker}) to {source} ...", flush=True)
        code = f"from modelkiln.testing import {maker}; {maker}({str(source)!r})"
        subprocess.run([sys.executable, "-c", code], check=True)
    weights = (source / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    results = []
    for step in args.steps.split(","):
        print(f"{step} ...", flush=True)
        done = subprocess.run(
            [sys.executable, __file__, "--work", str(args.work), "--step", step]
            + (["--tiny"] if args.tiny else []),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-3:]
            results.append({"step": step, "error": " | ".join(tail)})
            print(f"  failed: {results[-1]['error']}", flush=True)
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["ratio_to_weights"] = round(result["peak_rss_bytes"] / weights, 3)
        results.append(result)
        print(
            f"  {result['seconds']:.1f} s, peak {result['peak_rss_bytes'] / 1e9:.2f} GB "
            f"({result['ratio_to_weights']:.2f}x the weights), {result['files']} files",
            flush=True,
        )
    report = {"unet_weight_bytes": weights, "bound": BOUND, "results": results}
    (args.work / "export_memory.json").write_text(json.dumps(report, indent=2))
    print(
        f"\nUNet fp32 weights {weights / 1e9:.2f} GB; "
        f"bound {BOUND}x = {BOUND * weights / 1e9:.2f} GB"
    )
    print(f"{'step':<16}{'time s':>8}{'peak GB':>9}{'x weights':>11}{'files':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['step']:<16}  failed: {r['error']}")
            continue
        print(
            f"{r['step']:<16}{r['seconds']:>8.1f}{r['peak_rss_bytes'] / 1e9:>9.2f}"
            f"{r['ratio_to_weights']:>11.2f}{r['files']:>7}"
        )


if __name__ == "__main__":
    main()
