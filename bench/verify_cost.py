"""What load()'s content verification costs on a large artifact: the first open hashes every
file, later opens only stat them (modelkiln.integrity), verify=False checks sizes.

    python bench/verify_cost.py --work /tmp/kiln-verify [--gib 2]

Builds a tiny ViT artifact under WORK, adds a GIB-sized weights file to it and reseals its
kiln.json, then times open_artifact three ways with a fresh verification cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from modelkiln import build, testing
from modelkiln.artifact import MANIFEST_NAME, record_files
from modelkiln.loading import open_artifact
from modelkiln.records import seal

_CHUNK = 1 << 20


def large_artifact(work: Path, gib: float) -> Path:
    source = work / "vit"
    if not source.is_dir():
        testing.tiny_hf_vit(source, classifier=True)
    root = work / "artifact"
    if not root.is_dir():
        build(source, "vit-onnxruntime-fp32", root)
    weights = root / "weights.bin"
    if not weights.is_file() or weights.stat().st_size != int(gib * (1 << 30)):
        with weights.open("wb") as file:
            for _ in range(int(gib * 1024)):
                file.write(os.urandom(_CHUNK))
    document = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    document["files"] = {
        name: {"size": record.size, "sha256": record.sha256}
        for name, record in record_files(root).items()
    }
    document.pop("manifest_sha256", None)
    (root / MANIFEST_NAME).write_text(json.dumps(seal(document), indent=2), encoding="utf-8")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--gib", type=float, default=2.0)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    root = large_artifact(args.work, args.gib)
    cache = args.work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["MODELKILN_CACHE"] = str(cache)
    size = sum(record.size for record in open_artifact(root, verify=False).manifest.files.values())
    print(f"artifact: {size / (1 << 30):.2f} GiB")
    for label, verify in (
        ("first open, verify=True (hashes)", True),
        ("second open, verify=True (remembered)", True),
        ("verify=False (sizes only)", False),
    ):
        started = time.perf_counter()
        open_artifact(root, verify=verify)
        print(f"{label}: {(time.perf_counter() - started) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
