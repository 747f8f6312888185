"""Peak memory of the streamed ONNX export of an SD 3.5 Large-width transformer, with and
without the lazy folding of weight transposes (exporters/onnx.py), each in a fresh process.

    python bench/transformer_export_memory.py --work /tmp/kiln-mmdit [--blocks 3]

The transformer has SD 3.5 Large's config (hidden 2432, 38 heads, T5 width 4096, qk-norm) but
only BLOCKS of its 38 blocks, random weights saved once as fp32 safetensors under WORK. Each
step exports it from the meta-device graph with the weights streamed from that checkpoint
(what `kiln build` does) and reports its peak RSS against the weights' bytes; "eager-fold"
is onnxscript's optimizer folding every Transpose(weight) in memory, as before the change.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from modelkiln.testing.large import SD35_LARGE_TRANSFORMER

STEP = """
import json, sys
from pathlib import Path
from modelkiln.env import peak_rss_bytes
import modelkiln.exporters.onnx as onnx_exporter
from modelkiln.models import stable_diffusion_modules as modules
from modelkiln.models.diffusion_transformers import StableDiffusion3Family
from modelkiln.plan import load_profile
from modelkiln.specs import ComponentSpec

folder, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
if mode == "eager-fold":
    onnx_exporter._fold_weight_transposes = lambda model: 0
profile = load_profile("sd3-onnxruntime-fp32", ["export.external_data=always"])
config = json.loads((folder / "config.json").read_text())
sequences = {"text_encoder": 77, "text_encoder_3": 256}
dims = {"latent_height": 128, "latent_width": 128, "height": 1024, "width": 1024}
inputs, outputs = StableDiffusion3Family._signature("transformer", config, sequences, dims)
spec = ComponentSpec(
    name="transformer",
    module=lambda: modules.wrap("transformer", modules.load_component(folder, pickle=False),
                                "sd3", None),
    meta_module=lambda: modules.wrap("transformer", modules.meta_component(folder), "sd3", None),
    checkpoint=tuple(sorted(folder.glob("*.safetensors"))),
    inputs=inputs, outputs=outputs, save_reference=lambda path: None, path="transformer",
    default_dims=dims, batch_factor=2,
)
marks = {}
streamed = onnx_exporter._streamed_program
def measured(spec, profile):
    program = streamed(spec, profile)
    assert program is not None, "the export did not stream"
    marks["before_save"] = peak_rss_bytes()
    return program
onnx_exporter._streamed_program = measured
onnx_exporter.onnx_from_torch(spec, spec.module, profile, out / "model.onnx")
print(json.dumps({**marks, "peak": peak_rss_bytes()}))
"""


def source(work: Path, blocks: int) -> tuple[Path, int]:
    folder = work / f"sd35-large-{blocks}-blocks"
    if not (folder / "config.json").is_file():
        import torch
        from diffusers import SD3Transformer2DModel

        torch.manual_seed(0)
        model = SD3Transformer2DModel(**{**SD35_LARGE_TRANSFORMER, "num_layers": blocks})
        model.save_pretrained(folder, safe_serialization=True)
        del model
    from modelkiln.memory_budget import fp32_bytes

    return folder, fp32_bytes(folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--blocks", type=int, default=3)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folder, weights = source(args.work, args.blocks)
    results: dict[str, Any] = {"weights_bytes": weights}
    for mode in ("lazy-fold", "eager-fold"):
        out = args.work / f"onnx-{mode}"
        command = [sys.executable, "-c", STEP, str(folder), str(out), mode]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        results[mode] = measured
        print(
            f"{mode:10}  {args.blocks} blocks, {weights / 1e9:.2f} GB fp32 weights: peak RSS "
            f"before saving {measured['before_save'] / 1e9:.2f} GB, overall "
            f"{measured['peak'] / 1e9:.2f} GB ({measured['peak'] / weights:.2f}x the weights)",
            flush=True,
        )
    (args.work / "transformer_export_memory.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
