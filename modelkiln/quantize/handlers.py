"""Scheme handlers keyed by (scheme config, format), and the support matrix derived from them.

A backend's quantizer module registers one handler per scheme it has for each of its formats,
with the stage it works at:
- ``after-export``: rewrites the exported files in place (onnxruntime.quantization, nncf,
  coremltools.optimize): ``apply(entry, config, calibration) -> record``;
- ``before-export``: quantizes the torch module that is then exported (torchao, PT2E):
  ``apply(module, config, calibration) -> (module, record)``.
A handler may add a profile check (a block size its kernels take, an OS its ops need). Nothing
else says which format has which scheme: `support()` reads the registered handlers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from modelkiln.backends import ProfileContext, backends, format_owner, formats
from modelkiln.errors import UnsupportedError, did_you_mean
from modelkiln.profiles import NO_SCHEME
from modelkiln.quantize.schemes import SCHEMES, SchemeConfig

if TYPE_CHECKING:
    pass

F = TypeVar("F", bound=Callable[..., Any])


class Stage(StrEnum):
    BEFORE_EXPORT = "before-export"
    AFTER_EXPORT = "after-export"


# (config, profile as one component sees it) -> None, or raise ProfileError/UnsupportedError
Check = Callable[[Any, ProfileContext], None]


@dataclass(frozen=True)
class Handler:
    scheme: type[SchemeConfig]
    format: str
    stage: Stage
    apply: Callable[..., Any]
    check: Check | None = None

    def check_profile(self, config: SchemeConfig, context: ProfileContext) -> None:
        if self.check is not None:
            self.check(config, context)


_HANDLERS: dict[tuple[str, str], Handler] = {}


def register_handler(handler: Handler) -> None:
    key = (handler.scheme.name, handler.format)
    if key in _HANDLERS and _HANDLERS[key].apply is not handler.apply:
        raise ValueError(f"{handler.format} already has a handler for {handler.scheme.name}")
    _HANDLERS[key] = handler


def unregister_handler(scheme: str, format: str) -> None:
    """Remove a handler (a test's throwaway extension); unknown pairs are ignored."""
    _HANDLERS.pop((scheme, format), None)


def handles(
    scheme: type[SchemeConfig],
    *formats: str,
    stage: Stage = Stage.AFTER_EXPORT,
    check: Check | None = None,
) -> Callable[[F], F]:
    """Decorator: `function` applies `scheme` to artifacts of `formats` at `stage`."""

    def register(function: F) -> F:
        for format in formats:
            register_handler(Handler(scheme, format, stage, function, check))
        return function

    return register


def support() -> dict[str, dict[str, Handler]]:
    """format -> scheme name -> handler, for every registered backend's formats."""
    for backend in backends():
        backend.import_quantizers()
    table: dict[str, dict[str, Handler]] = {format: {} for format in formats()}
    order = {name: index for index, name in enumerate(SCHEMES)}  # as the configs are declared
    for (name, format), handler in sorted(
        _HANDLERS.items(), key=lambda item: order.get(item[0][0], len(order))
    ):
        if format in table:
            table[format][name] = handler
    return table


def supported_schemes(format: str) -> list[str]:
    return [NO_SCHEME, *support().get(format, {})]


def known_schemes() -> list[str]:
    """Every scheme that some backend handles, "none" first, in declaration order."""
    handled = {name for handlers in support().values() for name in handlers}
    return [NO_SCHEME, *(name for name in SCHEMES if name in handled)]


def handler_for(format: str, scheme: str, origin: str) -> Handler:
    """The handler of (format, scheme), or the profile error that says why there is none."""
    table = support()
    handler = table.get(format, {}).get(scheme)
    if handler is not None:
        return handler
    known = known_schemes()
    if scheme not in SCHEMES or scheme not in known:
        raise UnsupportedError(
            f"{origin}: quantization.scheme '{scheme}' is unknown{did_you_mean(scheme, known)}; "
            f"known: {', '.join(known)}"
        )
    having = [name for name, handlers in table.items() if scheme in handlers]
    reason = format_owner(format).unsupported_schemes.get(scheme)
    raise UnsupportedError(
        f"{origin}: format '{format}' has no quantization scheme '{scheme}'"
        f"{f' ({reason})' if reason else ''}; for {format}: "
        f"{', '.join(supported_schemes(format))}; '{scheme}' is available for: "
        f"{', '.join(having)}"
    )


def matrix_markdown() -> str:
    """docs/quantization.md's support table, from the registered handlers."""
    table = support()
    names = list(table)
    lines = ["| scheme | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for scheme in known_schemes()[1:]:
        cells = ["yes" if scheme in table[f] else "—" for f in names]
        lines.append(f"| `{scheme}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = [
    "Handler",
    "Stage",
    "handler_for",
    "handles",
    "known_schemes",
    "matrix_markdown",
    "register_handler",
    "support",
    "supported_schemes",
    "unregister_handler",
]
