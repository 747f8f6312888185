"""The paired gate (kiln compare --rerun): both sides timed in alternating blocks (each in
a child process), so that load which hits one run hits both; gated on the ratio with a bootstrap
interval. A deterministic slowdown (a longer sleep) fails it; the same work on a host that
slows down halfway passes."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from modelkiln.bench.comparison import Bounds, Status
from modelkiln.bench.paired import PairedSettings, PairedTiming, gate_row, time_pair
from modelkiln.cli import cli
from modelkiln.errors import InputError

SETTINGS = PairedSettings(rounds=24, block=3)


class Host:
    """A host whose speed halves halfway through the rounds (a burner starting on a shared
    runner), as seen by a call that sleeps: deterministic where CPU timing under the suite's
    own load is not (bench/paired_gate.py measures the real burner)."""

    def __init__(self) -> None:
        self.load = 1.0

    def call(self, seconds: float) -> Callable[[], object]:
        return lambda: time.sleep(seconds * self.load)

    def on_round(self, index: int) -> None:
        if index == SETTINGS.rounds // 2:
            self.load = 2.0


def test_the_same_work_under_load_started_halfway_passes() -> None:
    host = Host()
    call = host.call(0.002)
    timing = time_pair(call, call, SETTINGS, warmup=1, label="a/a", on_round=host.on_round)
    row = gate_row(timing, Bounds())
    assert row.status is Status.OK, row.note
    assert 0.9 < timing.ratio < 1.1
    assert row.label == "a/a" and "paired ×" in row.note and "24 rounds" in row.note
    # The load doubled the second half's times: reports from before and after it differ.
    half = SETTINGS.rounds // 2
    assert np.median(timing.baseline[half:]) > 1.6 * np.median(timing.baseline[:half])


def test_a_real_slowdown_fails_and_a_speedup_improves() -> None:
    host = Host()
    fast, slow = host.call(0.002), host.call(0.003)
    timing = time_pair(fast, slow, SETTINGS, warmup=1, label="a/b", on_round=host.on_round)
    row = gate_row(timing, Bounds())
    assert row.status is Status.REGRESSED, row.note
    assert 1.3 < timing.ratio < 1.7
    assert row.p_value is not None and row.p_value < 0.05
    assert row.change == pytest.approx(timing.ratio - 1)
    faster = gate_row(time_pair(slow, fast, SETTINGS, warmup=1), Bounds())
    assert faster.status is Status.IMPROVED, faster.note


def test_a_slowdown_within_the_bound_is_ok_and_beyond_it_without_evidence_is_noise() -> None:
    steady = PairedTiming("x", (1.0,) * 10, (1.05,) * 10)
    assert gate_row(steady, Bounds()).status is Status.OK  # +5 % < the 10 % bound
    # +20 % as the median, but a third of the rounds faster: not significant.
    mixed = PairedTiming("y", (1.0,) * 9, (0.8, 1.2, 1.6) * 3)
    low, high, _ = mixed.bootstrap(0.05)
    assert low < 1 < high
    assert gate_row(mixed, Bounds()).status is Status.NOISE
    # The interval is the median's: identical rounds give a point.
    assert steady.bootstrap(0.05)[:2] == pytest.approx((1.05, 1.05))


def test_paired_settings_are_bounded() -> None:
    with pytest.raises(InputError, match=r"rounds must be in 3\.\.10000"):
        PairedSettings(rounds=2)
    with pytest.raises(InputError, match=r"block must be in 1\.\.10000"):
        PairedSettings(block=0)


def test_rounds_alternate_which_side_goes_first() -> None:
    order: list[str] = []
    time_pair(
        lambda: order.append("a"),
        lambda: order.append("b"),
        PairedSettings(rounds=4, block=1),
        warmup=0,
    )
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]


@pytest.mark.onnxruntime
def test_kiln_compare_rerun_times_two_artifacts_paired(
    built: Callable[..., Path], tmp_path: Path
) -> None:
    artifact = built("hf-classifier", "vit-onnxruntime-fp32")
    markdown = tmp_path / "paired.md"
    # Plumbing, not statistics: a bound no A/A run under the suite's own load reaches.
    args = ["compare", str(artifact), str(artifact), "--rerun", "--rounds", "6", "--block", "2"]
    args += ["--max-latency-regression", "500%"]
    result = CliRunner(env={"COLUMNS": "1000"}).invoke(cli, [*args, "--markdown", str(markdown)])
    assert result.exit_code == 0, result.output
    assert "latency (paired)" in result.stdout
    assert "passed: no regression" in result.stdout
    assert f"{artifact.name} · vit-onnxruntime-fp32 vs" in markdown.read_text(encoding="utf-8")
    missing = CliRunner().invoke(cli, ["compare", str(artifact), str(tmp_path), "--rerun"])
    assert missing.exit_code == 2, missing.output
    assert "kiln.json" in missing.output
    misplaced = CliRunner().invoke(cli, ["compare", "a.json", "b.json", "--batch-size", "2"])
    assert misplaced.exit_code == 2 and "apply to --rerun" in misplaced.output
    rounds = CliRunner().invoke(cli, ["compare", "a.json", "b.json", "--rounds", "5"])
    assert rounds.exit_code == 2 and "apply to --rerun" in rounds.output
    stored = CliRunner().invoke(cli, ["compare", "a", "b", "--rerun", "--normalise"])
    assert stored.exit_code == 2 and "apply to stored reports" in stored.output
