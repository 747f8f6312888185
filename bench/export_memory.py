"""Peak memory and time of each way to export an SD-1.5-sized UNet to ONNX and OpenVINO IR.

    python bench/export_memory.py --model sd15-unet --out /tmp/x [--steps a,b] [--json FILE]

Every path runs in a fresh child process (this script with --step) so its peak RSS is its own:
a child reports ru_maxrss, which counts the interpreter, the imports, the weights and every
transient copy. A sampler thread splits the peak into anonymous and file-backed pages, which
tells an mmap'd weight file (RssFile, evictable) from a copy (RssAnon). The weights are random
(built from the config with a fixed seed): no checkpoint is downloaded.

After the exports, the checks run the torch module, the ONNX file (onnxruntime) and every kept
IR (OpenVINO CPU, f32) on one batch-2 input and report max-abs differences.

One function per export path, so the bodies can later be swapped for modelkiln's exporters.
The parent only orchestrates (stdlib, plus numpy for the final comparison) so its own memory
cannot leak into a child's ru_maxrss through fork/exec.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import openvino as ov
    import torch

# The real runwayml/stable-diffusion-v1-5 unet/config.json (859.5 M parameters, 3.44 GB fp32).
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
# Same topology, a few MB: checks the script end to end in about a minute.
TINY_UNET: dict[str, Any] = {
    **SD15_UNET,
    "sample_size": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
}
MODELS = {"sd15-unet": SD15_UNET, "tiny-unet": TINY_UNET}

SEED = 0
TEXT_TOKENS = 77
EXAMPLE_BATCH = 2  # a dynamic dim traced at 1 would be specialised
OPSET = 18
INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states")
OUTPUT_NAME = "out_sample"
ONNX_FILE = "model.onnx"
ONNX_DATA = "model.onnx_data"
IR_FILE = "openvino_model.xml"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
BOUND = 1.3  # the target: peak RSS <= BOUND x fp32 weight bytes
GB = 1e9
SAMPLE_EVERY_S = 0.02


# --- measurement (child side) -----------------------------------------------------------------


def _proc_status() -> dict[str, int]:
    """VmRSS / RssAnon / RssFile of this process in bytes (Linux)."""
    fields: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def _ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Probe:
    """Phase marks (time, RSS, peak so far) plus sampled peaks of anonymous and file pages.

    ru_maxrss is exact; the sampled split can miss a short spike while a C call holds the GIL.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: list[dict[str, Any]] = []
        self.peak_anon = 0
        self.peak_file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            status = _proc_status()
            self.peak_anon = max(self.peak_anon, status.get("RssAnon", 0))
            self.peak_file = max(self.peak_file, status.get("RssFile", 0))

    def mark(self, phase: str) -> None:
        self.phases.append(
            {
                "phase": phase,
                "t_s": round(time.perf_counter() - self.start, 2),
                "rss_bytes": _proc_status()["VmRSS"],
                "peak_bytes": _ru_maxrss(),
            }
        )

    def finish(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        return {
            "wall_s": round(time.perf_counter() - self.start, 2),
            "peak_bytes": _ru_maxrss(),
            "peak_anon_bytes": self.peak_anon,
            "peak_file_bytes": self.peak_file,
            "phases": self.phases,
        }


@dataclass
class Ctx:
    """What a step gets: the model config, where to write, and the probe to mark phases on."""

    model: str
    root: Path
    out: Path  # this step's own folder
    probe: Probe
    arg: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> dict[str, Any]:
        return MODELS[self.model]


# --- model and inputs -------------------------------------------------------------------------


def example_inputs(config: dict[str, Any], batch: int = EXAMPLE_BATCH) -> dict[str, np.ndarray]:
    """One fixed batch. timestep is int64 [batch], as optimum's dummy generator makes it."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    size = config["sample_size"]
    return {
        "sample": rng.standard_normal((batch, config["in_channels"], size, size), np.float32),
        "timestep": rng.integers(0, 1000, size=(batch,), dtype=np.int64),
        "encoder_hidden_states": rng.standard_normal(
            (batch, TEXT_TOKENS, config["cross_attention_dim"]), np.float32
        ),
    }


def torch_args(config: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    import torch

    inputs = example_inputs(config)
    return tuple(torch.from_numpy(inputs[name]) for name in INPUT_NAMES)


def build_unet(config: dict[str, Any]) -> torch.nn.Module:
    """Random init from the config; the seed makes every child build the same weights."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED)
    return UNet2DConditionModel.from_config(config).eval()


def load_unet_mmap(config: dict[str, Any], weights: Path) -> torch.nn.Module:
    """Parameters on the meta device, then assigned the safetensors tensors (views of an mmap)."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    # assign=True keeps the loaded tensors instead of copying into fresh parameters.
    unet.load_state_dict(load_file(weights), strict=True, assign=True)
    return unet.eval()


def load_unet_pretrained(weights_dir: Path) -> torch.nn.Module:
    """diffusers' own loader (without accelerate it falls back to low_cpu_mem_usage=False)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(weights_dir).eval()


def wrap(unet: torch.nn.Module) -> torch.nn.Module:
    """Positional (sample, timestep, encoder_hidden_states) -> out_sample, as optimum exports."""
    import torch

    class UNetWrapper(torch.nn.Module):
        def __init__(self, unet: torch.nn.Module) -> None:
            super().__init__()
            self.unet = unet

        def forward(
            self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
        ) -> torch.Tensor:
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    return UNetWrapper(unet).eval()


def dynamic_batch() -> dict[str, dict[int, Any]]:
    """One shared batch Dim: diffusers expands timestep to sample's batch, so they must agree."""
    import torch

    batch = torch.export.Dim("batch", min=1)
    return {name: {0: batch} for name in INPUT_NAMES}


def weights_dir(ctx: Ctx) -> Path:
    path = ctx.root / "weights"
    if not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path / WEIGHTS_FILE} missing: run the 'weights' step first")
    return path


