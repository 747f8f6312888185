"""Tiny models built from configs with random weights, saved the way the hub serves them.

Shared by the tests, the demo and the benchmarks: the export, runtime and pipeline code paths
are the same as for full-size models, without any download. One module per kind of model:
vision.py (ViT), diffusion.py (SD, SDXL), flow.py (SD3, Flux).
"""

from modelkiln.testing.diffusion import (
    _byte_level_alphabet,
    random_sd15,
    tiny_sd,
    tiny_sdxl,
    write_tiny_clip_tokenizer,
)
from modelkiln.testing.flow import _tiny_t5_tokenizer, tiny_flux, tiny_sd3
from modelkiln.testing.vision import (
    TINY_IMAGE_SIZE,
    TINY_NUM_LABELS,
    tiny_hf_encoder,
    tiny_hf_vit,
    tiny_timm_vit,
)

__all__ = [
    "TINY_IMAGE_SIZE",
    "TINY_NUM_LABELS",
    "_byte_level_alphabet",
    "_tiny_t5_tokenizer",
    "random_sd15",
    "tiny_flux",
    "tiny_hf_encoder",
    "tiny_hf_vit",
    "tiny_sd",
    "tiny_sd3",
    "tiny_sdxl",
    "tiny_timm_vit",
    "write_tiny_clip_tokenizer",
]
