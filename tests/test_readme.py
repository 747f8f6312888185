"""The README, run: its bash blocks in order in a scratch folder on tiny models, its console
blocks compared with what kiln prints, its Python blocks executed. Hub ids are swapped for
tiny local models of the same kind (HUB_IDS, documented in the README's Development
section); blocks marked `<!-- not run: ... -->` install packages or run the suite itself, and
blocks marked `<!-- parsed only: ... -->` have their kiln lines checked against the CLI."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cli_support import parse_command_line

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Hub id (as the README writes it) -> the conftest source that stands in for it.
HUB_IDS = {
    "timm:vit_small_patch16_224.augreg_in21k_ft_in1k": "timm-classifier",
    "google/vit-base-patch16-224": "hf-classifier",
    "facebook/dinov2-small": "dinov2-registers",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd",
}
MARKER = re.compile(r"<!-- (not run|parsed only): (.+) -->")


@dataclass(frozen=True)
class Block:
    language: str
    text: str
    line: int  # where the fence opens, for messages
    marker: str | None  # "not run", "parsed only" or None (runs)

    def commands(self) -> list[str]:
        """The block's commands: continuation lines joined, comments and blanks dropped."""
        joined = self.text.replace("\\\n", " ")
        return [line for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def readme_blocks() -> list[Block]:
    blocks, language, start, body, marker = [], None, 0, [], None
    previous = ""
    for number, line in enumerate(README.read_text().splitlines(), start=1):
        if language is None and line.startswith("```") and len(line) > 3:
            language, start, body = line[3:].strip(), number, []
            found = MARKER.fullmatch(previous.strip())
            marker = found.group(1) if found else None
        elif language is not None and line.startswith("```"):
            blocks.append(Block(language, "\n".join(body) + "\n", start, marker))
            language = None
        elif language is not None:
            body.append(line)
        if line.strip():
            previous = line
    return blocks


def test_every_shell_block_runs_or_says_why_not() -> None:
    blocks = [b for b in readme_blocks() if b.language in ("bash", "sh", "shell", "console")]
    assert len(blocks) >= 10
    text = README.read_text()
    for marked in MARKER.finditer(text):
        assert len(marked.group(2)) > 20, f"say why: {marked.group(0)}"
    # A block that cannot run is the exception: most of the README runs here.
    assert sum(b.marker is None for b in blocks) >= 2 * sum(b.marker is not None for b in blocks)


def test_parsed_only_blocks_name_real_options() -> None:
    blocks = [b for b in readme_blocks() if b.marker == "parsed only"]
    assert blocks
    for block in blocks:
        for command in block.commands():
            words = shlex.split(command, comments=True)
            assert words[0] == "kiln", f"README line {block.line}: {command}"
            parse_command_line(words)  # an unknown option or command raises here


# --- the run ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory, source_dir: Callable[[str], Path]) -> Path:
    """The folder the README's commands run in, with the input files they name."""
    from PIL import Image

    work = tmp_path_factory.mktemp("readme")
    rng = np.random.default_rng(0)

    def image(path: Path, size: tuple[int, int] = (48, 40)) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)

    image(work / "cat.jpg")
    for index in range(3):
        image(work / "photos" / f"photo_{index}.png")
        image(work / "labelled" / f"class_{index}" / "a.png")  # the tiny ViT's label names
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(work / "mask.png")
    (work / "notes.txt").write_text("not an image\n")
    (work / "sources.txt").write_text(
        "\n".join(f"{hub_id} {source_dir(name)}" for hub_id, name in HUB_IDS.items())
    )
    return work


def swap_hub_ids(text: str, work: Path) -> str:
    for line in (work / "sources.txt").read_text().splitlines():
        hub_id, folder = line.split(" ", 1)
        text = text.replace(hub_id, folder)
    return text


def environment(work: Path) -> dict[str, str]:
    """kiln from this interpreter's environment, offline, caches inside the scratch folder."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "MODELKILN_CACHE": str(work / "cache"),
        "COLUMNS": "120",
    }


def run_blocks(work: Path) -> Iterator[tuple[Block, subprocess.CompletedProcess[str]]]:
    for block in readme_blocks():
        if block.marker is not None:
            continue
        if block.language == "bash":
            command = ["bash", "-euo", "pipefail", "-c", swap_hub_ids(block.text, work)]
        elif block.language == "python":
            command = [sys.executable, "-c", swap_hub_ids(block.text, work)]
        else:
            continue
        done = subprocess.run(
            command,
            cwd=work,
            env=environment(work),
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        yield block, done


@pytest.mark.slow
def test_the_readme_runs(scratch: Path) -> None:
    for block, done in run_blocks(scratch):
        assert done.returncode == 0, (
            f"README {block.language} block at line {block.line} failed "
            f"({done.returncode}):\n{block.text}\n--- stdout\n{done.stdout}\n--- stderr\n"
            f"{done.stderr}"
        )
    # What the blocks promised is there.
    assert np.load(scratch / "vectors.npy").shape[0] == 3
    assert np.load(scratch / "block2.npy").shape[0] == 3
    for written in (
        "lighthouse.png",
        "storm.png",
        "door.png",
        "bench/vit/report.json",
        "bench/vit/report.html",
        "gate.xml",
        "gate.md",
        "gate.png",
        "vit-int8.tar.gz",
        "my-vit.toml",
        "artifacts/my-vit/kiln.json",
        ".github/workflows/kiln-gate.yml",
    ):
        assert (scratch / written).is_file(), written


@pytest.mark.slow
def test_the_readme_errors_are_what_kiln_prints(scratch: Path) -> None:
    """Each `$ command` of a console block, run in the scratch folder after the blocks above
    (its artifacts exist), prints the lines that follow it."""
    examples = [b for b in readme_blocks() if b.language == "console"]
    assert examples
    for block in examples:
        for command, expected in _console_commands(block.text):
            done = subprocess.run(
                swap_hub_ids(command, scratch),
                shell=True,
                cwd=scratch,
                env=environment(scratch),
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            printed = [line for line in (done.stdout + done.stderr).splitlines() if line]
            assert printed == expected, f"README line {block.line}: $ {command}"


def _console_commands(text: str) -> list[tuple[str, list[str]]]:
    pairs: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            pairs.append((line[2:], []))
        elif line:
            pairs[-1][1].append(line)
    return pairs