def onnx_source(ctx: Ctx) -> Path:
    path = ctx.root / "onnx-dynamo" / ONNX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: run the 'onnx-dynamo' step first")
    return path


# --- export paths: ONNX -----------------------------------------------------------------------


def onnx_dynamo(
    module: torch.nn.Module, ctx: Ctx, *, optimize: bool = True, release: bool = False
) -> Path:
    """torch.onnx.export(dynamo=True) then onnx_ir.save: one model.onnx + one model.onnx_data."""
    import onnx_ir
    import torch

    program = torch.onnx.export(
        module,
        torch_args(ctx.config),
        dynamo=True,
        input_names=list(INPUT_NAMES),
        output_names=[OUTPUT_NAME],
        dynamic_shapes=dynamic_batch(),
        opset_version=OPSET,
        optimize=optimize,
        verbose=False,
    )
    assert program is not None  # only the legacy exporter returns None
    ctx.probe.mark("exported")
    model = program.model
    if release:
        # The initializers wrap the module's own tensors, so this can only free bookkeeping.
        program.exported_program = None  # type: ignore[assignment]
        del program, module
        gc.collect()
        ctx.probe.mark("released")
    path = ctx.out / ONNX_FILE
    onnx_ir.save(model, path, external_data=ONNX_DATA)
    ctx.probe.mark("saved")
    return path


def step_build(ctx: Ctx) -> None:
    """Baseline: imports, then the random-init UNet, nothing else."""
    import diffusers  # noqa: F401
    import torch

    ctx.probe.mark("imported")
    unet = build_unet(ctx.config)
    ctx.probe.mark("built")
    ctx.info["parameters"] = sum(p.numel() for p in unet.parameters())
    ctx.info["weight_bytes"] = sum(p.numel() * p.element_size() for p in unet.parameters())
    ctx.info["torch_threads"] = torch.get_num_threads()


def step_weights(ctx: Ctx) -> None:
    """Prep for the loading variants: save_pretrained (config.json + one .safetensors)."""
    unet = build_unet(ctx.config)
    ctx.probe.mark("built")
    unet.save_pretrained(ctx.out, safe_serialization=True)  # type: ignore[operator]
    ctx.probe.mark("saved")


def step_load_mmap(ctx: Ctx) -> None:
    """Baseline for the mmap loader: meta init + safetensors views, then every page touched."""
    import torch

    unet = load_unet_mmap(ctx.config, weights_dir(ctx) / WEIGHTS_FILE)
    ctx.probe.mark("loaded")
    with torch.inference_mode():
        ctx.info["checksum"] = float(sum(p.double().sum() for p in unet.parameters()))
    ctx.probe.mark("touched")


