"""[model]: what a build takes from the source, and the approximations it makes to it."""

from __future__ import annotations

from dataclasses import dataclass

from modelkiln.errors import ProfileError


@dataclass(frozen=True)
class ModelSettings:
    """[model]: what to take from the source."""

    # auto: as the family decides (a ViT with a head classifies); the family lists its tasks.
    task: str = "auto"
    # Extra outputs hidden_state_<k>: the output of transformer block k (1-based).
    hidden_layers: tuple[int, ...] = ()
    # Tokens merged after each transformer block (ToMe; 0: none): an approximation the
    # end-to-end gate measures against the unmerged model (models/token_merging.py).
    token_merging: int = 0
    # DeepCache: the whole UNet runs on one step in N, the steps between reuse its deep
    # features through a second, shallow UNet (0: off); gated end to end like token merging
    # (models/deep_cache.py).
    deep_cache: int = 0
    # First Block Cache: on a step where the transformer's first block changed the image
    # tokens less than this fraction since the last computed step, its later blocks are
    # skipped and their last residual reused (0: off; SD3, Flux); gated end to end like
    # DeepCache (models/first_block_cache.py).
    first_block_cache: float = 0.0
    # ToMe for SD: this fraction of the tokens of the UNet's highest-resolution
    # self-attention is merged before it and copied back after (0: off; SD 1.x/2.x, SDXL;
    # tomesd's ratio); gated end to end like DeepCache (models/unet_token_merging.py).
    token_merging_ratio: float = 0.0

    def check(self, origin: str) -> None:
        """What the range checks of Profile do not say (they bound every number)."""
        if self.deep_cache == 1:
            raise ProfileError(
                f"{origin}: model.deep_cache = 1 would never reuse the UNet's features; set 0 "
                "(off) or the steps per whole-UNet step (2 or more)"
            )
