"""Digits ViT: top-1 accuracy, size and latency of torch fp32 and every bundled ViT CPU profile.

    python bench/digits_accuracy.py --work /tmp/kiln-digits [--runs 200] [--threads 2]

The digits ViT of `kiln demo` (trained once, cached) is built with every bundled ViT profile
(quantized ones with calibration on the digits training split and 4-bit groups of 32, which
divide its hidden size of 64), then classifies the 360 held-out digits from PNG files. The
demo's bounds apply: floating point within 0.5 points of PyTorch, int8 within 1, int4 / nf4
within 3; a miss exits non-zero. Writes WORK/digits_accuracy.md (the README's table).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from modelkiln.demo import REFERENCE_PROFILE, accuracy_gap, run_demo
from modelkiln.plan import load_profile
from modelkiln.profiles import bundled_profile_names
from modelkiln.runtimes import runs_here


def vit_cpu_profiles() -> tuple[str, ...]:
    profiles = [load_profile(n) for n in bundled_profile_names()]
    names = [
        p.name
        for p in profiles
        if p.family == "vit" and p.name != REFERENCE_PROFILE and runs_here(p)
    ]
    return (REFERENCE_PROFILE, *names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    result = run_demo(args.work, profiles=vit_cpu_profiles(), runs=args.runs, threads=args.threads)
    reference = result.reference
    lines = [
        f"| digits ViT, {result.test_images} held-out images | runs as | top-1 | vs torch "
        f"(bound) | size | batch-1 p50 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in result.rows:
        gap = row.accuracy - reference.accuracy
        bound = "" if row is reference else f"{gap:+.2f} (±{accuracy_gap(row.profile)})"
        lines.append(
            f"| `{row.profile}` | {row.backend} | {row.accuracy:.2f} % | {bound} "
            f"| {row.size_mb:.2f} MB | {row.median_ms:.2f} ms "
            f"({reference.median_ms / row.median_ms:.2f}×) |"
        )
    table = "\n".join(lines) + "\n"
    (args.work / "digits_accuracy.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