def step_onnx_dynamo(ctx: Ctx) -> None:
    module = wrap(build_unet(ctx.config))
    ctx.probe.mark("built")
    onnx_dynamo(module, ctx)


def step_onnx_dynamo_noopt(ctx: Ctx) -> None:
    module = wrap(build_unet(ctx.config))
    ctx.probe.mark("built")
    onnx_dynamo(module, ctx, optimize=False)


def step_onnx_dynamo_release(ctx: Ctx) -> None:
    module = wrap(build_unet(ctx.config))
    ctx.probe.mark("built")
    # onnx_dynamo holds the last reference once this frame lets go of the module.
    holder = [module]
    del module
    onnx_dynamo(holder.pop(), ctx, release=True)


def step_onnx_dynamo_nograd(ctx: Ctx) -> None:
    import torch

    unet = build_unet(ctx.config).requires_grad_(False)
    ctx.probe.mark("built")
    with torch.inference_mode():
        onnx_dynamo(wrap(unet), ctx)


def step_onnx_dynamo_mmap(ctx: Ctx) -> None:
    module = wrap(load_unet_mmap(ctx.config, weights_dir(ctx) / WEIGHTS_FILE))
    ctx.probe.mark("loaded")
    onnx_dynamo(module, ctx)


def step_onnx_dynamo_pretrained(ctx: Ctx) -> None:
    module = wrap(load_unet_pretrained(weights_dir(ctx)))
    ctx.probe.mark("loaded")
    onnx_dynamo(module, ctx)


def step_onnx_legacy(ctx: Ctx) -> None:
    """Reference: the TorchScript exporter (one external file per tensor past 2 GB)."""
    import torch

    module = wrap(build_unet(ctx.config))
    ctx.probe.mark("built")
    torch.onnx.export(
        module,
        torch_args(ctx.config),
        str(ctx.out / ONNX_FILE),
        dynamo=False,
        input_names=list(INPUT_NAMES),
        output_names=[OUTPUT_NAME],
        dynamic_axes={name: {0: "batch"} for name in [*INPUT_NAMES, OUTPUT_NAME]},
        opset_version=OPSET,
    )
    ctx.probe.mark("saved")


# --- export paths: OpenVINO -------------------------------------------------------------------


def save_ir(model: ov.Model, ctx: Ctx) -> Path:
    import openvino as ov

    path = ctx.out / IR_FILE
    ov.save_model(model, str(path), compress_to_fp16=False)
    ctx.probe.mark("saved")
    return path


def step_ov_convert_onnx(ctx: Ctx) -> None:
    """ov.convert_model(path): with share_weights (the default) external data is mmap'd."""
    import openvino as ov

    model = ov.convert_model(str(onnx_source(ctx)))
    ctx.probe.mark("converted")
    save_ir(model, ctx)


def step_ov_convert_onnx_copy(ctx: Ctx) -> None:
    import openvino as ov

    model = ov.convert_model(str(onnx_source(ctx)), share_weights=False)
    ctx.probe.mark("converted")
    save_ir(model, ctx)


def step_ov_read_onnx(ctx: Ctx) -> None:
    """Core.read_model(path): the runtime's reader, ENABLE_MMAP on by default."""
    import openvino as ov

    model = ov.Core().read_model(str(onnx_source(ctx)))
    ctx.probe.mark("read")
    save_ir(model, ctx)


def step_ov_read_onnx_nommap(ctx: Ctx) -> None:
    import openvino as ov

    core = ov.Core()
    core.set_property({"ENABLE_MMAP": False})
    model = core.read_model(str(onnx_source(ctx)))
    ctx.probe.mark("read")
    save_ir(model, ctx)


