"""The README.md a bundle carries: what it is, what it needs, how to run it.

What is particular to a format or a family comes from their hooks: the backend that writes
the format says how its runtime runs the files without modelkiln (Backend.runner_readme), the
family what an app does around them (ModelFamily.app_notes).
"""

from __future__ import annotations

from collections.abc import Collection

from modelkiln.backends import format_owner
from modelkiln.models import FAMILIES
from modelkiln.packaging.targets import requirement_name
from modelkiln.records import Manifest


def render_readme(
    artifact: Manifest,
    target: str,
    requirements: tuple[str, ...],
    validated_with: dict[str, str],
    bundle_name: str,
    files: Collection[str],
) -> str:
    """The README of a bundle of `artifact` for target holding `files` (artifact-relative)."""
    profile = artifact.profile.name
    needs = [
        f"- `{requirement}`"
        + (f" (validated with {name} {validated_with[name]})" if name in validated_with else "")
        for requirement in requirements
        for name in [requirement_name(requirement)]
    ]
    components = [
        f"| {name} | `{record.entry}` | {', '.join(record.inputs)} | {', '.join(record.outputs)} |"
        for name, record in artifact.components.items()
    ]
    family = FAMILIES.get(artifact.family)
    sections = [
        format_owner(artifact.format).runner_readme(artifact.format, target, artifact),
        family.app_notes(artifact, files),
    ]
    usage = family.usage
    command = usage.get(artifact.task, "kiln info {bundle}").format(bundle=bundle_name)
    lines = [
        f"# {profile} for {target}",
        "",
        f"A modelkiln bundle: the {artifact.family} {artifact.task} model from "
        f"`{artifact.source.spec}`, as {artifact.format} files checked against the "
        f"torch model when it was built: only the files a runtime on {target} reads.",
        "",
        "## Requirements",
        "",
        *needs,
        "",
        "## Run it",
        "",
        f"With modelkiln (`pip install 'modelkiln[{artifact.runtime}]'`), straight from the "
        "bundle; it is unpacked once into `~/.cache/modelkiln/bundles` "
        "(`$MODELKILN_CACHE/bundles`) and checked:",
        "",
        "```python",
        "import modelkiln",
        "",
        f'pipeline = modelkiln.load("{bundle_name}")',
        "```",
        "",
        "or from a shell:",
        "",
        "```sh",
        f"kiln verify {bundle_name}",
        command,
        "```",
        "",
        "Without modelkiln, open each component's file with the runtime "
        "(shapes and dtypes in `kiln.json`):",
        "",
        "| component | file | inputs | outputs |",
        "| --- | --- | --- | --- |",
        *components,
        "",
        *(section.rstrip("\n") + "\n" for section in sections if section),
        "## Files",
        "",
        "`bundle.json` lists the size and sha256 of every file; `kiln.json` is the artifact's "
        "build record (source, profile, validation, library versions).",
        "",
    ]
    return "\n".join(lines)
