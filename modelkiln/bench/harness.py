"""`kiln bench`: measure built artifacts and write one report (JSON, Markdown, plots, HTML).

The orchestrator: checks the settings and artifacts up front, computes each source's torch
reference once (when accuracy is asked for), then measures every artifact — in this process,
or each in its own child process (`isolate`) so that peak memory and thread pools belong to
that artifact alone — and assembles the report that report.schema.json describes.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from modelkiln import errors
from modelkiln.bench import references
from modelkiln.bench.calibration import calibration_record, time_workload
from modelkiln.bench.measure import measure_artifact
from modelkiln.bench.schema import SCHEMA_NAME, SCHEMA_VERSION, validate_report
from modelkiln.bench.settings import BenchSettings
from modelkiln.errors import InputError, KilnError
from modelkiln.loading import Artifact, open_artifact
from modelkiln.models import FAMILIES
from modelkiln.outputs import check_writable
from modelkiln.progress import NullProgress, Progress

if TYPE_CHECKING:
    from modelkiln.bench.matrix import BuildJob
    from modelkiln.build_cache import BuildCache

# The orchestrator's pid, handed to each isolated child so that it ends with it.
PARENT_VARIABLE = "MODELKILN_BENCH_PARENT"
PARENT_POLL_S = 0.2


class Executor(Protocol):
    """Where builds and measurements run: here (LocalExecutor) or on a cluster
    (cluster/ray_executor.py). The orchestrator in `run` is the same for both."""

    def build(
        self, jobs: Sequence[BuildJob], progress: Progress, cache: BuildCache | None
    ) -> list[Path]:
        """Each job's artifact, built unless up to date, at its target on this machine."""
        ...

    def references(
        self,
        wanted: dict[str, Artifact],
        settings: BenchSettings,
        scratch: Path,
        progress: Progress,
    ) -> dict[str, Path]:
        """Reference key -> the folder (under scratch) of the torch reference computed for it."""
        ...

    def measure(
        self,
        work: Sequence[tuple[Artifact, Path | None]],
        settings: BenchSettings,
        scratch: Path,
        progress: Progress,
    ) -> list[dict[str, Any]]:
        """The report entries of every (artifact, its reference folder), in the given order."""
        ...


