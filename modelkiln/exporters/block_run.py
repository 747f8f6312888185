"""Running a component larger than memory one block at a time: its blocks on the meta device
(models/blocks.py), each block's weights read from the checkpoint shards only while it runs
(bf16 / fp16 shards cast to fp32 one block at a time), activations carried between blocks and
dropped after their last reader. The torch reference of a block build (exporters/by_block.py)
is computed so: one block's fp32 weights in memory, ~0.9 GB for SD 3.5 Large's transformer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modelkiln import memory_budget
from modelkiln.env import release_memory
from modelkiln.errors import ExportError, UnsupportedError
from modelkiln.evaluation.metrics import OutputMetrics
from modelkiln.exporters.onnx import checkpoint_index, checkpoint_keys
from modelkiln.models.blocks import segments
from modelkiln.progress import Progress
from modelkiln.records import OutputScore, QuantizationRecord

if TYPE_CHECKING:
    import torch

    from modelkiln.models.blocks import Segment
    from modelkiln.specs import ComponentSpec

# The saved model run whole: its file's weights (OpenVINO maps them) and the runtime's
# repacked copy beside them ...
WHOLE_CHECK_COPIES = 2.0
# ... which OpenVINO makes larger than 4-bit weights: SD 3.5 Large's int4 transformer (4.6 GB
# of IR) peaked at 17.3 GB in a check planned under 16 GB with two copies.
OPENVINO_FOUR_BIT_COPIES = 3.0
# Activations of a validation feed through the whole component (SD 3.5 Large at 512x512: ~1 GB).
WHOLE_CHECK_ACTIVATIONS = int(1.5 * memory_budget.GB)


@dataclass(frozen=True)
class BlockBuild:
    """A component built block by block, and what its validation needs."""

    entry: Path
    # The component's torch outputs on each validation feed, computed block by block.
    expected: list[dict[str, np.ndarray]]
    quantization: QuantizationRecord | None
    # OpenVINO: each block alone against torch, on the same inputs ...
    blocks: dict[str, OutputScore] = field(default_factory=dict)
    # ... and the compressed blocks in a chain (each on the previous ones' outputs) against
    # torch: the whole component's error, computed one block at a time.
    chained: dict[str, OutputMetrics] = field(default_factory=dict)
    # The saved files' weights held at once when the runtime runs them whole.
    copies: float = WHOLE_CHECK_COPIES
    # How the runtime ran the blocks (the chained check's record of it).
    runtime: dict[str, Any] = field(default_factory=dict)

    def whole_check_bytes(self) -> int:
        """What running the saved component whole adds to the process."""
        files = [path for path in self.entry.parent.iterdir() if path.is_file()]
        weights = sum(path.stat().st_size for path in files if path.name != "config.json")
        return int(self.copies * weights) + WHOLE_CHECK_ACTIVATIONS


class BlockWeights:
    """Reads one segment's weights from the checkpoint into the meta-device model, and puts
    the meta tensors back afterwards (the memory goes with them)."""

    def __init__(self, wrapper: torch.nn.Module, checkpoint: tuple[Path, ...]) -> None:
        self.index = checkpoint_index(checkpoint)
        keys = checkpoint_keys(wrapper, self.index)
        named = [
            *wrapper.named_parameters(remove_duplicate=False),
            *wrapper.named_buffers(remove_duplicate=False),
        ]
        self.keys = {id(tensor): keys[name] for name, tensor in named if name in keys}

    @contextmanager
    def loaded(self, piece: Segment) -> Iterator[None]:
        import torch

        slots = []
        for owner in piece.module.modules():
            for kind in ("_parameters", "_buffers"):
                for attribute, tensor in getattr(owner, kind).items():
                    if tensor is not None and tensor.is_meta:
                        slots.append((owner, kind, attribute, tensor))
        values: dict[int, torch.Tensor] = {}
        try:
            for owner, kind, attribute, tensor in slots:
                if id(tensor) not in values:
                    values[id(tensor)] = self._read(piece, attribute, tensor)
                value = values[id(tensor)]
                getattr(owner, kind)[attribute] = (
                    torch.nn.Parameter(value, requires_grad=False)
                    if kind == "_parameters"
                    else value
                )
            values.clear()
            yield
        finally:
            for owner, kind, attribute, tensor in slots:
                getattr(owner, kind)[attribute] = tensor

    def _read(self, piece: Segment, attribute: str, tensor: torch.Tensor) -> torch.Tensor:
        from safetensors import safe_open

        key = self.keys.get(id(tensor))
        if key is None:
            raise ExportError(
                f"block {piece.name}: its weight '{attribute}' is not in the checkpoint, so it "
                "cannot be read one block at a time; build this component whole "
                "(--set build.by_block=never) on a machine with the memory for it"
            )
        path, name = self.index[key]
        with safe_open(str(path), framework="pt") as checkpoint:
            value = checkpoint.get_tensor(name)
        # fp32 like the whole build's module (bf16 / fp16 shards are cast one block at a time)
        return value.to(tensor.dtype) if value.is_floating_point() else value


def reference(
    spec: ComponentSpec,
    pieces: Sequence[Segment],
    weights: BlockWeights,
    feeds: Sequence[Mapping[str, np.ndarray]],
    progress: Progress,
) -> list[dict[str, np.ndarray]]:
    """The component's torch outputs on the feeds, its blocks (`open_blocks`) run in order,
    one block's weights in memory at a time."""
    import torch

    last_use = last_uses(pieces, spec)
    chains = torch_feeds(feeds)
    with progress.task(
        f"torch reference of {spec.name}, block by block", total=len(pieces)
    ) as advance:
        for position, piece in enumerate(pieces):
            with weights.loaded(piece), torch.no_grad():
                for chain in chains:
                    chain.update(piece.run(chain))
                    drop_used(chain, last_use, position)
            release_memory()
            advance(1)
    return [{name: chain[name].numpy() for name in spec.outputs} for chain in chains]


def open_blocks(spec: ComponentSpec) -> tuple[list[Segment], BlockWeights]:
    """The component's blocks on the meta device, and the reader of their weights."""
    assert spec.meta_module is not None
    wrapper = spec.meta_module()
    pieces = segments(wrapper, tuple(spec.outputs))
    if pieces is None:
        raise UnsupportedError(f"{spec.name} cannot be cut into blocks")
    return pieces, BlockWeights(wrapper, spec.checkpoint)


def torch_feeds(feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, torch.Tensor]]:
    """Feeds as the torch tensors the blocks take (and the chains that carry activations)."""
    import torch

    return [
        {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in feed.items()}
        for feed in feeds
    ]


def last_uses(pieces: Sequence[Segment], spec: ComponentSpec) -> dict[str, int]:
    """The index of the last segment that reads each name (outputs of the component: never
    dropped)."""
    uses: dict[str, int] = {}
    for position, piece in enumerate(pieces):
        for name in piece.inputs:
            uses[name] = position
    for name in spec.outputs:
        uses[name] = len(pieces)
    return uses


def drop_used(values: dict[str, Any], last_use: Mapping[str, int], position: int) -> None:
    """Forget the activations no block after `position` reads."""
    for name in [n for n in values if last_use.get(n, position + 1) <= position]:
        del values[name]


__all__ = [
    "OPENVINO_FOUR_BIT_COPIES",
    "WHOLE_CHECK_ACTIVATIONS",
    "WHOLE_CHECK_COPIES",
    "BlockBuild",
    "BlockWeights",
    "drop_used",
    "last_uses",
    "open_blocks",
    "reference",
    "torch_feeds",
]
