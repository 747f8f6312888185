"""How often the paired gate (kiln compare --rerun) cries wolf, and whether it catches a
real slowdown, on this machine.

A/A: one artifact against itself, RUNS times, a CPU burner (a process spinning on one core)
started halfway through every run's rounds: a shared runner whose neighbour wakes up. Each
run is gated as `kiln compare --rerun` gates it; beside it, what comparing two stored
reports (the first half's baseline samples against the second half's candidate samples,
Mann-Whitney as `kiln compare` does) would have said of the same calls.
A/B: the same artifact with 1 thread against 2 threads, batch 8: really slower.

    python bench/paired_gate.py --work /tmp/kiln-paired [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/kiln-paired"))
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--block", type=int, default=3)
    args = parser.parse_args()

    from modelkiln import build, load
    from modelkiln.bench.compare import latency_p_value
    from modelkiln.bench.comparison import Bounds, Status
    from modelkiln.bench.paired import PairedSettings, gate_row, time_pair
    from modelkiln.env import cpu_info
    from modelkiln.testing.vision import tiny_hf_vit

    source, artifact = args.work / "source", args.work / "vit-ort"
    if not source.exists():
        # 2 blocks, hidden 256, 784 tokens: ~10 ms a call, long enough for the scheduler.
        tiny_hf_vit(source, hidden_size=256, image_size=224)
    if not artifact.exists():
        build(source, "vit-onnxruntime-fp32", artifact)
    settings, bounds = PairedSettings(args.rounds, args.block), Bounds()
    results: dict[str, Any] = {"cpu": cpu_info().get("model"), "settings": vars(args) | {}}
    results["settings"]["work"] = str(args.work)

    a, b = load(artifact, threads=2), load(artifact, threads=2)
    calls = a.bench_call(1, 1), b.bench_call(1, 1)
    same: list[dict[str, Any]] = []
    for run in range(args.runs):
        burner: list[subprocess.Popen[bytes]] = []

        def start_halfway(index: int, burner: list[subprocess.Popen[bytes]] = burner) -> None:
            if index == settings.rounds // 2:
                burner.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))

        timing = time_pair(*calls, settings, warmup=3, label="a/a", on_round=start_halfway)
        for process in burner:
            process.kill()
            process.wait()
        row = gate_row(timing, bounds)
        half = settings.rounds // 2
        before, after = list(timing.baseline[:half]), list(timing.candidate[half:])
        stored_ratio = float(np.median(after) / np.median(before))
        stored_p = latency_p_value(after, before, "greater")
        stored_regressed = stored_ratio > 1 + bounds.max_latency_regression and stored_p < 0.05
        same.append(
            {
                "status": str(row.status),
                "note": row.note,
                "stored_reports_ratio": stored_ratio,
                "stored_reports_p": stored_p,
                "stored_reports_regressed": stored_regressed,
            }
        )
        print(
            f"A/A {run + 1:2d}: {row.status:9s} {row.note}; stored reports would say "
            f"×{stored_ratio:.2f} p={stored_p:.2g}",
            flush=True,
        )
    a.close()
    b.close()
    results["a_a"] = same
    false_alarms = sum(entry["status"] == str(Status.REGRESSED) for entry in same)
    stored_alarms = sum(entry["stored_reports_regressed"] for entry in same)
    results["a_a_false_positive_rate"] = false_alarms / args.runs
    results["a_a_stored_reports_false_positive_rate"] = stored_alarms / args.runs

    two, one = load(artifact, threads=2), load(artifact, threads=1)
    different = []
    for run in range(3):
        timing = time_pair(two.bench_call(8, 1), one.bench_call(8, 1), settings, warmup=3)
        row = gate_row(timing, bounds)
        different.append({"status": str(row.status), "note": row.note})
        print(f"A/B {run + 1}: 1 thread vs 2, batch 8: {row.status} {row.note}", flush=True)
    two.close()
    one.close()
    results["a_b"] = different
    print(
        f"\n{results['cpu']}: A/A regressions {false_alarms}/{args.runs} paired, "
        f"{stored_alarms}/{args.runs} from stored reports; A/B caught "
        f"{sum(e['status'] == str(Status.REGRESSED) for e in different)}/3"
    )
    (args.work / "paired_gate.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