def run(
    artifacts: Sequence[str | Path],
    settings: BenchSettings | None = None,
    *,
    output: str | Path | None = None,
    progress: Progress | None = None,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Benchmark `artifacts`; the report (and, with `output`, its files in that folder)."""
    settings = settings or BenchSettings()
    progress = progress or NullProgress()
    executor = executor or LocalExecutor()
    if not artifacts:
        raise InputError("no artifacts to benchmark: give one or more artifact directories")
    if output is not None:
        check_writable(Path(output), folder=True)  # not after minutes of measuring
    opened = [open_artifact(path) for path in artifacts]
    _check_distinct_keys(opened, settings.runtime)
    before_s = time_workload()  # the host's speed, for comparisons of stored reports
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as scratch:
        folders = executor.references(
            _reference_work(opened, settings), settings, Path(scratch), progress
        )
        work = [
            (artifact, folders.get(references.reference_key(artifact.manifest)))
            for artifact in opened
        ]
        entries = executor.measure(work, settings, Path(scratch), progress)
    _distinct_names(entries)
    from modelkiln import __version__
    from modelkiln.env import machine_report

    report = {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "modelkiln_version": __version__,
        "machine": machine_report(),
        "settings": settings.report_settings(),
        "calibration": calibration_record(before_s, time_workload()),
        "entries": entries,
    }
    validate_report(report)
    if output is not None:
        from modelkiln.bench.report import write_report

        write_report(report, Path(output))
    return report


class LocalExecutor:
    """Everything on this machine, one artifact after the other."""

    def build(
        self, jobs: Sequence[BuildJob], progress: Progress, cache: BuildCache | None
    ) -> list[Path]:
        from modelkiln.bench.matrix import run_build_job

        return [run_build_job(job, progress, cache) for job in jobs]

    def references(
        self,
        wanted: dict[str, Artifact],
        settings: BenchSettings,
        scratch: Path,
        progress: Progress,
    ) -> dict[str, Path]:
        folders = {}
        for key, artifact in wanted.items():
            folders[key] = scratch / "references" / key
            compute_reference(artifact, settings, folders[key], scratch, progress)
        return folders

    def measure(
        self,
        work: Sequence[tuple[Artifact, Path | None]],
        settings: BenchSettings,
        scratch: Path,
        progress: Progress,
    ) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        for index, (artifact, reference) in enumerate(work):
            with progress.task(f"[{index + 1}/{len(work)}] {artifact.root.name}"):
                entries += measure_one(artifact.root, settings, reference, scratch, progress)
        return entries


def measure_one(
    root: Path, settings: BenchSettings, reference: Path | None, scratch: Path, progress: Progress
) -> list[dict[str, Any]]:
    """One artifact's entries: in its own child process (isolate) or in this one."""
    if settings.isolate:
        return _measure_in_child(root, settings, reference, scratch)
    return measure_artifact(root, settings, reference, progress)


def compute_reference(
    artifact: Artifact, settings: BenchSettings, folder: Path, scratch: Path, progress: Progress
) -> None:
    """The torch reference of the artifact's source on the benchmark data, into `folder`:
    in its own child process (isolate) or in this one."""
    if settings.isolate:
        arguments = ["reference", str(artifact.root), str(folder), settings.to_json()]
        _run_child(arguments, scratch)
        return
    _reference_here(artifact, settings, folder, progress)


def _reference_here(
    artifact: Artifact, settings: BenchSettings, folder: Path, progress: Progress
) -> None:
    references.compute(
        artifact.manifest,
        folder,
        data=settings.data,
        prompts=settings.prompts,
        steps=settings.steps,
        source=settings.reference,
        progress=progress,
    )


def _check_distinct_keys(opened: list[Artifact], runtime: str | None) -> None:
    """kiln compare matches entries on source, profile and runtime: one artifact per key."""
    seen: dict[tuple[str, str, str], Path] = {}
    for artifact in opened:
        manifest = artifact.manifest
        key = (
            references.source_hash(manifest),
            manifest.profile.name,
            runtime or manifest.runtime,
        )
        if key in seen:
            raise InputError(
                f"{seen[key]} and {artifact.root} are the same weights built with the same "
                f"profile '{key[1]}' for {key[2]}: a report keys its entries by that (kiln "
                "compare matches on it), so bench them in separate reports"
            )
        seen[key] = artifact.root


def _distinct_names(entries: list[dict[str, Any]]) -> None:
    """Entries name artifacts by directory; same-named ones (a matrix's) get their parent too."""
    by_name: dict[str, set[str]] = {}
    for entry in entries:
        by_name.setdefault(entry["name"], set()).add(entry["artifact"])
    for entry in entries:
        if len(by_name[entry["name"]]) > 1:
            entry["name"] = f"{Path(entry['artifact']).parent.name}/{entry['name']}"


def _reference_work(opened: list[Artifact], settings: BenchSettings) -> dict[str, Artifact]:
    """One artifact per torch reference needed: per (weights, shapes), among the artifacts
    that the benchmark's data scores (images for image models, prompts for diffusion)."""
    if not settings.use_reference:
        return {}
    wanted: dict[str, Artifact] = {}
    for artifact in opened:
        manifest = artifact.manifest
        kind = FAMILIES.get(manifest.family).real_data_key()
        if settings.prompts if kind == "prompts" else settings.data:
            wanted.setdefault(references.reference_key(manifest), artifact)
    return wanted


# --- isolation: one child process per artifact -----------------------------------------------


def _measure_in_child(
    root: Path, settings: BenchSettings, reference: Path | None, scratch: Path
) -> list[dict[str, Any]]:
    folder = "" if reference is None else str(reference)
    result = _run_child(["measure", str(root), settings.to_json(), folder], scratch)
    entries: list[dict[str, Any]] = result["entries"]
    return entries


def _run_child(arguments: list[str], scratch: Path) -> dict[str, Any]:
    """Run this module in a fresh interpreter; its KilnError comes back as the same class."""
    result_file = scratch / "child-result.json"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "modelkiln.bench.harness", str(result_file), *arguments]
    environment = {**os.environ, PARENT_VARIABLE: str(os.getpid())}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    if result_file.is_file():
        result: dict[str, Any] = json.loads(result_file.read_text(encoding="utf-8"))
        if "error" in result:
            raise errors.from_record(result["error"])
        return result
    tail = "\n".join(done.stderr.strip().splitlines()[-15:])
    raise KilnError(
        f"the isolated benchmark process died (exit {done.returncode}) before reporting; "
        f"its last output:\n{tail}"
    )


def _child(result_file: Path, action: str, arguments: list[str]) -> None:
    try:
        if action == "measure":
            root, settings = Path(arguments[0]), BenchSettings.from_json(arguments[1])
            reference = Path(arguments[2]) if arguments[2] else None
            result: dict[str, Any] = {"entries": measure_artifact(root, settings, reference)}
        else:
            root, folder = Path(arguments[0]), Path(arguments[1])
            settings = BenchSettings.from_json(arguments[2])
            _reference_here(open_artifact(root), settings, folder, NullProgress())
            result = {"reference": str(folder)}
    except KilnError as error:
        result = {"error": errors.error_record(error)}
    result_file.write_text(json.dumps(result), encoding="utf-8")


def _die_with_parent(parent: int) -> None:
    """End this child when its orchestrator is gone (killed, it cannot stop the child): a
    measuring child left running would skew every later measurement on the machine."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


if __name__ == "__main__":
    if PARENT_VARIABLE in os.environ:
        _die_with_parent(int(os.environ[PARENT_VARIABLE]))
    _child(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