def _ov_inputs(config: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    import openvino as ov

    size = config["sample_size"]
    return [
        ("sample", ov.PartialShape([-1, config["in_channels"], size, size]), ov.Type.f32),
        ("timestep", ov.PartialShape([-1]), ov.Type.i64),
        (
            "encoder_hidden_states",
            ov.PartialShape([-1, TEXT_TOKENS, config["cross_attention_dim"]]),
            ov.Type.f32,
        ),
    ]


def _ov_from_torch(ctx: Ctx, *, dynamo: bool) -> None:
    import openvino as ov
    import torch

    module = wrap(build_unet(ctx.config))
    ctx.probe.mark("built")
    with torch.no_grad():
        model = ov.convert_model(
            module, example_input=torch_args(ctx.config), input=_ov_inputs(ctx.config), dynamo=dynamo
        )
    ctx.probe.mark("converted")
    # Tracing does not carry the wrapper's output name through.
    model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    save_ir(model, ctx)


def step_ov_torch(ctx: Ctx) -> None:
    """Reference: ov.convert_model on the module (TorchScript tracing)."""
    _ov_from_torch(ctx, dynamo=False)


def step_ov_torch_dynamo(ctx: Ctx) -> None:
    """ov.convert_model(module, dynamo=True): torch.export instead of tracing."""
    _ov_from_torch(ctx, dynamo=True)


# --- checks -----------------------------------------------------------------------------------


def _save_output(ctx: Ctx, name: str, value: Any) -> None:
    import numpy as np

    checks = ctx.root / "checks"
    checks.mkdir(exist_ok=True)
    np.save(checks / f"{name}.npy", np.asarray(value, dtype=np.float32))


def step_run_torch(ctx: Ctx) -> None:
    import torch

    module = wrap(build_unet(ctx.config))
    ctx.probe.mark("built")
    with torch.inference_mode():
        out = module(*torch_args(ctx.config))
    ctx.probe.mark("ran")
    _save_output(ctx, "torch", out.numpy())


def step_run_ort(ctx: Ctx) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_source(ctx)), providers=["CPUExecutionProvider"])
    ctx.probe.mark("loaded")
    (out,) = session.run([OUTPUT_NAME], example_inputs(ctx.config))
    ctx.probe.mark("ran")
    _save_output(ctx, "onnxruntime", out)


