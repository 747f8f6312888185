"""The peers for bench/vit_speed.py: the same ViT exported and run by optimum's own classes.

Runs in .venv-optimum (optimum-intel, optimum-onnx and their transformers; `make compat`
creates it), one peer per process, called by vit_speed.py as

    .venv-optimum/bin/python bench/optimum_peers.py --work WORK --child NAME [--runs N]

  optimum-intel-openvino  `optimum-cli export openvino --model SRC` (fp32 weights; OpenVINO
                          runs it in its default precision: bf16 on AMX), run by
                          OVModelForImageClassification
  optimum-intel-int8      the same with --weight-format int8 (nncf weight compression)
  optimum-intel-int4      the same with --weight-format int4
  optimum-intel-nf4       the same with --weight-format nf4
  optimum-onnx-fp32       ORTModelForImageClassification's export, run by the same class
  optimum-onnx-int8       that export + ORTQuantizer with
                          AutoQuantizationConfig.avx512_vnni(is_static=False)

Prints one JSON line: the timed calls at batch 1 and 8 (same feeds and timing as vit_speed.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BATCHES = (1, 8)


def samples_seconds(run: Any, batch: int, runs: int) -> list[float]:
    import numpy as np
    import torch

    pixels = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    tensor = torch.from_numpy(pixels)
    for _ in range(3):
        run(tensor)
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        run(tensor)
        samples.append(time.perf_counter() - started)
    return samples


def openvino_peer(
    source: Path, out: Path, threads: int, weight_format: str | None = None
) -> tuple[Any, str]:
    from optimum.intel import OVModelForImageClassification

    if not (out / "openvino_model.xml").is_file():
        cli = Path(sys.executable).with_name("optimum-cli")
        command = [str(cli), "export", "openvino", "--model", str(source)]
        if weight_format is not None:
            command += ["--weight-format", weight_format]
        subprocess.run([*command, "--task", "image-classification", str(out)], check=True)
    config = {"INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY"}
    model = OVModelForImageClassification.from_pretrained(out, ov_config=config)
    # optimum-intel keeps the CompiledModel (older releases: an InferRequest) in .request.
    compiled = getattr(model.request, "get_compiled_model", lambda: model.request)()
    precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    name = getattr(precision, "get_type_name", lambda: str(precision))()
    return model, f"openvino ({name})"


def onnx_fp32_peer(source: Path, out: Path, threads: int) -> tuple[Any, str]:
    import onnxruntime
    from optimum.onnxruntime import ORTModelForImageClassification

    if not (out / "model.onnx").is_file():
        ORTModelForImageClassification.from_pretrained(source, export=True).save_pretrained(out)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    model = ORTModelForImageClassification.from_pretrained(out, session_options=options)
    return model, "onnxruntime (f32)"


def onnx_int8_peer(source: Path, out: Path, threads: int) -> tuple[Any, str]:
    import onnxruntime
    from optimum.onnxruntime import ORTModelForImageClassification, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    if not (out / "model_quantized.onnx").is_file():
        exported = ORTModelForImageClassification.from_pretrained(source, export=True)
        exported.save_pretrained(out / "fp32")
        quantizer = ORTQuantizer.from_pretrained(out / "fp32")
        config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
        quantizer.quantize(save_dir=out, quantization_config=config)
        for path in (out / "fp32").iterdir():  # only the quantized model counts for size
            path.unlink()
        (out / "fp32").rmdir()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    model = ORTModelForImageClassification.from_pretrained(
        out, file_name="model_quantized.onnx", session_options=options
    )
    return model, "onnxruntime (int8 dynamic)"


PEERS: dict[str, Any] = {
    "optimum-intel-openvino": openvino_peer,
    "optimum-intel-int8": lambda s, o, t: openvino_peer(s, o, t, "int8"),
    "optimum-intel-int4": lambda s, o, t: openvino_peer(s, o, t, "int4"),
    "optimum-intel-nf4": lambda s, o, t: openvino_peer(s, o, t, "nf4"),
    "optimum-onnx-fp32": onnx_fp32_peer,
    "optimum-onnx-int8": onnx_int8_peer,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--child", required=True, choices=sorted(PEERS))
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    source, out = args.work / "vit-b16", args.work / "peers" / args.child
    model, backend = PEERS[args.child](source, out, args.threads)

    def run(pixels: Any) -> Any:
        with torch.inference_mode():
            return model(pixel_values=pixels).logits

    result = {"backend": backend}
    result.update({f"batch{b}_samples": samples_seconds(run, b, args.runs) for b in BATCHES})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
