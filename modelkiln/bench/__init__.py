"""Benchmarks of built artifacts (`kiln bench`) and the CI regression gate (`kiln compare`)."""

from modelkiln.bench.compare import Bounds, Comparison, compare_files, compare_reports
from modelkiln.bench.harness import run
from modelkiln.bench.report import write_report
from modelkiln.bench.schema import read_report, validate_report
from modelkiln.bench.settings import BenchSettings

__all__ = [
    "BenchSettings",
    "Bounds",
    "Comparison",
    "compare_files",
    "compare_reports",
    "read_report",
    "run",
    "validate_report",
    "write_report",
]
