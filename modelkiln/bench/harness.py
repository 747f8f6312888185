"""`kiln bench`: measure built artifacts and write one report (JSON, Markdown, plots).

The orchestrator: checks the settings and artifacts up front, computes each source's torch
reference once (when accuracy is asked for), then measures every artifact — in this process,
or each in its own child process (`isolate`) so that peak memory and thread pools belong to
that artifact alone — and assembles the report that report.schema.json describes.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from modelkiln import errors
from modelkiln.bench import references
from modelkiln.bench.measure import DIFFUSION_TASKS, Plan, measure_artifact
from modelkiln.bench.schema import SCHEMA_NAME, SCHEMA_VERSION, validate_report
from modelkiln.errors import InputError, KilnError
from modelkiln.loading import Artifact, open_artifact
from modelkiln.progress import NullProgress, Progress


@dataclass(frozen=True)
class BenchSettings:
    """How to measure. None means "as each artifact's profile says" (threads, runtime)."""

    batch_sizes: tuple[int, ...] = (1,)
    warmup: int = 3
    runs: int | None = 20
    duration_s: float | None = None  # a time budget per batch size instead of `runs`
    threads: int | None = None
    # Own process per artifact: peak memory and thread pools are that artifact's alone.
    isolate: bool = True
    runtime: str | None = None
    data: str | None = None  # image models: labelled folder (ImageFolder) or "digits"
    prompts: tuple[str, ...] = ()  # diffusion: PSNR / SSIM against torch fp32
    steps: int = 4  # denoising steps per generated image
    reference: str | None = None  # where the torch reference loads from (default: the source)
    use_reference: bool = True

    def __post_init__(self) -> None:
        # TOML and JSON give lists: keep the frozen dataclass hashable and comparable.
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise InputError(f"batch sizes must be >= 1, got {list(self.batch_sizes)}")
        if self.warmup < 0:
            raise InputError(f"warmup must be >= 0, got {self.warmup}")
        if self.duration_s is not None:
            if self.duration_s <= 0:
                raise InputError(f"--duration must be > 0 seconds, got {self.duration_s}")
            object.__setattr__(self, "runs", None)  # a budget replaces the run count
        elif self.runs is None or self.runs < 1:
            raise InputError(f"runs must be >= 1, got {self.runs}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be >= 1, got {self.threads}")
        if self.steps < 1:
            raise InputError(f"steps must be >= 1, got {self.steps}")
        if self.data is not None:
            from modelkiln.datasets import image_set

            image_set(self.data, "--data", "test")  # fails now, not after minutes of timing

    def report_settings(self) -> dict[str, Any]:
        return {
            "batch_sizes": list(self.batch_sizes),
            "warmup": self.warmup,
            "runs": self.runs,
            "duration_s": self.duration_s,
            "threads": self.threads,
            "isolate": self.isolate,
            "runtime": self.runtime,
            "data": self.data,
            "prompts": list(self.prompts) or None,
            "steps": self.steps,
            "reference": self.reference if self.use_reference else "none",
        }


def run(
    artifacts: Sequence[str | Path],
    settings: BenchSettings | None = None,
    *,
    output: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Benchmark `artifacts`; the report (and, with `output`, its files in that folder)."""
    settings = settings or BenchSettings()
    progress = progress or NullProgress()
    if not artifacts:
        raise InputError("no artifacts to benchmark: give one or more artifact directories")
    opened = [open_artifact(path) for path in artifacts]
    _check_distinct_keys(opened, settings.runtime)
    entries: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as scratch:
        folders = _references(opened, settings, Path(scratch), progress)
        for index, artifact in enumerate(opened):
            plan = _plan(settings, folders.get(references.reference_key(artifact.manifest)))
            description = f"[{index + 1}/{len(opened)}] {artifact.root.name}"
            with progress.task(description):
                if settings.isolate:
                    entries += _measure_in_child(artifact.root, plan, Path(scratch))
                else:
                    entries += measure_artifact(artifact.root, plan, progress)
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
        "entries": entries,
    }
    validate_report(report)
    if output is not None:
        from modelkiln.bench.report import write_report

        write_report(report, Path(output))
    return report


