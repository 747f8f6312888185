"""Synthetic bench reports that follow the schema: what compare and report tests start from."""

from __future__ import annotations

import copy
import statistics
from typing import Any

import numpy as np

MACHINE = {
    "fingerprint": "0123456789abcdef",
    "cpu": {
        "model": "Intel(R) Xeon(R) Platinum 8480+",
        "logical_cores": 2,
        "usable_cores": 2,
        "features": ["avx512f", "avx512_vnni", "amx_bf16", "amx_int8"],
    },
    "platform": "Linux-6.8-x86_64",
    "machine": "x86_64",
    "python": "3.12.3",
    "libraries": {"modelkiln": "0.1.0", "onnxruntime": "1.23.2", "openvino": "2025.3.0"},
}
SETTINGS = {
    "batch_sizes": [1, 8],
    "warmup": 3,
    "runs": 20,
    "duration_s": None,
    "threads": 2,
    "isolate": True,
    "runtime": None,
    "data": None,
    "prompts": None,
    "steps": 4,
}


def latency(samples: list[float]) -> dict[str, Any]:
    values = np.asarray(samples)
    return {
        "runs": len(samples),
        "mean_s": float(values.mean()),
        "p50_s": float(np.percentile(values, 50)),
        "p90_s": float(np.percentile(values, 90)),
        "p99_s": float(np.percentile(values, 99)),
        "stdev_s": statistics.stdev(samples) if len(samples) > 1 else 0.0,
        "min_s": float(values.min()),
        "max_s": float(values.max()),
        "samples": [float(v) for v in samples],
    }


def noisy(median_s: float, runs: int = 20, spread: float = 0.02, seed: int = 0) -> list[float]:
    """`runs` samples around `median_s` with a relative spread."""
    rng = np.random.default_rng(seed)
    return [float(median_s * (1 + spread * x)) for x in rng.standard_normal(runs)]


def entry(
    profile: str = "vit-openvino-int8",
    batch_size: int = 1,
    median_s: float = 0.010,
    *,
    runtime: str = "openvino",
    source_hash: str = "a1b2c3d4e5f60718",
    top1: float | None = 98.5,
    peak_rss_bytes: int | None = 500_000_000,
    seed: int = 0,
    spread: float = 0.02,
) -> dict[str, Any]:
    samples = noisy(median_s, spread=spread, seed=seed)
    measured = latency(samples)
    accuracy = None
    if top1 is not None:
        accuracy = {
            "metric": "top1",
            "score": top1,
            "data": "/data/digits",
            "images": 360,
            "top1": top1,
            "top5": 100.0,
            "reference_top1_agreement": 99.7,
            "reference_cosine": 0.9998,
        }
    return {
        "key": f"{source_hash}/{profile}/{runtime}/b{batch_size}",
        "artifact": f"/work/artifacts/{profile}",
        "name": profile,
        "profile": profile,
        "family": "vit",
        "task": "image-classification",
        "format": "openvino" if runtime == "openvino" else "onnx",
        "runtime": runtime,
        "inference_precision": "f32",
        "source": "/work/models/digits-vit",
        "source_hash": source_hash,
        "batch_size": batch_size,
        "threads": 2,
        "load_s": 0.4,
        "first_inference_s": 0.05,
        "latency": measured,
        "throughput_per_s": batch_size / measured["mean_s"],
        "stages": {},
        "images_per_s": None,
        "peak_rss_bytes": peak_rss_bytes,
        "size_bytes": 400_000,
        "accuracy": accuracy,
    }


def report(entries: list[dict[str, Any]] | None = None, **machine: Any) -> dict[str, Any]:
    """A whole report; `machine` overrides fields of the machine block (e.g. fingerprint)."""
    if entries is None:
        entries = [entry(batch_size=1, median_s=0.010), entry(batch_size=8, median_s=0.060)]
    return {
        "schema": "modelkiln-bench-report",
        "schema_version": 1,
        "created": "2026-12-01T12:00:00Z",
        "modelkiln_version": "0.1.0",
        "machine": {**copy.deepcopy(MACHINE), **machine},
        "settings": copy.deepcopy(SETTINGS),
        "entries": entries,
    }


def diffusion_entry(psnr: list[float | None] | None = None) -> dict[str, Any]:
    """A 12 s generation with stage timings and PSNR / SSIM against torch fp32."""
    psnr = [None, 31.4] if psnr is None else psnr
    measured = hand_set("sd-openvino-int8", 1, [11.9, 12.0, 12.1], top1=None)
    measured["family"], measured["task"] = "sd", "text-to-image"
    measured["stages"] = {
        "text_encoder": latency([0.0198, 0.0200, 0.0202]),
        # One UNet call per step: 4 steps in each of the 3 generations.
        "unet_step": latency(noisy(2.5, runs=12, seed=4)),
        "vae_decode": latency([1.1, 1.1, 1.1]),
    }
    measured["images_per_s"] = 1 / 12.0
    measured["size_bytes"] = 2_500_000_000
    measured["peak_rss_bytes"] = 3_200_000_000
    real = [value for value in psnr if value is not None]
    measured["accuracy"] = {
        "metric": "psnr_db",
        "score": min(real) if real else None,
        "prompts": ["a red car", "a lighthouse"][: len(psnr)],
        "psnr_db": psnr,
        "ssim": [1.0, 0.9876][: len(psnr)],
    }
    return measured


def hand_set(profile: str, batch_size: int, samples: list[float], **kwargs: Any) -> dict[str, Any]:
    """An entry whose latency is exactly `samples` (so its table cells are known)."""
    measured = entry(profile, batch_size, **kwargs)
    measured["latency"] = latency(samples)
    measured["throughput_per_s"] = batch_size / measured["latency"]["mean_s"]
    return measured


def full_report() -> dict[str, Any]:
    """Three artifacts x two batch sizes, ONNX fp32 without accuracy, one diffusion entry."""
    return report(
        [
            hand_set("vit-openvino-int8", 1, [0.0121, 0.0123, 0.0125]),
            entry("vit-openvino-int8", 8, 0.060),
            hand_set("vit-onnxruntime-fp32", 1, [0.0246] * 3, runtime="onnxruntime", top1=None),
            entry("vit-onnxruntime-fp32", 8, 0.200, runtime="onnxruntime", top1=None, seed=1),
            diffusion_entry(),
        ]
    )
