"""How close two 8-bit images are: PSNR and SSIM, for diffusion quality gates and benches.

SSIM is Wang et al. (2004) as scikit-image computes it with `gaussian_weights=True`: an
11-tap Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 255, the mean over the
valid (unpadded) window positions of every channel.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

WINDOW = 11
SIGMA = 1.5
DATA_RANGE = 255.0


def _pixels(image: Any) -> np.ndarray:
    array = np.asarray(image, dtype=np.float64)
    return array[..., None] if array.ndim == 2 else array


def psnr(a: Any, b: Any) -> float:
    """Peak signal-to-noise ratio in dB of two same-size 8-bit images (inf when identical)."""
    x, y = _pixels(a), _pixels(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {x.shape} vs {y.shape}")
    error = float(((x - y) ** 2).mean())
    return float("inf") if error == 0 else float(10 * np.log10(DATA_RANGE**2 / error))


def _gaussian_filter(channel: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable valid-mode filtering: rows, then columns."""
    rows = sliding_window_view(channel, WINDOW, axis=1) @ kernel
    return sliding_window_view(rows, WINDOW, axis=0) @ kernel


def ssim(a: Any, b: Any) -> float:
    """Structural similarity of two same-size 8-bit images, in [-1, 1] (1: identical)."""
    x, y = _pixels(a), _pixels(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {x.shape} vs {y.shape}")
    if min(x.shape[:2]) < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW}x{WINDOW} pixels")
    offsets = np.arange(WINDOW) - WINDOW // 2
    kernel = np.exp(-(offsets**2) / (2 * SIGMA**2))
    kernel /= kernel.sum()
    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
    # skimage's sample-covariance correction for the Gaussian window.
    scale = WINDOW * WINDOW / (WINDOW * WINDOW - 1)
    values = []
    for channel in range(x.shape[2]):
        p, q = x[..., channel], y[..., channel]
        mean_p, mean_q = _gaussian_filter(p, kernel), _gaussian_filter(q, kernel)
        var_p = scale * (_gaussian_filter(p * p, kernel) - mean_p**2)
        var_q = scale * (_gaussian_filter(q * q, kernel) - mean_q**2)
        cov = scale * (_gaussian_filter(p * q, kernel) - mean_p * mean_q)
        numerator = (2 * mean_p * mean_q + c1) * (2 * cov + c2)
        denominator = (mean_p**2 + mean_q**2 + c1) * (var_p + var_q + c2)
        values.append(float((numerator / denominator).mean()))
    return float(np.mean(values))


__all__ = ["psnr", "ssim"]
