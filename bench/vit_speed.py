"""ViT-B/16 224 speed and size: torch eager fp32 against every bundled ViT CPU profile, one run.

    python bench/vit_speed.py --work /tmp/kiln-vit [--profiles a,b] [--rounds 3] [--runs 5]
                              [--peers]

Source: a transformers ViTForImageClassification with random weights from ViTConfig's
defaults, which are ViT-B/16 at 224x224 (86 M parameters, the published model's compute),
made once under WORK/vit-b16. Each profile is built once (WORK/artifacts/PROFILE, reused when
present; calibrated schemes calibrate on the digits set) and measured in its own process:
--rounds rounds over every configuration, each --runs calls of the exported model at batch 1
and batch 8 after 3 warm-ups; the median pools every round's calls (this shared machine's
speed drifts over minutes: interleaving spreads the drift over all configurations).
Ratios are torch fp32 eager time / profile time (higher is faster).

--peers also exports and runs the same model with optimum's classes from .venv-optimum
(`make compat` creates it): optimum-onnx's export (fp32) and its dynamic int8 (the
avx512_vnni config); optimum-intel's OpenVINO export with fp32 (OpenVINO runs it in its default
bf16 on AMX), int8, int4 and nf4 weights, each where --profiles has our profile of the same
precision. A second table sets each against our profile of the
same precision.

Random weights: the logits of a random ViT-B are small and nearly tied, so builds here record
but do not gate their validation metrics (the table shows the logits' SQNR against torch);
accuracy is measured on real data by bench/digits_accuracy.py.

--roofline FILE (bench/roofline.py --out FILE, which bench/performance_table.py runs first)
adds each row's distance from the floor at batch 8: its time over ViT-B/16's FLOPs at this
machine's matmul peak for the fastest precision its matmuls may run in (int8 for every
quantized profile, else bf16 or fp32 as the runtime computes).
Writes WORK/vit_speed.json and WORK/vit_speed.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

BASELINE = "torch-fp32-eager"
BATCHES = (1, 8)
# A random ViT-B's logits are small and nearly tied: quantization error swamps them (SQNR of a
# few dB for full int8) where a trained model keeps its classes apart. The speed run records
# the build's metrics but does not gate on them; accuracy is bench/digits_accuracy.py's job.
BUILD_OVERRIDES = (
    "validation.min_top1_agreement=0.0",
    "validation.min_cosine=0.0",
    "validation.min_sqnr_db=-100.0",
    "validation.atol=1e6",
    "validation.batch_sizes=[1]",
)
# optimum's export of the same model -> our bundled profile with the same precision.
PEERS = {
    "optimum-onnx-fp32": "vit-onnxruntime-fp32",
    "optimum-onnx-int8": "vit-onnxruntime-int8",
    "optimum-intel-openvino": "vit-openvino-bf16",
    "optimum-intel-int8": "vit-openvino-int8",
    "optimum-intel-int4": "vit-openvino-int4",
    "optimum-intel-nf4": "vit-openvino-nf4",
}
PEER_VENV = Path(".venv-optimum/bin/python")


def default_profiles() -> list[str]:
    from modelkiln.plan import load_profile
    from modelkiln.profiles import bundled_profile_names
    from modelkiln.runtimes import runs_here

    profiles = [load_profile(name) for name in bundled_profile_names()]
    return [
        p.name for p in profiles if p.family == "vit" and p.runtime.device == "cpu" and runs_here(p)
    ]


def make_source(directory: Path) -> None:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(num_labels=1000)).eval().save_pretrained(directory)
    ViTImageProcessor().save_pretrained(directory)


def overrides_for(profile: str) -> list[str]:
    from modelkiln.plan import load_plan

    extra = list(BUILD_OVERRIDES)
    if any(config.calibrated for config in load_plan(profile).schemes.values()):
        extra.append('calibration.data="digits"')
    return extra


def measure(run: Any, batch: int, runs: int) -> list[float]:
    import numpy as np

    from modelkiln.bench.metrics import measure_latency

    pixels = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    return list(measure_latency(lambda: run(pixels), warmup=3, runs=runs).samples)


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    if args.child == BASELINE:
        from transformers import ViTForImageClassification

        model = ViTForImageClassification.from_pretrained(args.source).eval()

        def run(pixels: Any) -> Any:
            with torch.inference_mode():
                return model(torch.from_numpy(pixels)).logits

        info = {"runtime": "torch", "inference_precision": "f32"}
    else:
        from modelkiln import load

        pipeline = load(args.work / "artifacts" / args.child, threads=args.threads)

        def run(pixels: Any) -> Any:
            return pipeline.session.run({"pixel_values": pixels})

        info = pipeline.session.info
    return {
        "backend": f"{info.get('runtime')} ({info.get('inference_precision')})",
        **{f"batch{b}_samples": measure(run, b, args.runs) for b in BATCHES},
    }


def build_sqnr(artifact: Path) -> float | None:
    """The logits' SQNR against torch fp32 that the build measured (None: identical)."""
    from modelkiln import open_artifact

    (record,) = open_artifact(artifact).manifest.components.values()
    return record.validation.outputs["logits"].sqnr_db


