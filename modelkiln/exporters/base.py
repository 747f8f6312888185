"""The Exporter interface: one torch component in, files of one format out."""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from modelkiln.errors import ProfileError, missing_backend

if TYPE_CHECKING:
    from modelkiln.profiles import Profile
    from modelkiln.specs import ComponentSpec, TensorSpec

# A dynamic axis is exported from an example of size 2: tracing with 1 would specialise it.
DYNAMIC_EXAMPLE_SIZE = 2
# Symbolic dims that follow the image resolution (shapes.dynamic_resolution).
RESOLUTION_DIMS = frozenset({"height", "width", "latent_height", "latent_width", "image_tokens"})


class Exporter(ABC):
    format: ClassVar[str]
    backend: ClassVar[str]  # the backend that writes the format
    weight_precisions: ClassVar[frozenset[str]]
    packages: ClassVar[tuple[str, ...]]  # import names needed to export
    # The pip extra that installs them: building needs more than running (the backend's own
    # extra) does.
    extra: ClassVar[str] = "build"

    @classmethod
    def require(cls) -> None:
        for package in cls.packages:
            if importlib.util.find_spec(package) is None:
                raise missing_backend(package, cls.extra)

    def directory(self, spec: ComponentSpec, root: Path) -> Path:
        """Where this format keeps the component inside the artifact."""
        return root / spec.path

    @abstractmethod
    def export(
        self, spec: ComponentSpec, load_module: Callable[[], Any], profile: Profile, root: Path
    ) -> Path:
        """Write the component under the artifact root; return the entry (file or directory) a
        runtime opens. `load_module()` gives its torch wrapper, loaded once on first call."""

    def traced_as(self, module: Any, profile: Profile) -> AbstractContextManager[Any]:
        """While a before-export scheme captures `module` (PT2E traces it): the module as this
        format's export traces it. Most formats trace the module as it is."""
        return nullcontext(module)

    def complete(self, root: Path) -> None:
        """After every component and the family's configs are in `root`: what the format's
        own consumers read besides the models (OpenVINO GenAI's tokenizer IRs). Most
        formats need nothing more."""
        return None

    def finish(self, spec: ComponentSpec, entry: Path, profile: Profile) -> Path:
        """After quantization of `entry`: compile what the runtime loads (a TensorRT engine);
        returns the entry the runtime opens. Most formats run what they exported."""
        return entry


def write_config(spec: ComponentSpec, directory: Path) -> None:
    """The component's config.json beside its files, where the family has one (what
    optimum's classes and the pipelines read)."""
    if spec.config_file is not None:
        (directory / "config.json").write_bytes(spec.config_file)


def per_input_shapes(
    spec: ComponentSpec, symbols: Mapping[str, Any]
) -> tuple[dict[int, Any] | None, ...]:
    """torch.export's dynamic_shapes, one entry per input in order: axis -> the symbol of
    its dim, None for an input with no symbolic axis."""
    return tuple(
        {
            axis: symbols[dim]
            for axis, dim in enumerate(tensor.shape)
            if isinstance(dim, str) and dim in symbols
        }
        or None
        for tensor in spec.inputs.values()
    )


def export_dims(spec: ComponentSpec, profile: Profile) -> tuple[dict[str, int], set[str]]:
    """Example sizes for every symbolic dim, and which dims stay dynamic in the export."""
    shapes = profile.shapes
    dynamic = {"batch"} if shapes.dynamic_batch else set()
    if shapes.dynamic_resolution:
        dynamic |= RESOLUTION_DIMS
    dynamic |= spec.dynamic_dims
    # Static: the images per call times the component's factor (2 for a CFG-doubled UNet).
    batch = DYNAMIC_EXAMPLE_SIZE if shapes.dynamic_batch else shapes.batch_size * spec.batch_factor
    return {**spec.default_dims, "batch": batch}, dynamic


def dim_ranges(spec: ComponentSpec, profile: Profile) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every dynamic dim the component's inputs use, for the formats that
    need bounds (TensorRT's optimization profile, Core ML's flexible shapes).

    Batch: 1 / batch_size / max_batch_size images, times the component's batch factor (2 for
    the CFG-doubled UNet) except the min (a UNet without CFG runs 1). Resolution:
    min_resolution / the set resolution / max_resolution in pixels (None: half / twice it);
    latent dims follow at the VAE's scale, read from the component's own dims, and Flux's
    image tokens (one per 2×2 latents) from those.
    """
    shapes = profile.shapes
    example, dynamic = export_dims(spec, profile)
    used = {d.split()[0] for tensor in spec.inputs.values() for d in tensor.symbolic_dims}
    ranges = {}
    if "batch" in dynamic & used:
        factor = spec.batch_factor
        ranges["batch"] = (1, shapes.batch_size * factor, shapes.max_batch_size * factor)
    if not shapes.dynamic_resolution:
        return ranges
    latents: dict[str, tuple[int, int, int]] = {}
    for pixel in ("height", "width"):
        if pixel not in example:
            continue
        size = example[pixel]
        least = shapes.min_resolution if shapes.min_resolution is not None else size // 2
        most = shapes.max_resolution if shapes.max_resolution is not None else size * 2
        if not least <= size <= most:
            raise ProfileError(
                f"profile '{profile.name}': the {pixel} {size} is outside "
                f"shapes.min_resolution..max_resolution ({least}..{most}); flexible shapes "
                "need min <= the set resolution <= max"
            )
        if pixel in used:
            ranges[pixel] = (least, size, most)
        latent = f"latent_{pixel}"
        if latent in example:
            scale = size // example[latent]  # the VAE's downsampling factor, 8 for SD
            latents[latent] = (max(1, -(-least // scale)), example[latent], most // scale)
            if latent in used:
                ranges[latent] = latents[latent]
    if "image_tokens" in used and len(latents) == 2:
        rows, columns = latents["latent_height"], latents["latent_width"]
        tokens = [max(1, rows[i] // 2) * max(1, columns[i] // 2) for i in range(3)]
        ranges["image_tokens"] = (tokens[0], tokens[1], tokens[2])
    return ranges


def export_signature(
    spec: ComponentSpec, profile: Profile
) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """The inputs and outputs as exported: static dims replaced by their sizes."""
    dims, dynamic = export_dims(spec, profile)
    fixed = {name: size for name, size in dims.items() if name not in dynamic}

    def concrete(specs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        return {
            name: replace(tensor, shape=tuple(resolve_dim(d, fixed) for d in tensor.shape))
            for name, tensor in specs.items()
        }

    return concrete(spec.inputs), concrete(spec.outputs)


def resolve_dim(dim: int | str, sizes: Mapping[str, int]) -> int | str:
    """A dim's size where its name is fixed; names and "name * k" / "name / k" expressions."""
    if isinstance(dim, int):
        return dim
    parts = dim.split()
    if len(parts) == 3 and parts[0] in sizes and parts[1] in ("*", "/"):
        size, factor = sizes[parts[0]], int(parts[2])
        return size * factor if parts[1] == "*" else size // factor
    return sizes.get(dim, dim)
