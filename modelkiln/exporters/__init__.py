"""Exporters by on-disk format: each backend names the exporter of every format it writes."""

from __future__ import annotations

from modelkiln.backends import format_owner
from modelkiln.exporters.base import Exporter


def exporter_for(format: str) -> type[Exporter]:
    """The Exporter class of `format`; an unknown format raises with the known ones."""
    return format_owner(format).exporter_class(format)


__all__ = ["Exporter", "exporter_for"]
