"""First Block Cache (ParaAttention; diffusers' FirstBlockCacheConfig) over SD3's and Flux's
transformers, in numpy.

Where the first transformer block changes the image tokens little from one step to the next,
the blocks after it change them as little: a step whose first block's residual moved less
than `threshold` (relative to the last computed one) skips them and adds what they added on
the last computed step. With `[model] first_block_cache = T` the transformer also outputs its
first block's residual and what its later blocks added, and a small second component,
`transformer_head` (models/first_block_cache.py), runs the embeddings, the first block and the
output layers on the kept sum. Every step after the first runs the head to decide; a step
that must compute runs the whole transformer too, so a computed step costs one block more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from modelkiln.diffusion.denoise import Conditioning, StepCalls, run_conformed
from modelkiln.runtimes.base import Session

TRANSFORMER_HEAD = "transformer_head"
# The image tokens' residual over the first block, and what the blocks after it add.
FIRST_BLOCK_RESIDUAL = "first_block_residual"
TAIL_BLOCKS_RESIDUAL = "tail_blocks_residual"
TRANSFORMER_OUTPUT = "out_hidden_states"

# (latents, timestep, conditioning) -> the transformer's feeds by name.
TransformerFeeds = Callable[[np.ndarray, float, Conditioning], dict[str, np.ndarray]]


@dataclass(frozen=True)
class _Kept:
    first: np.ndarray  # the first block's residual on the last computed step
    tail: np.ndarray  # what the later blocks added on it


def relative_change(residual: np.ndarray, previous: np.ndarray) -> float:
    """mean |residual - previous| / mean |previous|: diffusers' FBCHeadBlockHook measure."""
    scale = float(np.abs(previous).mean())
    return float(np.abs(residual - previous).mean()) / scale if scale else float("inf")


class FirstBlockCacheDenoiser:
    """The transformer on the steps whose first block moved more than `threshold`, the head
    on the kept tail residual on the others. A step whose batch changed (guidance ended) or
    the first call computes; the kept residuals are per call within a step, so split
    guidance's two calls each keep their own."""

    def __init__(
        self,
        transformer: Session,
        head: Session,
        threshold: float,
        feeds: TransformerFeeds,
        unbatched: frozenset[str] = frozenset(),
    ) -> None:
        self.transformer = transformer
        self.head = head
        self.threshold = threshold
        self.feeds = feeds
        self.unbatched = unbatched
        self._kept: dict[int, _Kept] = {}
        self._calls = StepCalls()

    def start_step(self, index: int, guided: bool) -> None:
        if self._calls.start(guided):
            self._kept.clear()  # the kept residuals belong to the other batch

    def __call__(
        self, sample: np.ndarray, timestep: float, conditioning: Conditioning
    ) -> np.ndarray:
        call = self._calls.next()
        feeds = self.feeds(sample, timestep, conditioning)
        kept = self._kept.get(call)
        if kept is not None and len(kept.first) == len(sample):
            head = run_conformed(
                self.head, {**feeds, TAIL_BLOCKS_RESIDUAL: kept.tail}, self.unbatched
            )
            # diffusers computes when the change exceeds the threshold and keeps the first
            # residual of computed steps only.
            if relative_change(head[FIRST_BLOCK_RESIDUAL], kept.first) <= self.threshold:
                return head[TRANSFORMER_OUTPUT]
        outputs = run_conformed(self.transformer, feeds, self.unbatched)
        self._kept[call] = _Kept(outputs[FIRST_BLOCK_RESIDUAL], outputs[TAIL_BLOCKS_RESIDUAL])
        return outputs[TRANSFORMER_OUTPUT]


__all__ = [
    "FIRST_BLOCK_RESIDUAL",
    "TAIL_BLOCKS_RESIDUAL",
    "TRANSFORMER_HEAD",
    "TRANSFORMER_OUTPUT",
    "FirstBlockCacheDenoiser",
    "TransformerFeeds",
    "relative_change",
]
