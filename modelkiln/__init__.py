"""modelkiln: compile diffusion and vision models for deployment.

The public API is imported lazily so that ``import modelkiln`` (and loading an artifact
with onnxruntime or OpenVINO) never imports torch.
"""

from __future__ import annotations

import logging
from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# torchao (imported by transformers and diffusers whenever it is installed) registers enums
# with torch's pytree, which torch >= 2.12 deprecates with one warning per enum, and diffusers
# 0.42 misses classes torchao 0.18 moved (it only matters for torchao-serialized diffusers
# checkpoints, which we never load): not news for our users. Set before the libraries are
# imported; they keep a child logger's level.
for _chatter in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_chatter).setLevel(logging.ERROR)

_EXPORTS = {
    "build": "modelkiln.builder",
    "load": "modelkiln.loading",
    "open_artifact": "modelkiln.loading",
    "package": "modelkiln.packaging.pack",
    "Profile": "modelkiln.profiles",
    "load_profile": "modelkiln.plan",
    "ImageClassificationPipeline": "modelkiln.pipelines.classification",
    "ImageEmbeddingPipeline": "modelkiln.pipelines.embedding",
    "KilnError": "modelkiln.errors",
}

__all__ = [
    "ImageClassificationPipeline",
    "ImageEmbeddingPipeline",
    "KilnError",
    "Profile",
    "__version__",
    "build",
    "load",
    "load_profile",
    "open_artifact",
    "package",
]

if TYPE_CHECKING:
    from modelkiln.builder import build
    from modelkiln.errors import KilnError
    from modelkiln.loading import load, open_artifact
    from modelkiln.packaging.pack import package
    from modelkiln.pipelines.classification import ImageClassificationPipeline
    from modelkiln.pipelines.embedding import ImageEmbeddingPipeline
    from modelkiln.plan import load_profile
    from modelkiln.profiles import Profile


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'modelkiln' has no attribute '{name}'")
