"""From `modelkiln.load()` to the first image: time and peak RSS of an SD artifact, with this
checkout's numpy pipeline and with an earlier commit's (diffusers' loop over our Sessions).

    python bench/diffusion_startup.py --work /tmp/kiln-startup [--before REV] [--steps 4]
                                      [--sizes tiny,sd15]

Sources: the tests' tiny SD pipeline and an SD-1.5-sized one with random weights from the real
configs (`modelkiln.testing.random_sd15`), built once under WORK with sd-openvino-fp32. Each
measurement runs in a fresh process (its own imports and peak RSS): import modelkiln, load(),
then one text-to-image call (STEPS steps, diffusers' default guidance, seed 0). The earlier
commit is checked out with `git worktree` under WORK/before and run on the same artifacts
with PYTHONPATH. Results: a table and WORK/diffusion_startup.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "sd-openvino-fp32"
# One fresh process: what it imported, how long each phase took, its peak RSS.
MEASURE = """
import json, sys, time
started = time.perf_counter()
import modelkiln
imported = time.perf_counter()
pipeline = modelkiln.load(sys.argv[1])
loaded = time.perf_counter()
prompt = "a photograph of an astronaut riding a horse"
image = pipeline.text_to_image(prompt, steps=int(sys.argv[2]), seed=0)[0]
done = time.perf_counter()
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "diffusers", "transformers"})
from modelkiln.env import peak_rss_bytes  # VmHWM: ru_maxrss survives exec from the parent
rss = peak_rss_bytes() / 1e9
print(json.dumps({
    "import_s": imported - started, "load_s": loaded - imported, "first_image_s": done - loaded,
    "total_s": done - started, "peak_rss_gb": rss, "imported": heavy, "size": list(image.size),
}))
"""


def artifact(work: Path, size: str) -> Path:
    from modelkiln import build, testing

    source = work / f"source-{size}"
    if not source.is_dir():
        (testing.tiny_sd if size == "tiny" else testing.random_sd15)(source)
    target = work / f"artifact-{size}"
    if not (target / "kiln.json").is_file():
        build(source, PROFILE, target)
    return target


def checkout(work: Path, revision: str) -> Path:
    folder = work / "before"
    if not folder.is_dir():
        git = ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), revision]
        subprocess.run(git, check=True, capture_output=True)
    return folder


def measure(target: Path, steps: int, code: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(target), str(steps)],
        capture_output=True,
        text=True,
        check=True,
        cwd=code.parent,
        env={"PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--before", default="1876803", help="the commit before the numpy pipeline")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sizes", default="tiny,sd15")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    before = checkout(args.work, args.before)
    results = []
    for size in args.sizes.split(","):
        target = artifact(args.work, size)
        for label, code in (("before", before), ("after", ROOT)):
            result = {"size": size, "code": label, **measure(target, args.steps, code)}
            results.append(result)
            print(
                f"{size:5} {label:6} import {result['import_s']:6.2f} s"
                f"  load {result['load_s']:6.2f} s"
                f"  first image {result['first_image_s']:7.2f} s"
                f"  total {result['total_s']:7.2f} s"
                f"  peak RSS {result['peak_rss_gb']:5.2f} GB  imported {result['imported']}",
                flush=True,
            )
    (args.work / "diffusion_startup.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