def _check_distinct_keys(opened: list[Artifact], runtime: str | None) -> None:
    """kiln compare matches entries on source, profile and runtime: one artifact per key."""
    seen: dict[tuple[str, str, str], Path] = {}
    for artifact in opened:
        manifest = artifact.manifest
        key = (
            references.source_hash(manifest),
            str(manifest.profile.get("name")),
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


def _plan(settings: BenchSettings, reference: Path | None) -> Plan:
    return Plan(
        batch_sizes=settings.batch_sizes,
        warmup=settings.warmup,
        runs=settings.runs,
        duration_s=settings.duration_s,
        threads=settings.threads,
        runtime=settings.runtime,
        data=settings.data,
        prompts=settings.prompts,
        steps=settings.steps,
        reference=reference,
    )


def _references(
    opened: list[Artifact], settings: BenchSettings, scratch: Path, progress: Progress
) -> dict[str, Path]:
    """One torch reference per (weights, shapes) among the artifacts that accuracy applies to."""
    if not settings.use_reference:
        return {}
    folders: dict[str, Path] = {}
    for artifact in opened:
        manifest = artifact.manifest
        diffusion = manifest.task in DIFFUSION_TASKS
        if not (settings.prompts if diffusion else settings.data):
            continue
        key = references.reference_key(manifest)
        if key in folders:
            continue
        folder = scratch / "references" / key
        if settings.isolate:
            _run_child(["reference", str(artifact.root), str(folder), _json(settings)], scratch)
        else:
            references.compute(
                manifest,
                folder,
                data=settings.data,
                prompts=settings.prompts,
                steps=settings.steps,
                source=settings.reference,
                progress=progress,
            )
        folders[key] = folder
    return folders


# --- isolation: one child process per artifact -----------------------------------------------


def _json(settings: BenchSettings) -> str:
    return json.dumps(asdict(settings))


def _measure_in_child(root: Path, plan: Plan, scratch: Path) -> list[dict[str, Any]]:
    fields = asdict(plan)
    fields["reference"] = None if plan.reference is None else str(plan.reference)
    result = _run_child(["measure", str(root), json.dumps(fields)], scratch)
    entries: list[dict[str, Any]] = result["entries"]
    return entries


def _run_child(arguments: list[str], scratch: Path) -> dict[str, Any]:
    """Run this module in a fresh interpreter; its KilnError comes back as the same class."""
    result_file = scratch / "child-result.json"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "modelkiln.bench.harness", str(result_file), *arguments]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if result_file.is_file():
        result: dict[str, Any] = json.loads(result_file.read_text(encoding="utf-8"))
        if "error" in result:
            kind = getattr(errors, result["error"]["type"], KilnError)
            raise kind(result["error"]["message"])
        return result
    tail = "\n".join(done.stderr.strip().splitlines()[-15:])
    raise KilnError(
        f"the isolated benchmark process died (exit {done.returncode}) before reporting; "
        f"its last output:\n{tail}"
    )


def _child(result_file: Path, action: str, arguments: list[str]) -> None:
    try:
        if action == "measure":
            root, fields = Path(arguments[0]), json.loads(arguments[1])
            reference = fields.pop("reference")
            plan = Plan(
                **{
                    **fields,
                    "batch_sizes": tuple(fields["batch_sizes"]),
                    "prompts": tuple(fields["prompts"]),
                    "reference": None if reference is None else Path(reference),
                }
            )
            result: dict[str, Any] = {"entries": measure_artifact(root, plan)}
        else:
            root, folder, fields = Path(arguments[0]), Path(arguments[1]), json.loads(arguments[2])
            references.compute(
                open_artifact(root).manifest,
                folder,
                data=fields["data"],
                prompts=tuple(fields["prompts"]),
                steps=fields["steps"],
                source=fields["reference"],
                progress=NullProgress(),
            )
            result = {"reference": str(folder)}
    except KilnError as error:
        result = {"error": {"type": type(error).__name__, "message": str(error)}}
    result_file.write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    _child(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
