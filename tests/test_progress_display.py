"""How kiln shows progress: live bars on a terminal, lines in logs, ✗ where a step failed."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_support import Outcome, assert_one_line_error
from rich.console import Console
from rich.progress import Progress as RichProgressBar

from modelkiln.cli.console import LineProgress, RichProgress, progress_columns

PROFILE = "vit-onnxruntime-fp32"


def _lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_log_lines_say_done_with_the_count_and_failed_with_a_cross(
    capsys: pytest.CaptureFixture[str],
) -> None:
    progress = LineProgress()
    with progress.task("denoising", total=3) as advance:
        advance(1)
        advance(2)
    with pytest.raises(RuntimeError), progress.task("exporting unet to onnx"):
        raise RuntimeError("boom")
    done, failed = _lines(capsys)
    assert done.startswith("✓ denoising 3/3 (") and done.endswith(" s)")
    assert failed.startswith("✗ exporting unet to onnx (failed after ")


def test_a_long_counted_step_logs_its_count_and_eta_on_the_way(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(LineProgress, "LINE_EVERY_S", 0.0)  # every step counts as long
    with LineProgress().task("denoising", total=4) as advance:
        for _ in range(4):
            advance(1)
    lines = _lines(capsys)
    # Steps 1..3 each print a line (the 4th is the ✓ line): count, elapsed, time left.
    assert [line.split(" (")[0] for line in lines[:3]] == [
        "  denoising 1/4",
        "  denoising 2/4",
        "  denoising 3/4",
    ]
    assert all("s left)" in line for line in lines[:3])
    assert lines[3].startswith("✓ denoising 4/4")


def test_a_terminal_keeps_a_failed_step_on_screen_marked() -> None:
    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=100, color_system=None)
    display = RichProgressBar(*progress_columns(), console=terminal, transient=False)
    with display:
        progress = RichProgress(display)
        with progress.task("denoising", total=5) as advance:
            advance(5)
        with pytest.raises(KeyboardInterrupt), progress.task("validating unet"):
            raise KeyboardInterrupt
    final = screen.getvalue().split("\x1b[2K")[-3:]  # the last frame: one line per task
    text = "".join(final)
    assert "✓ denoising" in text and "5/5" in text
    assert "✗ validating unet" in text


def test_a_validation_miss_is_a_failed_step_not_a_done_one(
    source_dir: Callable[[str], Path], tmp_path: Path, kiln_main: Callable[..., Outcome]
) -> None:
    outcome = kiln_main(
        "build", source_dir("hf-classifier"), "-p", PROFILE, "-o", tmp_path / "out",
        "--set", "validation.atol=1e-30",
    )  # fmt: skip
    line = assert_one_line_error(outcome, "vision_model", progress=True)
    steps = outcome.err_lines[:-1]
    assert not any(step.startswith("✓ validating") for step in steps), steps
    assert steps[-2].startswith("✗ validating vision_model (onnx on onnxruntime, fp32)")
    assert steps[-1].startswith("✗ building 1 component(s)")
    assert "tolerance" in line or "max-abs" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("width", [60, 80, 120])
def test_the_build_summary_fits_the_terminal(built: Callable[..., Path], width: int) -> None:
    from modelkiln.artifact import read_manifest
    from modelkiln.cli.build import validation_table

    manifest = read_manifest(built("hf-classifier", PROFILE))
    screen = io.StringIO()
    Console(file=screen, width=width, color_system=None).print(validation_table(manifest))
    lines = screen.getvalue().splitlines()
    assert max(len(line) for line in lines) <= width
    # Narrow terminals fold a cell inside its column; the rows stay rows.
    assert any("logits" in line and "e-" in line for line in lines), lines
