"""docs/performance.md's table: torch eager fp32 against every bundled CPU profile, one run.

    python bench/performance_table.py --work /tmp/kiln-perf [--peers] [--doc docs/performance.md]
                                      [--rounds 3] [--runs 5] [--sd-runs 2] [--set KEY=VALUE]

Runs, one after the other on this machine:
  bench/roofline.py    the matmul peaks (fp32, bf16, int8) and the FLOP floors of both models
                       (WORK/roofline.json): each ViT row's "x floor"
  bench/vit_speed.py   ViT-B/16 224 (random weights from ViTConfig), batch 1 and 8, every
                       bundled ViT CPU profile (+ optimum's exports with --peers), interleaved
                       rounds (WORK/vit)
  bench/sd_speed.py    one SD-1.5-sized UNet step (random weights from the SD-1.5 configs,
                       batch 2, 64x64 latents), every bundled SD-1.x CPU profile (WORK/sd)
Both build their artifacts once and reuse them. Writes WORK/performance.md: the machine, the
command, both tables as ratios to torch fp32 with absolute medians. --doc replaces the block
of this machine's CPU kind (vendor, AMX or not) between the performance-table markers of that
file with it, or adds one: the doc keeps a table per CPU kind.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

# One block per CPU kind (docs/performance.md keeps each): the begin marker names the kind.
BEGIN = "<!-- performance-table:begin {kind} (bench/performance_table.py writes this block) -->"
END = "<!-- performance-table:end -->"
ROUNDS = 3
HERE = Path(__file__).parent


def run(script: str, *arguments: str) -> None:
    command = [sys.executable, str(HERE / script), *arguments]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)


def machine_line(threads: int) -> str:
    from modelkiln.env import machine_report

    machine = machine_report()
    cpu = machine["cpu"]
    listed = [f for f in cpu["features"] if f.startswith(("amx", "avx512_"))]
    # AMX decides the bf16 / int8 paths: its absence is worth a word too.
    features = ", ".join(listed + ([] if "amx_tile" in listed else ["no AMX"]))
    versions = ", ".join(
        f"{name} {machine['libraries'].get(name)}"
        for name in ("torch", "onnxruntime", "openvino", "executorch")
    )
    return (
        f"{cpu['model']}, {cpu['usable_cores']} cores ({features}), {threads} threads; {versions}"
    )


def cpu_kind() -> str:
    """What decides which paths are fast: the vendor and whether it has AMX ("intel-amx",
    "amd-avx512"), the key of this machine's block in the doc."""
    from modelkiln.env import machine_report

    cpu = machine_report()["cpu"]
    vendor = "amd" if "AMD" in cpu["model"] else "intel"
    features = set(cpu["features"])
    vector = "avx512" if "avx512f" in features else "avx2"
    return f"{vendor}-{'amx' if 'amx_tile' in features else vector}"


def table(args: argparse.Namespace) -> str:
    today = datetime.date.today().isoformat()
    # The options that change what was measured, as the command was given.
    options = [
        *(["--peers"] if args.peers else []),
        *([f"--only {args.only}"] if args.only else []),
        *([f"--rounds {args.rounds}"] if args.rounds != ROUNDS else []),
    ]
    command = " ".join(["python bench/performance_table.py --work WORK", *options])
    vit = (args.work / "vit" / "vit_speed.md").read_text(encoding="utf-8").strip()
    roofline = (args.work / "roofline.md").read_text(encoding="utf-8").strip()
    sd_table = args.work / "sd" / "sd_speed.md"
    # --only vit on a fresh WORK has no SD half: the block says so instead.
    sd = (
        sd_table.read_text(encoding="utf-8").strip()
        if sd_table.is_file()
        else "Not measured in this run (`--only vit`)."
    )
    return "\n".join(
        [
            BEGIN.format(kind=cpu_kind()),
            f"Measured {today} by `{command}` on {machine_line(args.threads)}.",
            "Ratios are torch eager fp32 time / time in the same run (above 1× is faster);",
            "models have random weights from the published configs (the same compute).",
            "",
            "**ViT-B/16 224**, medians of every round's calls:",
            "",
            vit,
            "",
            "**SD-1.5-sized UNet**, one denoising step:",
            "",
            sd,
            "",
            "**The floor** (bench/roofline.py): dense matmul peaks on these threads, and each "
            "model's FLOPs over them; a row's × floor is its time over the floor of the "
            "precision its matmuls run in.",
            "",
            roofline,
            END,
        ]
    )


def update_doc(doc: Path, block: str) -> None:
    """Replace this CPU kind's block; a kind not yet in the doc gets its block after the
    last one."""
    text = doc.read_text(encoding="utf-8")
    begin = BEGIN.format(kind=cpu_kind())
    if begin in text:
        before, rest = text.split(begin, 1)
        _, after = rest.split(END, 1)
    elif END in text:
        before, after = text.rsplit(END, 1)
        before += END + "\n\n"
    else:
        raise SystemExit(f"{doc} has no performance-table markers ({begin} ... {END})")
    doc.write_text(before + block + after, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--peers", action="store_true", help="optimum's exports (make compat)")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sd-runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--doc", type=Path, help="rewrite this file's performance block")
    parser.add_argument(
        "--only",
        choices=["vit", "sd"],
        help="re-measure one half; the other's table is reused from WORK (a rebuilt profile)",
    )
    args = parser.parse_args()
    threads = ["--threads", str(args.threads)]
    vit = ["--work", str(args.work / "vit"), "--rounds", str(args.rounds), "--runs", str(args.runs)]
    roofline = args.work / "roofline.json"
    run("roofline.py", "--out", str(roofline), "--seconds", "2", *threads)
    if args.only in (None, "vit"):
        peers = ["--peers"] if args.peers else []
        run("vit_speed.py", *vit, *threads, *peers, "--roofline", str(roofline))
    sd = ["--work", str(args.work / "sd"), "--unet-only", "--runs", str(args.sd_runs)]
    if args.only in (None, "sd"):
        run("sd_speed.py", *sd, *threads, *(f"--set={item}" for item in args.overrides))
    block = table(args)
    (args.work / "performance.md").write_text(block + "\n", encoding="utf-8")
    print(block)
    if args.doc is not None:
        update_doc(args.doc, block)
        print(f"updated {args.doc}")


if __name__ == "__main__":
    main()
