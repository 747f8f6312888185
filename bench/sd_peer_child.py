"""One SD peer for bench/sd_approximations.py --peers, in the Python environment it needs
(optimum-intel's lives in .venv-optimum, `make compat`; OpenVINO GenAI's in ours). No
modelkiln import: this file runs in either.

    PYTHON bench/sd_peer_child.py export SOURCE OUT --weights int8|hybrid [--prompts a;b]
                                  [--samples 40]
    PYTHON bench/sd_peer_child.py serve optimum-intel|genai FOLDER --size 512 --threads 2
                                  [--guidance 7.5]

`export` writes optimum-intel's OpenVINO export of a diffusers SD folder, as its docs make
one: `--weights int8` compresses every weight to int8 (nncf, what `optimum-cli export
openvino --weight-format int8` does); `hybrid` also quantizes the UNet's activations on the
prompts (optimum-intel's hybrid quantization for diffusion, what `--dataset` adds), on the
first SAMPLES UNet calls its fp32 pipeline makes for them (its num_samples).

`serve` loads FOLDER once, reshaped static to one SIZE×SIZE image (and GenAI to the guidance)
as both peers' docs advise for speed, and prints `@@ready`; then each stdin line
`{"steps": N, "out": PATH, "prompt": TEXT, "guidance": G}` generates one image from seed 0,
writes it to PATH and prints `@@done`. EOF ends it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def export(source: Path, out: Path, weights: str, prompts: list[str], samples: int) -> None:
    import tempfile

    from optimum.intel import OVStableDiffusionPipeline, OVWeightQuantizationConfig

    if weights == "int8":
        config = OVWeightQuantizationConfig(bits=8)
    else:  # int8 weights, and the UNet's activations quantized on the prompts' activations
        config = OVWeightQuantizationConfig(
            bits=8, dataset=prompts, num_samples=samples, quant_method="hybrid"
        )
    with tempfile.TemporaryDirectory() as scratch:
        pipeline = OVStableDiffusionPipeline.from_pretrained(
            transformers4_view(source, Path(scratch)),
            export=True,
            compile=False,
            quantization_config=config,
        )
        pipeline.save_pretrained(out)


def transformers4_view(source: Path, scratch: Path) -> Path:
    """`source` as optimum's transformers 4 reads it the way ours (transformers 5) wrote it:
    the CLIP tokenizer, saved as tokenizer.json alone, read as the fast one (model_index.json
    says so), and each CLIP text encoder's weights under `text_model.`, where transformers 4
    looks for them (without it, it initializes the encoder at random and only warns). The
    other folders are links."""
    index = json.loads((source / "model_index.json").read_text())
    for name, entry in index.items():
        if isinstance(entry, list) and entry[1] == "CLIPTokenizer":
            index[name] = [entry[0], "CLIPTokenizerFast"]
    encoders = {
        name
        for name, entry in index.items()
        if isinstance(entry, list) and entry[1] in ("CLIPTextModel", "CLIPTextModelWithProjection")
    }
    for path in source.iterdir():
        if path.name in encoders:
            _prefixed_text_encoder(path, scratch / path.name)
        elif path.name != "model_index.json":
            (scratch / path.name).symlink_to(path)
    (scratch / "model_index.json").write_text(json.dumps(index))
    return scratch


def _prefixed_text_encoder(folder: Path, out: Path) -> None:
    from safetensors.numpy import load_file, save_file

    def prefixed(key: str) -> str:
        return key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}"

    out.mkdir()
    for path in folder.iterdir():
        if path.suffix == ".safetensors":
            weights = {prefixed(key): value for key, value in load_file(path).items()}
            save_file(weights, out / path.name, metadata={"format": "pt"})
        elif path.name.endswith(".safetensors.index.json"):  # a sharded checkpoint's map
            index = json.loads(path.read_text())
            index["weight_map"] = {prefixed(k): v for k, v in index["weight_map"].items()}
            (out / path.name).write_text(json.dumps(index))
        else:
            (out / path.name).symlink_to(path)


def open_pipeline(kind: str, folder: Path, size: int, threads: int, guidance: float) -> Any:
    """(prompt, steps, guidance) -> a PIL image, seeded 0. GenAI's reshape fixes the
    guidance (its UNet's batch): a request must ask for the same."""
    if kind == "genai":
        import numpy as np
        import openvino_genai as genai
        from PIL import Image

        pipeline = genai.Text2ImagePipeline(str(folder))
        pipeline.reshape(1, size, size, guidance)
        pipeline.compile("CPU", INFERENCE_NUM_THREADS=threads)

        def generate_genai(prompt: str, steps: int, guidance: float) -> Any:
            tensor = pipeline.generate(
                prompt,
                width=size,
                height=size,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=genai.TorchGenerator(0),
            )
            return Image.fromarray(np.asarray(tensor.data[0]))

        return generate_genai
    import torch
    from optimum.intel import OVStableDiffusionPipeline

    torch.set_num_threads(threads)
    config = {"INFERENCE_NUM_THREADS": str(threads)}
    optimum = OVStableDiffusionPipeline.from_pretrained(folder, compile=False, ov_config=config)
    optimum.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
    optimum.compile()
    optimum.set_progress_bar_config(disable=True)

    def generate_optimum(prompt: str, steps: int, guidance: float) -> Any:
        generator = torch.Generator().manual_seed(0)
        return optimum(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=generator,
        ).images[0]

    return generate_optimum


def serve(kind: str, folder: Path, size: int, threads: int, guidance: float) -> None:
    generate = open_pipeline(kind, folder, size, threads, guidance)
    print("@@ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        image = generate(request["prompt"], request["steps"], request["guidance"])
        image.save(request["out"])
        print("@@done", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    exporting = commands.add_parser("export")
    exporting.add_argument("source", type=Path)
    exporting.add_argument("out", type=Path)
    exporting.add_argument("--weights", choices=["int8", "hybrid"], required=True)
    exporting.add_argument("--prompts", default="a photograph of an astronaut riding a horse")
    exporting.add_argument("--samples", type=int, default=40)
    serving = commands.add_parser("serve")
    serving.add_argument("kind", choices=["optimum-intel", "genai"])
    serving.add_argument("folder", type=Path)
    serving.add_argument("--size", type=int, default=512)
    serving.add_argument("--threads", type=int, default=2)
    serving.add_argument("--guidance", type=float, default=7.5)
    args = parser.parse_args()
    if args.command == "export":
        export(args.source, args.out, args.weights, args.prompts.split(";"), args.samples)
    else:
        serve(args.kind, args.folder, args.size, args.threads, args.guidance)


if __name__ == "__main__":
    main()