def step_run_ov(ctx: Ctx) -> None:
    """Compile one IR (named by --arg) on CPU in f32: the default may be bf16 on AMX CPUs."""
    import openvino as ov

    assert ctx.arg is not None, "run-ov needs --arg <ov step name>"
    compiled = ov.Core().compile_model(
        str(ctx.root / ctx.arg / IR_FILE), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    ctx.probe.mark("compiled")
    out = compiled(example_inputs(ctx.config))[OUTPUT_NAME]
    ctx.probe.mark("ran")
    _save_output(ctx, ctx.arg, out)


# --- registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    run: Callable[[Ctx], None]
    what: str
    kind: str  # "baseline" | "prep" | "onnx" | "openvino" | "check"
    keep: bool = False  # keep the output after counting it (a later step reads it)


STEPS: dict[str, Step] = {
    "build": Step(step_build, "import + random-init UNet", "baseline"),
    "weights": Step(step_weights, "save_pretrained -> safetensors", "prep", keep=True),
    "load-mmap": Step(step_load_mmap, "meta + safetensors mmap, pages touched", "baseline"),
    "onnx-dynamo": Step(step_onnx_dynamo, "dynamo=True + onnx_ir.save", "onnx", keep=True),
    "onnx-dynamo-noopt": Step(step_onnx_dynamo_noopt, "... optimize=False", "onnx"),
    "onnx-dynamo-release": Step(
        step_onnx_dynamo_release, "... drop module/program before save", "onnx"
    ),
    "onnx-dynamo-nograd": Step(
        step_onnx_dynamo_nograd, "... requires_grad_(False) + inference_mode", "onnx"
    ),
    "onnx-dynamo-mmap": Step(step_onnx_dynamo_mmap, "... from meta + safetensors mmap", "onnx"),
    "onnx-dynamo-pretrained": Step(
        step_onnx_dynamo_pretrained, "... from diffusers from_pretrained", "onnx"
    ),
    "onnx-legacy": Step(step_onnx_legacy, "dynamo=False (TorchScript)", "onnx"),
    "ov-onnx-convert": Step(
        step_ov_convert_onnx, "convert_model(onnx) + save_model", "openvino", keep=True
    ),
    "ov-onnx-convert-copy": Step(
        step_ov_convert_onnx_copy, "... share_weights=False", "openvino"
    ),
    "ov-onnx-read": Step(step_ov_read_onnx, "Core.read_model(onnx) + save_model", "openvino", True),
    "ov-onnx-read-nommap": Step(step_ov_read_onnx_nommap, "... ENABLE_MMAP=False", "openvino"),
    "ov-torch": Step(step_ov_torch, "convert_model(module) traced", "openvino", keep=True),
    "ov-torch-dynamo": Step(
        step_ov_torch_dynamo, "convert_model(module, dynamo=True)", "openvino", keep=True
    ),
    "run-torch": Step(step_run_torch, "torch forward", "check", keep=True),
    "run-ort": Step(step_run_ort, "onnxruntime on onnx-dynamo", "check", keep=True),
    "run-ov": Step(step_run_ov, "OpenVINO CPU f32 on one IR", "check", keep=True),
}
EXPORTS = [name for name, step in STEPS.items() if step.kind != "check"]


def run_child(args: argparse.Namespace) -> int:
    probe = Probe()
    step = STEPS[args.step]
    out = Path(args.out) / args.step
    if step.kind != "check":
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
    ctx = Ctx(model=args.model, root=Path(args.out), out=out, probe=probe, arg=args.arg)
    error = None
    try:
        step.run(ctx)
    except Exception as exc:  # a path that fails is a result, not a crash of the benchmark
        traceback.print_exc()
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    result = {"step": args.step, "arg": args.arg, "error": error, **ctx.info, **probe.finish()}
    Path(args.result).write_text(json.dumps(result, indent=1))
    return 0


# --- orchestration (parent side) --------------------------------------------------------------


def spawn(step: str, args: argparse.Namespace, arg: str | None = None) -> dict[str, Any]:
    """Run one step in a fresh interpreter; its output goes to <out>/logs/<step>.log."""
    root = Path(args.out)
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    label = step if arg is None else f"{step}:{arg}"
    result_file = logs / f"{label}.json"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--step", step]
    command += ["--model", args.model, "--out", str(root), "--result", str(result_file)]
    if arg is not None:
        command += ["--arg", arg]
    print(f"  {label} ...", end="", flush=True, file=sys.stderr)
    started = time.perf_counter()
    with (logs / f"{label}.log").open("w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    if result_file.is_file():
        result: dict[str, Any] = json.loads(result_file.read_text())
    else:  # killed (e.g. out of memory) before it could report
        result = {"step": step, "arg": arg, "error": f"child exited with {code}, no result"}
    result["label"] = label
    result["process_s"] = round(time.perf_counter() - started, 2)
    status = result["error"] or f"{result.get('wall_s', 0):.1f} s"
    print(f" {status}", file=sys.stderr)
    return result


def describe_output(result: dict[str, Any], folder: Path, keep: bool) -> None:
    """Count and size what the step wrote; fingerprint IRs; drop outputs nobody reads later."""
    if not folder.is_dir():
        return
    files = [p for p in folder.rglob("*") if p.is_file()]
    result["files"] = len(files)
    result["output_bytes"] = sum(p.stat().st_size for p in files)
    if (folder / IR_FILE).is_file():
        result["ir_sha256"] = {
            p.suffix: _sha256(p) for p in (folder / IR_FILE, folder / IR_FILE.replace("xml", "bin"))
        }
    if not keep:
        shutil.rmtree(folder)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def compare(root: Path) -> list[dict[str, Any]]:
    """Max-abs difference of every output against onnxruntime's (and onnxruntime vs torch)."""
    import numpy as np

    checks = root / "checks"
    outputs = {p.stem: np.load(p) for p in sorted(checks.glob("*.npy"))}
    pairs = [("onnxruntime", "torch")]
    pairs += [(name, "onnxruntime") for name in outputs if name.startswith("ov-")]
    pairs += [(name, "torch") for name in outputs if name.startswith("ov-")]
    rows = []
    for a, b in pairs:
        if a in outputs and b in outputs:
            diff = np.abs(outputs[a].astype(np.float64) - outputs[b])
            rows.append(
                {
                    "a": a,
                    "b": b,
                    "max_abs": float(diff.max()),
                    "identical": bool(np.array_equal(outputs[a], outputs[b])),
                    "ref_max_abs": float(np.abs(outputs[b]).max()),
                }
            )
    return rows


def print_table(results: list[dict[str, Any]], weight_bytes: int | None) -> None:
    bound = f"{BOUND}x = {BOUND * weight_bytes / GB:.2f} GB" if weight_bytes else "unknown"
    print(f"\nfp32 weights: {weight_bytes / GB if weight_bytes else float('nan'):.2f} GB; "
          f"bound {bound}")
    header = f"{'step':28} {'time s':>7} {'peak GB':>8} {'ratio':>6} {'anon/file GB':>13} "
    print(header + f"{'files':>5} {'out GB':>7}  phases (t s / peak GB)")
    for r in results:
        if r.get("error"):
            print(f"{r['label']:28} FAILED  {r['error'][:90]}")
            continue
        ratio = r["peak_bytes"] / weight_bytes if weight_bytes else float("nan")
        flag = " " if ratio <= BOUND else "!"
        split = f"{r['peak_anon_bytes'] / GB:.2f}/{r['peak_file_bytes'] / GB:.2f}"
        phases = ", ".join(
            f"{p['phase']} {p['t_s']:.0f}/{p['peak_bytes'] / GB:.2f}" for p in r["phases"]
        )
        files = r.get("files", "")
        out_gb = f"{r['output_bytes'] / GB:.2f}" if "output_bytes" in r else ""
        print(
            f"{r['label']:28} {r['wall_s']:7.1f} {r['peak_bytes'] / GB:8.2f} {ratio:5.2f}{flag} "
            f"{split:>13} {files:>5} {out_gb:>7}  {phases}"
        )


def print_parity(rows: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
    if rows:
        print("\nparity on one batch-2 input (max-abs difference; |ref| max for scale)")
        for row in rows:
            same = " (bit-identical)" if row["identical"] else ""
            print(f"  {row['a']:22} vs {row['b']:12} {row['max_abs']:.3e}  "
                  f"|ref| {row['ref_max_abs']:.2f}{same}")
    irs: dict[str, list[str]] = {}
    for r in results:
        if "ir_sha256" in r:
            irs.setdefault(json.dumps(r["ir_sha256"], sort_keys=True), []).append(r["label"])
    if len(irs) > 1 or any(len(v) > 1 for v in irs.values()):
        print("\nIR files (xml+bin sha256) grouped where byte-identical:")
        for labels in irs.values():
            print("  " + " = ".join(labels))


def orchestrate(args: argparse.Namespace) -> int:
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    wanted = args.steps.split(",") if args.steps else EXPORTS
    unknown = [s for s in wanted if s not in STEPS or STEPS[s].kind == "check"]
    if unknown:
        raise SystemExit(f"unknown steps {unknown}; choose from {', '.join(EXPORTS)}")
    # build gives the weight size every ratio is relative to; keep the registry's order.
    order = [s for s in EXPORTS if s in wanted or s == "build"]
    print(f"{args.model}: {', '.join(order)} -> {root}", file=sys.stderr)
    results = []
    for name in order:
        result = spawn(name, args)
        describe_output(result, root / name, STEPS[name].keep or args.keep)
        results.append(result)
    weight_bytes = next((r.get("weight_bytes") for r in results if r["step"] == "build"), None)
    parity: list[dict[str, Any]] = []
    if not args.no_check:
        shutil.rmtree(root / "checks", ignore_errors=True)
        checks = [spawn("run-torch", args)]
        if (root / "onnx-dynamo" / ONNX_FILE).is_file():
            checks.append(spawn("run-ort", args))
        for name in order:
            if STEPS[name].kind == "openvino" and (root / name / IR_FILE).is_file():
                checks.append(spawn("run-ov", args, arg=name))
        results += checks
        parity = compare(root)
    print_table(results, weight_bytes)
    print_parity(parity, results)
    if args.json:
        report = {
            "model": args.model,
            "weight_bytes": weight_bytes,
            "bound": BOUND,
            "results": results,
            "parity": parity,
            "versions": _versions(),
        }
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if any(r.get("error") for r in results) else 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0], "cpus": str(os.cpu_count())}
    for package in ("torch", "diffusers", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "openvino"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "missing"
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15-unet")
    parser.add_argument("--out", required=True, help="scratch folder (several GB per step)")
    parser.add_argument("--steps", help=f"comma list, default all: {','.join(EXPORTS)}")
    parser.add_argument("--json", help="write every result here")
    parser.add_argument("--keep", action="store_true", help="keep every step's output")
    parser.add_argument("--no-check", action="store_true", help="skip the parity runs")
    # Internal: one step in this process (what the parent spawns).
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--arg", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return run_child(args) if args.step else orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