def size_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 1e6


def run_child(args: argparse.Namespace, name: str, python: str = sys.executable) -> dict[str, Any]:
    script = Path(__file__).with_name("optimum_peers.py") if name in PEERS else Path(__file__)
    command = [python, str(script), "--work", str(args.work), "--child", name]
    command += ["--runs", str(args.runs), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--profiles", default=None, help="default: every bundled ViT profile")
    parser.add_argument("--runs", type=int, default=5, help="timed calls per round")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds over every configuration; medians pool the rounds' calls",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", action="store_true", help="optimum's exports, same run")
    parser.add_argument("--roofline", type=Path, help="bench/roofline.py's JSON: x floor")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.source = args.work / "vit-b16"
    if args.child:
        print(json.dumps(child(args)))
        return
    if not (args.source / "config.json").is_file():
        print(f"writing a random ViT-B/16 to {args.source} ...", flush=True)
        make_source(args.source)
    profiles = args.profiles.split(",") if args.profiles else default_profiles()
    for profile in profiles:
        artifact = args.work / "artifacts" / profile
        if not (artifact / "kiln.json").is_file():
            print(f"building {profile} ...", flush=True)
            command = [sys.executable, "-m", "modelkiln", "build", str(args.source)]
            command += ["--profile", profile, "-o", str(artifact)]
            for item in overrides_for(profile):
                command += ["--set", item]
            subprocess.run(command, check=True)
    names = [BASELINE, *profiles]
    # The peers with the precision of a profile measured here.
    peers = [peer for peer, ours in PEERS.items() if ours in profiles] if args.peers else []
    if peers and not PEER_VENV.exists():
        raise SystemExit(f"--peers needs {PEER_VENV}: run `make compat` once")
    results: dict[str, dict[str, Any]] = {}
    # This machine's speed drifts by 2x over minutes (shared host): rounds interleave every
    # configuration, so that drift hits them alike instead of favouring whoever ran late;
    # odd rounds run the order backwards (and later pairs rotate it), so no configuration is
    # always first or last.
    failed: set[str] = set()
    order = names + peers
    for round_index in range(args.rounds):
        shift = (round_index // 2) % len(order)
        rotated = order[shift:] + order[:shift]
        for name in [n for n in rotated[:: -1 if round_index % 2 else 1] if n not in failed]:
            print(f"round {round_index + 1}/{args.rounds}: measuring {name} ...", flush=True)
            python = str(PEER_VENV) if name in PEERS else sys.executable
            try:
                measured = run_child(args, name, python)
            except SystemExit as error:
                if name not in PEERS:
                    raise
                # A peer that cannot export here is left out; ours and the baseline must run.
                print(f"skipping peer {name}: {str(error)[-1500:]}", flush=True)
                failed.add(name)
                continue
            result = results.setdefault(name, {"backend": measured["backend"]})
            for batch in BATCHES:
                key = f"batch{batch}_samples"
                result[key] = result.get(key, []) + measured[key]
    for name, result in results.items():
        for batch in BATCHES:
            result[f"batch{batch}_s"] = statistics.median(result[f"batch{batch}_samples"])
        if name == BASELINE:
            result["size_mb"] = size_mb(args.source)
        elif name in PEERS:
            result["size_mb"] = size_mb(args.work / "peers" / name)
        else:
            result["size_mb"] = size_mb(args.work / "artifacts" / name)
            result["sqnr_db"] = build_sqnr(args.work / "artifacts" / name)
    base = results[BASELINE]
    for result in results.values():
        for batch in BATCHES:
            result[f"batch{batch}_speedup"] = base[f"batch{batch}_s"] / result[f"batch{batch}_s"]
    from modelkiln.env import host_info

    report = {
        "machine": {**host_info(), "threads": args.threads},
        "runs_per_round": args.runs,
        "rounds": args.rounds,
    }
    if args.roofline is not None:
        add_floors(results, json.loads(args.roofline.read_text(encoding="utf-8")))
    report["results"] = results
    (args.work / "vit_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(results, args.threads)
    if peers:
        table += "\n" + peer_markdown(results)
    (args.work / "vit_speed.md").write_text(table)
    print(table)


def floor_precision(name: str, backend: str) -> str:
    """The fastest precision a row's matmuls may run in, so that its floor is a lower bound:
    int8 for every quantized profile (int8 activations, or weights of 8 bits or fewer that a
    runtime may multiply in int8: ONNX Runtime's int4 MatMulNBits does), else the runtime's
    compute precision. A peer's is that of our profile of the same precision (optimum-intel's
    int8 weights: int8, as ours)."""
    scheme = "none"
    if name != BASELINE:
        from modelkiln.plan import load_profile

        scheme = load_profile(PEERS.get(name, name)).quantization.scheme
    if scheme != "none" or "int8" in backend:
        return "int8"
    return "bf16" if "bf16" in backend else "fp32"


def add_floors(results: dict[str, dict[str, Any]], roofline: dict[str, Any]) -> None:
    """Each row's batch-8 time over its floor (bench/roofline.py's peaks and FLOPs)."""
    peaks = {peak["precision"]: peak["ops_per_s"] for peak in roofline["peaks"]}
    (flops,) = [
        m["flops"] for m in roofline["models"] if m["model"].startswith("ViT-B/16 224, batch 8")
    ]
    for name, result in results.items():
        precision = floor_precision(name, result["backend"])
        if precision in peaks:
            result["floor_precision"] = precision
            result["batch8_x_floor"] = result["batch8_s"] / (flops / peaks[precision])


def markdown(results: dict[str, dict[str, Any]], threads: int) -> str:
    floors = any("batch8_x_floor" in r for r in results.values())
    header = (
        f"| ViT-B/16 224, {threads} threads | runs as | size | logits SQNR | batch 1 | batch 8 |"
    )
    lines = [
        header + (" batch 8 × floor |" if floors else ""),
        "| --- | --- | --- | --- | --- | --- |" + (" --- |" if floors else ""),
    ]
    for name, r in results.items():
        sqnr = r.get("sqnr_db", "—")
        sqnr = "exact" if sqnr is None else sqnr if isinstance(sqnr, str) else f"{sqnr:.1f} dB"
        floor = ""
        if floors:
            floor = (
                f" {r['batch8_x_floor']:.2f}× ({r['floor_precision']}) |"
                if "batch8_x_floor" in r
                else " — |"
            )
        lines.append(
            f"| {name} | {r['backend']} | {r['size_mb']:.0f} MB | {sqnr} "
            f"| {1e3 * r['batch1_s']:.0f} ms ({r['batch1_speedup']:.2f}×) "
            f"| {1e3 * r['batch8_s']:.0f} ms ({r['batch8_speedup']:.2f}×) |{floor}"
        )
    return "\n".join(lines) + "\n"


def peer_markdown(results: dict[str, dict[str, Any]]) -> str:
    """Ours against optimum's export of the same precision: time ratio, >1 means ours is faster."""
    lines = [
        "| same precision | ours | optimum | batch 1: optimum / ours | batch 8: optimum / ours |",
        "| --- | --- | --- | --- | --- |",
    ]
    for peer, ours in PEERS.items():
        if peer not in results or ours not in results:
            continue
        mine, theirs = results[ours], results[peer]
        lines.append(
            f"| {theirs['backend']} | {ours} | {peer} "
            f"| {theirs['batch1_s'] / mine['batch1_s']:.2f}× "
            f"| {theirs['batch8_s'] / mine['batch8_s']:.2f}× |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
