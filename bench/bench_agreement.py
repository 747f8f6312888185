"""Does `kiln bench` tell the same time as an interleaved measurement?

    python bench/bench_agreement.py NAME=ARTIFACT [NAME=ARTIFACT ...] --work WORK
                                    [--batch 8] [--threads 2] [--runs 20] [--rounds 5]
                                    [--repeats 1] [--in-process]

`kiln bench` measures each artifact in a process of its own, one after the other (its
default, --isolate), and reports each one's median latency. bench/interleaved_artifacts.py
loads them all at once, each in a child process (--in-process: all in this one), and times
them in alternating rounds, which a drifting host cannot skew. Both run back to back on the
same artifacts and batch, --repeats times, which goes first alternating (the host drifts
between two measurements minutes apart); each row is the median of kiln bench's medians over
the median of the interleaved ones (1.00: the same time) and whether they agree within
--tolerance (10 %). Writes
WORK/bench_agreement.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from interleaved_artifacts import interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", metavar="NAME=ARTIFACT")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20, help="kiln bench's timed calls")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of 3 calls")
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--in-process", action="store_true", help="interleave in one process")
    parser.add_argument(
        "--repeats", type=int, default=1, help="both measurements, alternately, this many times"
    )
    args = parser.parse_args()
    paths = dict(item.split("=", 1) for item in args.artifacts)
    bench_runs: dict[str, list[float]] = {name: [] for name in paths}
    interleaved_runs: dict[str, list[float]] = {name: [] for name in paths}
    for repeat in range(args.repeats):
        # Alternating which goes first, so the host's drift hits both alike.
        for step in ("bench", "interleaved") if repeat % 2 == 0 else ("interleaved", "bench"):
            if step == "bench":
                for name, seconds in kiln_bench(paths, args).items():
                    bench_runs[name].append(seconds)
                continue
            timings = interleaved(
                paths, args.batch, args.threads, args.rounds, block=3, isolate=not args.in_process
            )
            for name, timing in timings.items():
                interleaved_runs[name].append(timing.median)
    bench = {name: statistics.median(values) for name, values in bench_runs.items()}
    together = {name: statistics.median(values) for name, values in interleaved_runs.items()}
    from modelkiln.env import cpu_info

    cpu = cpu_info()
    rows = [
        {
            "name": name,
            "kiln_bench_s": bench[name],
            "interleaved_s": together[name],
            "ratio": bench[name] / together[name],
            "agrees": abs(bench[name] / together[name] - 1) <= args.tolerance,
            "kiln_bench_runs_s": bench_runs[name],
            "interleaved_runs_s": interleaved_runs[name],
        }
        for name in paths
    ]
    report = {
        "machine": f"{cpu['model']} ({', '.join(cpu['features'])}), {args.threads} threads",
        "batch": args.batch,
        "tolerance": args.tolerance,
        "in_process": args.in_process,
        "repeats": args.repeats,
        "rows": rows,
    }
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "bench_agreement.json").write_text(json.dumps(report, indent=2))
    where = "all in one process" if args.in_process else "each in a child process"
    lines = [
        f"batch {args.batch}; {report['machine']}; kiln bench: median of {args.runs} calls per "
        f"artifact, each in its own process; interleaved ({where}): median of {args.rounds} "
        f"rounds; both {args.repeats} time(s), alternately",
        "",
        f"| artifact | kiln bench | interleaved | ratio | within {args.tolerance:.0%} |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['kiln_bench_s'] * 1e3:.0f} ms "
            f"| {row['interleaved_s'] * 1e3:.0f} ms | {row['ratio']:.2f} "
            f"| {'yes' if row['agrees'] else 'no'} |"
        )
    table = "\n".join(lines) + "\n"
    (args.work / "bench_agreement.md").write_text(table)
    print(table)


def kiln_bench(paths: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    """name -> kiln bench's median latency (its own process per artifact, one after another)."""
    command = [sys.executable, "-m", "modelkiln", "bench", *paths.values()]
    command += ["--batch-size", str(args.batch), "--threads", str(args.threads)]
    command += ["--runs", str(args.runs), "--no-reference", "--json"]
    command += ["-o", str(args.work / "kiln-bench")]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    entries = json.loads(done.stdout)["entries"]
    return {
        name: next(e["p50_s"] for e in entries if Path(e["artifact"]) == Path(path).resolve())
        for name, path in paths.items()
    }


if __name__ == "__main__":
    main()
