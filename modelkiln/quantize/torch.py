"""Weight-only quantization of the torch reference backend with torchao (int8, int4, nf4).

It lets a user tell quantization error from export error: the same scheme on the same weights,
run eagerly by PyTorch. The artifact keeps its fp32 safetensors (each family's
`reference_module` rebuilds the module from them); `quantize_weights` records the scheme in the
component's recipe json and checks that it applies, and the torch runtime applies it again with
`apply` each time it opens the component. Quantization here is deterministic (no calibration),
so the module that runs is the one the build validated, as long as torchao's version is the one
the recipe records (a different one is logged).

Why not store the quantized tensors: torchao's safetensors support (a prototype) covers its
int8/intx tensors but not NF4Tensor, and the fp32 file must stay for `reference_module` anyway,
so the artifact would only grow.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.errors import QuantizationError, first_line, missing_backend
from modelkiln.quantize.handlers import handles
from modelkiln.quantize.schemes import Int4Weights, Int8Weights, NF4Weights

if TYPE_CHECKING:
    import torch

    from modelkiln.quantize import Calibration

TorchScheme = Int8Weights | Int4Weights | NF4Weights

logger = logging.getLogger(__name__)

LIBRARY = "torchao"
SCHEMES = ("int8-weights", "int4-weights", "nf4-weights")
# NF4 quantizes its per-block scales again to int8, in blocks of this many scales (torchao's
# default); a layer whose block count it does not divide uses its largest divisor below it.
NF4_SCALER_BLOCK = 256
RECIPE_GLOB = "modelkiln_*.json"  # runtimes.torch.component_file


def quantization_record(settings: TorchScheme) -> dict[str, Any]:
    """What the recipe json stores: the settings that change the weights, and torchao's version.

    int8 is per output channel (like nncf's INT8 and onnxruntime's per-channel weights), so
    group_size does not apply to it; nf4 has no zero point, so symmetric does not apply to it.
    """
    if settings.name not in SCHEMES:
        raise QuantizationError(
            f"the torch format has no quantization scheme '{settings.name}'; use one of "
            f"{', '.join(SCHEMES)}"
        )
    group_size = settings.group_size if isinstance(settings, Int4Weights | NF4Weights) else None
    if group_size is not None and group_size < 1:
        raise QuantizationError(
            f"quantization.group_size must be a positive number of weights, not "
            f"{group_size}; use e.g. 32, 64 or 128"
        )
    return {
        "scheme": settings.name,
        "group_size": group_size,
        "symmetric": None if isinstance(settings, NF4Weights) else settings.symmetric,
        "library": LIBRARY,
        "library_version": _torchao_version(),
    }


@handles(Int8Weights, "torch")
@handles(Int4Weights, "torch")
@handles(NF4Weights, "torch")
def quantize_weights(
    entry: Path, settings: TorchScheme, calibration: Calibration = ()
) -> dict[str, Any]:
    """Record `settings` in the recipe of every not yet quantized component in `entry`.

    A directory can hold two components (diffusers' VAE halves share `vae/`); the builder
    quantizes each right after exporting it, so the one without a "quantization" key is new.
    Each module is rebuilt and quantized once here to count, size and check what the runtime
    will do. Linear layers whose in_features group_size does not divide stay fp32.
    """
    from modelkiln.models import FAMILIES

    entry = Path(entry)
    record = quantization_record(settings)
    recipes = _unquantized_recipes(entry)
    bytes_before = _disk_bytes(entry, recipes)
    totals = {"linear": 0, "quantized": 0, "memory_before": 0, "memory_after": 0}
    skipped_features: set[int] = set()
    for _, recipe in recipes:
        family = FAMILIES.get(recipe["family"])
        module = family.reference_module(entry, recipe["component"], recipe["model"])
        linears = _linears(module)
        totals["linear"] += len(linears)
        totals["memory_before"] += module_bytes(module)
        totals["quantized"] += apply(module, record)
        totals["memory_after"] += module_bytes(module)
        skipped_features |= {
            layer.in_features for _, layer in linears if not _eligible(layer, record)
        }
        del module, linears  # one component's weights in memory at a time
    if not totals["linear"]:
        raise QuantizationError(
            f"{entry} has no Linear layer to quantize with {settings.name}; use scheme 'none'"
        )
    if not totals["quantized"]:
        found = ", ".join(map(str, sorted(skipped_features))) or "none"
        raise QuantizationError(
            f"no Linear layer has in_features divisible by quantization.group_size "
            f"{record['group_size']} (in_features found: {found}); set group_size to a divisor "
            "of them, or use scheme 'none'"
        )
    for path, recipe in recipes:
        text = json.dumps({**recipe, "quantization": record}, indent=2) + "\n"
        path.write_text(text, encoding="utf-8")
    return {
        "quantized_weights": totals["quantized"],
        "skipped_weights": totals["linear"] - totals["quantized"],
        "library": LIBRARY,
        "library_version": record["library_version"],
        **{key: record[key] for key in ("group_size", "symmetric") if record[key] is not None},
        "components": [recipe["component"] for _, recipe in recipes],
        # Honest sizes: the files keep fp32 weights, the runtime quantizes them when it opens
        # the component; memory_* are the module's parameters and buffers in RAM.
        "weights_on_disk": "fp32 (quantized when the torch runtime opens the component)",
        "bytes_before": bytes_before,
        "bytes_after": _disk_bytes(entry, recipes),
        "memory_bytes_before": totals["memory_before"],
        "memory_bytes_after": totals["memory_after"],
    }


def apply(module: torch.nn.Module, quantization: Mapping[str, Any]) -> int:
    """Quantize `module`'s Linear weights in place as a recipe's "quantization" record says.

    Returns how many were quantized: those whose in_features the group size divides (all of
    them for int8). Shared by the quantizer and `TorchRuntime.open`.
    """
    torch, ao = _torchao()
    scheme = quantization.get("scheme")
    if scheme not in SCHEMES:
        raise QuantizationError(
            f"the component's recipe asks for torch quantization scheme {scheme!r}, unknown "
            f"here (known: {', '.join(SCHEMES)}); rebuild the artifact with this modelkiln"
        )
    recorded = quantization.get("library_version")
    if recorded and recorded != _torchao_version():
        logger.warning(
            "the artifact was quantized with torchao %s, this is %s: its weights may round "
            "slightly differently from the validated build",
            recorded,
            _torchao_version(),
        )
    quantize_layer = _layer_quantizer(torch, ao, quantization)
    count = 0
    for name, layer in _linears(module):
        if not _eligible(layer, quantization):
            continue
        try:
            quantize_layer(layer)
        except (AssertionError, RuntimeError, ValueError) as error:  # torchao asserts shapes
            raise QuantizationError(
                f"torchao could not quantize Linear '{name}' {tuple(layer.weight.shape)} to "
                f"{scheme} ({first_line(error)}); try another quantization.group_size or "
                "scheme 'none'"
            ) from error
        count += 1
    return count


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers, counting what quantized tensors hold."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(tensor_bytes(tensor) for tensor in tensors)


def _layer_quantizer(
    torch: Any, ao: Any, quantization: Mapping[str, Any]
) -> Callable[[torch.nn.Linear], None]:
    scheme, group_size = quantization["scheme"], quantization.get("group_size")
    if scheme == "nf4-weights":

        def nf4(layer: torch.nn.Linear) -> None:
            weight = layer.weight.detach().contiguous()
            scalers = _largest_divisor(weight.numel() // group_size, NF4_SCALER_BLOCK)
            quantized = ao.to_nf4(weight, group_size, scalers)
            layer.weight = torch.nn.Parameter(quantized, requires_grad=False)

        return nf4
    # int8 and int4 share torchao's intx weight-only tensor: any group size, symmetric or
    # asymmetric (its packed CPU int4 layout needs groups of 32-128, out_features % 16 == 0
    # and is asymmetric only). It holds int4 values one per byte: int8's memory, int4's error.
    int8 = scheme == "int8-weights"
    config = ao.IntxWeightOnlyConfig(
        weight_dtype=torch.int8 if int8 else torch.int4,
        granularity=ao.PerAxis(0) if int8 else ao.PerGroup(group_size),
        mapping_type=(
            ao.MappingType.SYMMETRIC if quantization.get("symmetric") else ao.MappingType.ASYMMETRIC
        ),
    )

    def intx(layer: torch.nn.Linear) -> None:
        ao.quantize_(layer, config)

    return intx


def _eligible(layer: torch.nn.Linear, quantization: Mapping[str, Any]) -> bool:
    group_size = quantization.get("group_size")
    return not group_size or layer.in_features % group_size == 0


def _linears(module: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """Linear layers whose weight is still a plain tensor (not quantized yet)."""
    import torch

    return [
        (name, layer)
        for name, layer in module.named_modules()
        if isinstance(layer, torch.nn.Linear)
        and type(layer.weight) in (torch.Tensor, torch.nn.Parameter)
    ]


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds: a torchao tensor subclass, the sum of its inner tensors."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None:  # a plain tensor or parameter
        return tensor.numel() * tensor.element_size()
    names, _ = flatten()
    return sum(tensor_bytes(getattr(tensor, name)) for name in names)


def _largest_divisor(number: int, limit: int) -> int:
    return next(d for d in range(min(number, limit), 0, -1) if number % d == 0)


def _unquantized_recipes(entry: Path) -> list[tuple[Path, dict[str, Any]]]:
    recipes = []
    for path in sorted(entry.glob(RECIPE_GLOB)):
        try:
            recipe = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise QuantizationError(
                f"{path} is unreadable ({first_line(error)}); rebuild the artifact"
            ) from error
        recipes.append((path, recipe))
    if not recipes:
        raise QuantizationError(
            f"{entry} has no {RECIPE_GLOB}: it is not a component directory of a torch-format "
            "artifact; build one with a *-torch-* profile"
        )
    fresh = [(path, recipe) for path, recipe in recipes if "quantization" not in recipe]
    if not fresh:
        schemes = sorted({recipe["quantization"].get("scheme", "?") for _, recipe in recipes})
        raise QuantizationError(
            f"{entry} is already quantized ({', '.join(schemes)}); rebuild it from the fp32 "
            "profile to change the scheme"
        )
    return fresh


def _disk_bytes(entry: Path, recipes: list[tuple[Path, dict[str, Any]]]) -> int:
    """The component's weight files and recipe(s), as stored."""
    files = {*entry.glob("*.safetensors"), *(path for path, _ in recipes)}
    return sum(path.stat().st_size for path in files)


def _torchao_version() -> str:
    try:
        return version("torchao")
    except Exception as error:  # PackageNotFoundError, or broken metadata
        raise missing_backend("torchao", "torchao") from error


def _torchao() -> tuple[Any, Any]:
    """torch and torchao.quantization, imported without their import-time log lines."""
    import torch

    try:
        with _quiet_logger("torch.utils._pytree"):
            # torchao 0.18 registers its enums with pytree, which torch >= 2.12 deprecates
            # with a warning per enum on import: noise for our users, not a problem.
            import torchao.quantization as ao
    except ImportError as error:
        raise missing_backend("torchao", "torchao") from error
    return torch, ao


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    target = logging.getLogger(name)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


__all__ = [
    "SCHEMES",
    "apply",
    "module_bytes",
    "quantization_record",
    "quantize_weights",
    "tensor_bytes",
]
