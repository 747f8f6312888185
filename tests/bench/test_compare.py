"""kiln compare on synthetic reports: what regresses, what is noise, and what CI gets back."""

from __future__ import annotations

import copy
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from reports import entry, latency, report

from modelkiln.bench.compare import (
    LATENCY,
    MEMORY,
    THROUGHPUT,
    Bounds,
    Comparison,
    Row,
    Status,
    can_decide,
    compare_files,
    compare_reports,
)
from modelkiln.cli import cli
from modelkiln.errors import InputError, ReportError

B1 = "a1b2c3d4e5f60718/vit-openvino-int8/openvino/b1"
B8 = "a1b2c3d4e5f60718/vit-openvino-int8/openvino/b8"
# What a reader sees instead of the key: artifact · profile · batch.
NAME1 = "vit-openvino-int8 · vit-openvino-int8 · b1"
NAME8 = "vit-openvino-int8 · vit-openvino-int8 · b8"
WIDE = {"COLUMNS": "1000"}


def slower_report(factor: float = 1.3, **fields: Any) -> dict[str, Any]:
    """The default report with batch 1 `factor` times slower, measured with other seeds."""
    return report(
        [
            entry(batch_size=1, median_s=0.010 * factor, seed=1, **fields),
            entry(batch_size=8, median_s=0.060, seed=2),
        ]
    )


def row(comparison: Comparison, key: str, metric: str) -> Row:
    (found,) = [r for r in comparison.rows if r.key == key and str(r.metric) == metric]
    return found


def with_samples(samples: list[float], **fields: Any) -> dict[str, Any]:
    """An entry whose latency (and throughput) come from these exact samples."""
    made = entry(**fields)
    made["latency"] = latency(samples)
    made["throughput_per_s"] = made["batch_size"] / made["latency"]["mean_s"]
    return made


# --- the library ----------------------------------------------------------------------------


def test_a_slowdown_beyond_noise_regresses() -> None:
    comparison = compare_reports(report(), slower_report(1.3))
    assert comparison.failed
    assert {(r.key, r.metric) for r in comparison.regressions} == {(B1, LATENCY), (B1, THROUGHPUT)}
    slow = row(comparison, B1, "latency p50")
    assert slow.change is not None and 0.25 < slow.change < 0.35
    assert slow.p_value is not None and slow.p_value < 1e-4
    assert row(comparison, B8, "latency p50").status is Status.OK
    assert comparison.verdict.startswith("FAILED: 2 regression(s)")


def test_a_speedup_is_an_improvement_not_a_failure() -> None:
    comparison = compare_reports(report(), slower_report(0.7))
    assert not comparison.failed
    assert row(comparison, B1, "latency p50").status is Status.IMPROVED
    assert row(comparison, B1, "throughput").status is Status.IMPROVED
    assert "2 improved" in comparison.verdict


def test_the_same_distribution_measured_again_is_ok() -> None:
    comparison = compare_reports(report(), slower_report(1.0))
    assert not comparison.failed
    assert {r.status for r in comparison.rows} == {Status.OK}
    assert comparison.verdict == "passed: no regression beyond the bounds (2 entries compared)"


def test_a_large_shift_of_few_spread_samples_is_noise() -> None:
    # p50 +17 %, but five runs each spread over 3x: the ranks interleave.
    baseline = report([with_samples([0.010, 0.030, 0.012, 0.025, 0.008])])
    current = report([with_samples([0.011, 0.028, 0.014, 0.026, 0.009], seed=1)])
    comparison = compare_reports(baseline, current)
    slow = row(comparison, B1, "latency p50")
    assert slow.change is not None and slow.change > 0.10
    assert slow.status is Status.NOISE
    assert slow.p_value is not None and slow.p_value >= 0.05
    assert "not significant" in slow.note
    assert not comparison.failed


@pytest.mark.parametrize(("n_baseline", "n_current"), [(2, 2), (1, 20), (3, 3)])
def test_too_few_samples_leave_the_bound_to_decide(n_baseline: int, n_current: int) -> None:
    baseline = report([with_samples([0.010] * n_baseline)])
    current = report([with_samples([0.013] * n_current)])
    comparison = compare_reports(baseline, current)
    slow = row(comparison, B1, "latency p50")
    assert slow.status is Status.REGRESSED
    assert slow.p_value is None
    assert f"{n_baseline} vs {n_current} samples: too few" in slow.note
    assert "the bound alone decides" in slow.note


def test_can_decide_needs_a_reachable_p_value() -> None:
    assert can_decide(20, 20, 0.05)
    assert can_decide(3, 20, 0.05)
    assert not can_decide(2, 20, 0.05)
    # 3 vs 3: the smallest exact p-value is 1/20 = 0.05, never below 0.05.
    assert not can_decide(3, 3, 0.05)
    assert can_decide(3, 3, 0.06)


def test_a_throughput_drop_fails_on_its_own_bound() -> None:
    bounds = Bounds(max_latency_regression=0.5, max_throughput_drop=0.10)
    comparison = compare_reports(report(), slower_report(1.2), bounds)
    assert row(comparison, B1, "latency p50").status is Status.OK
    drop = row(comparison, B1, "throughput")
    assert drop.status is Status.REGRESSED
    assert drop.change is not None and -0.2 < drop.change < -0.1
    assert drop.p_value is not None and drop.p_value < 1e-4
    assert drop.bound_text == "-10%"


@pytest.mark.parametrize(
    ("current", "status"),
    [(97.9, Status.REGRESSED), (98.1, Status.OK), (98.0, Status.OK), (99.5, Status.IMPROVED)],
)
def test_accuracy_drop_beyond_half_a_point_fails(current: float, status: Status) -> None:
    comparison = compare_reports(report([entry(top1=98.5)]), report([entry(top1=current, seed=1)]))
    accuracy = row(comparison, B1, "accuracy top1")
    assert accuracy.status is status
    assert accuracy.change == pytest.approx(current - 98.5)
    assert comparison.failed is (status is Status.REGRESSED)


def psnr(made: dict[str, Any], score: float | None) -> dict[str, Any]:
    made["accuracy"] = {"metric": "psnr_db", "score": score, "psnr_db": [score]}
    return made


@pytest.mark.parametrize(
    ("baseline", "current", "status"),
    [(None, None, Status.OK), (None, 30.0, Status.REGRESSED), (30.0, None, Status.IMPROVED)],
)
def test_a_null_psnr_is_identical_images(
    baseline: float | None, current: float | None, status: Status
) -> None:
    comparison = compare_reports(
        report([psnr(entry(), baseline)]), report([psnr(entry(seed=1), current)])
    )
    accuracy = row(comparison, B1, "accuracy psnr_db")
    assert accuracy.status is status
    assert "identical" in accuracy.baseline_text + accuracy.current_text


def test_scores_of_different_metrics_are_not_comparable() -> None:
    comparison = compare_reports(report([entry()]), report([psnr(entry(seed=1), 30.0)]))
    accuracy = row(comparison, B1, "accuracy")
    assert accuracy.status is Status.NOT_COMPARABLE
    assert accuracy.note == "baseline measured top1, current psnr_db"
    # What was not measured did not pass: failing, unless allowed.
    assert comparison.failed
    assert "1 metric(s) not comparable (--allow-missing accepts them)" in comparison.verdict
    allowed = compare_reports(
        report([entry()]), report([psnr(entry(seed=1), 30.0)]), allow_missing=True
    )
    assert not allowed.failed
    assert "1 not comparable" in allowed.verdict


def test_accuracy_on_one_side_only_is_not_comparable() -> None:
    comparison = compare_reports(report([entry()]), report([entry(top1=None, seed=1)]))
    accuracy = row(comparison, B1, "accuracy top1")
    assert accuracy.status is Status.NOT_COMPARABLE
    assert accuracy.note == "no accuracy in the current report"
    neither = compare_reports(report([entry(top1=None)]), report([entry(top1=None, seed=1)]))
    assert not [r for r in neither.rows if str(r.metric).startswith("accuracy")]


def test_memory_growth_beyond_the_bound_fails() -> None:
    comparison = compare_reports(
        report([entry()]), report([entry(peak_rss_bytes=700_000_000, seed=1)])
    )
    memory = row(comparison, B1, "peak RSS")
    assert memory.metric is MEMORY
    assert memory.status is Status.REGRESSED
    assert memory.change_text == "+40.0%"
    assert (memory.baseline_text, memory.current_text) == ("500.0 MB", "700.0 MB")
    within = compare_reports(report([entry()]), report([entry(peak_rss_bytes=590_000_000)]))
    assert row(within, B1, "peak RSS").status is Status.OK


def test_memory_on_one_side_only_is_not_comparable() -> None:
    comparison = compare_reports(report([entry()]), report([entry(peak_rss_bytes=None)]))
    memory = row(comparison, B1, "peak RSS")
    assert (memory.status, memory.note) == (Status.NOT_COMPARABLE, "no peak RSS in the current")
    neither = compare_reports(
        report([entry(peak_rss_bytes=None)]), report([entry(peak_rss_bytes=None, seed=1)])
    )
    assert not [r for r in neither.rows if r.metric is MEMORY]


def test_entries_missing_from_current_fail_unless_allowed_and_new_ones_pass() -> None:
    baseline = report([entry(batch_size=1), entry(batch_size=8)])
    current = report([entry(batch_size=1, seed=1), entry(batch_size=4)])
    comparison = compare_reports(baseline, current)
    assert comparison.missing == (B8,)
    assert comparison.new == ("a1b2c3d4e5f60718/vit-openvino-int8/openvino/b4",)
    assert comparison.failed
    assert comparison.verdict == (
        "FAILED: 1 entry missing from the current report and 0 metric(s) not comparable "
        "(--allow-missing accepts them)"
    )
    assert {r.key for r in comparison.compared} == {B1}
    assert not compare_reports(baseline, current, allow_missing=True).failed
    only_new = compare_reports(report([entry()]), report([entry(seed=1), entry(batch_size=4)]))
    assert not only_new.failed


def test_no_entry_in_common_is_unusable() -> None:
    with pytest.raises(ReportError, match=r"no entry in common: baseline has .*/b1, current has"):
        compare_reports(report([entry(batch_size=1)]), report([entry(batch_size=4)]))


def test_duplicate_keys_are_unusable() -> None:
    with pytest.raises(ReportError, match=r"the current report has two entries with key .*/b1"):
        compare_reports(report([entry()]), report([entry(), entry(seed=1)]))


def test_different_machines_need_the_flag() -> None:
    other = report(fingerprint="fedcba9876543210", cpu={**report()["machine"]["cpu"]})
    other["machine"]["cpu"]["model"] = "AMD EPYC 9654"
    with pytest.raises(ReportError) as caught:
        compare_reports(report(), other)
    message = str(caught.value)
    assert "Intel(R) Xeon(R) Platinum 8480+" in message
    assert "AMD EPYC 9654" in message
    assert "--allow-different-machine" in message
    comparison = compare_reports(report(), other, allow_different_machine=True)
    assert comparison.different_machine
    assert "AMD EPYC 9654" in comparison.machine_warning
    assert "different machines" in comparison.to_markdown()


def test_an_invalid_report_names_the_field() -> None:
    broken = report()
    del broken["entries"][0]["latency"]["samples"]
    with pytest.raises(ReportError, match=r"current report .* at entries/0/latency: 'samples'"):
        compare_reports(report(), broken)


def test_bounds_reject_negative_values() -> None:
    with pytest.raises(ValueError, match="max_memory_growth must be a finite number >= 0"):
        Bounds(max_memory_growth=-0.1)
    with pytest.raises(ValueError, match="alpha must be between 0 and 1"):
        Bounds(alpha=0)


def test_junit_has_one_case_per_metric_and_the_failures(tmp_path: Path) -> None:
    current = slower_report(1.3)
    current["entries"][1] = psnr(current["entries"][1], 30.0)
    current["entries"].append(entry(batch_size=4))
    comparison = compare_reports(report(), current)
    path = tmp_path / "ci" / "compare.xml"
    comparison.write_junit(path)
    suite = ET.parse(path).getroot()
    assert suite.tag == "testsuite"
    assert suite.get("name") == "kiln compare"
    cases = suite.findall("testcase")
    assert len(cases) == len(comparison.rows) == int(suite.get("tests", ""))
    failed = {(c.get("classname"), c.get("name")) for c in cases if c.find("failure") is not None}
    # The accuracy measured as another metric was not compared: a failure, not a skip.
    assert failed == {(NAME1, "latency p50"), (NAME1, "throughput"), (NAME8, "accuracy")}
    assert suite.get("failures") == "3"
    message = suite.find("testcase/failure")
    assert message is not None
    assert message.get("message", "").startswith("latency p50 +")
    skipped = {(c.get("classname"), c.get("name")) for c in cases if c.find("skipped") is not None}
    assert skipped == {("vit-openvino-int8 · vit-openvino-int8 · b4", "entry")}
    properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert (
        properties["baseline.cpu"]
        == properties["current.cpu"]
        == ("Intel(R) Xeon(R) Platinum 8480+")
    )
    assert properties["different_machine"] == "false"


def test_markdown_has_the_verdict_the_table_and_the_lists() -> None:
    current = slower_report(1.3)
    current["entries"].append(entry(batch_size=4))
    markdown = compare_reports(report([entry(), entry(batch_size=2)]), current).to_markdown()
    assert markdown.startswith("## kiln compare: ❌ FAILED: 2 regression(s)")
    assert f"| {NAME1} | latency p50 |" in markdown
    assert "**regressed**" in markdown
    assert "**New (only in the current report):**" in markdown
    assert "- vit-openvino-int8 · vit-openvino-int8 · b2" in markdown
    # What passes folds away under a summary; what moved stays in view.
    shown, folded = markdown.split("<details>")
    assert "**regressed**" in shown and "**regressed**" not in folded
    assert f"| {NAME1} | accuracy top1 |" in folded
    passing = compare_reports(report(), slower_report(1.0)).to_markdown()
    assert passing.startswith("## kiln compare: ✅ passed")


def test_compare_files_reads_and_validates(tmp_path: Path) -> None:
    baseline, current = write(tmp_path, report(), slower_report(1.0))
    assert not compare_files(baseline, current).failed
    with pytest.raises(ReportError, match="no bench report at"):
        compare_files(tmp_path / "absent.json", current)


# --- the CLI --------------------------------------------------------------------------------


def write(tmp_path: Path, baseline: Any, current: Any) -> tuple[Path, Path]:
    paths = tmp_path / "baseline.json", tmp_path / "current.json"
    for path, data in zip(paths, (baseline, current), strict=True):
        with path.open("w", encoding="utf-8") as file:
            json.dump(data, file)
    return paths


def kiln_compare(tmp_path: Path, baseline: Any, current: Any, *options: object) -> Result:
    paths = write(tmp_path, baseline, current)
    return CliRunner(env=WIDE).invoke(cli, ["compare", *map(str, (*paths, *options))])


def test_cli_exits_1_on_a_regression_and_still_writes_the_reports(tmp_path: Path) -> None:
    junit, markdown = tmp_path / "out" / "junit.xml", tmp_path / "out" / "summary.md"
    result = kiln_compare(
        tmp_path, report(), slower_report(1.3), "--junit", junit, "--markdown", markdown
    )
    assert result.exit_code == 1, result.output
    assert NAME1 in result.stdout
    assert "regressed" in result.stdout
    assert "FAILED: 2 regression(s)" in result.stdout
    assert ET.parse(junit).getroot().get("failures") == "2"
    assert "FAILED" in markdown.read_text(encoding="utf-8")


@pytest.mark.parametrize("factor", [1.0, 0.7])
def test_cli_exits_0_without_a_regression(tmp_path: Path, factor: float) -> None:
    result = kiln_compare(tmp_path, report(), slower_report(factor))
    assert result.exit_code == 0, result.output
    assert "passed: no regression" in result.stdout
    assert ("improved" in result.stdout) is (factor < 1)


def test_cli_lists_new_and_missing_entries(tmp_path: Path) -> None:
    result = kiln_compare(tmp_path, report(), report([entry(seed=1), entry(batch_size=4)]))
    assert result.exit_code == 1, result.output
    assert f"missing (only in baseline): {NAME8}" in result.stdout
    assert "new (only in current): vit-openvino-int8 · vit-openvino-int8 · b4" in result.stdout
    assert "--allow-missing accepts them" in result.stdout
    allowed = kiln_compare(
        tmp_path, report(), report([entry(seed=1), entry(batch_size=4)]), "--allow-missing"
    )
    assert allowed.exit_code == 0, allowed.output


def test_cli_bounds_loosen_the_gate(tmp_path: Path) -> None:
    result = kiln_compare(
        tmp_path,
        report(),
        slower_report(1.3),
        "--max-latency-regression",
        "40%",
        "--max-throughput-drop",
        "40",
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("value", ["-5%", "abc", "-1", "inf"])
def test_cli_rejects_bad_percentages(tmp_path: Path, value: str) -> None:
    result = kiln_compare(tmp_path, report(), report(), "--max-latency-regression", value)
    assert result.exit_code == 2
    assert "Invalid value for '--max-latency-regression'" in result.stderr
    assert value in result.stderr


@pytest.mark.parametrize(
    ("baseline", "current", "message"),
    [
        (report([entry(batch_size=1)]), report([entry(batch_size=4)]), "no entry in common"),
        ({"schema": "something-else"}, report(), "is not a modelkiln bench report"),
        (report(), {**report(), "schema_version": 2}, "has schema_version 2"),
    ],
)
def test_cli_exits_2_on_unusable_input(
    tmp_path: Path, baseline: Any, current: Any, message: str
) -> None:
    result = kiln_compare(tmp_path, baseline, current)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ")
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_names_the_invalid_field(tmp_path: Path) -> None:
    broken = report()
    broken["entries"][1]["throughput_per_s"] = "fast"
    result = kiln_compare(tmp_path, report(), broken)
    assert result.exit_code == 2
    assert "current.json does not match the bench report schema at entries/1/throughput_per_s" in (
        result.stderr
    )


def test_cli_exits_2_on_a_missing_or_unparsable_file(tmp_path: Path) -> None:
    baseline, _ = write(tmp_path, report(), report())
    (tmp_path / "garbage.json").write_text("{not json", encoding="utf-8")
    runner = CliRunner(env=WIDE)
    absent = runner.invoke(cli, ["compare", str(baseline), str(tmp_path / "absent.json")])
    assert absent.exit_code == 2
    assert "no bench report at" in absent.stderr
    garbage = runner.invoke(cli, ["compare", str(baseline), str(tmp_path / "garbage.json")])
    assert garbage.exit_code == 2
    assert "garbage.json is not valid JSON (" in garbage.stderr


def test_cli_different_machine_needs_the_flag(tmp_path: Path) -> None:
    other = report(fingerprint="fedcba9876543210")
    refused = kiln_compare(tmp_path, report(), other)
    assert refused.exit_code == 2
    assert "--allow-different-machine" in refused.stderr
    junit = tmp_path / "junit.xml"
    allowed = kiln_compare(tmp_path, report(), other, "--allow-different-machine", "--junit", junit)
    assert allowed.exit_code == 0, allowed.output
    assert "warning: measured on different machines" in allowed.stderr
    properties = {p.get("name"): p.get("value") for p in ET.parse(junit).iter("property")}
    assert properties["different_machine"] == "true"
    assert properties["current.fingerprint"] == "fedcba9876543210"


def test_a_report_with_a_non_finite_measurement_is_unusable() -> None:
    good = report([entry()])
    bad = copy.deepcopy(good)
    bad["entries"][0]["latency"]["p50_s"] = math.nan
    bad["entries"][0]["latency"]["samples"] = [math.nan] * 20
    with pytest.raises(
        ReportError,
        match=r"current report has a number that is not finite at "
        r"entries/0/latency/",
    ):
        compare_reports(good, bad)


@pytest.mark.parametrize("field", ["max_latency_regression", "max_accuracy_drop"])
def test_a_nan_bound_is_refused(field: str) -> None:
    with pytest.raises(InputError, match=rf"{field} must be a finite number >= 0, got nan"):
        Bounds(**{field: math.nan})  # type: ignore[arg-type]


def calibrated(data: dict[str, Any], seconds: float, created: str) -> dict[str, Any]:
    return {
        **data,
        "created": created,
        "calibration": {"workload": "matmul", "before_s": seconds, "after_s": seconds},
    }


def test_host_drift_is_reported_and_normalised_when_asked(tmp_path: Path) -> None:
    # The same build measured on a host running everything 1.3x slower.
    baseline = calibrated(report(), 0.010, "2026-12-06T08:00:00+00:00")
    current = calibrated(slower_report(1.3), 0.013, "2026-12-06T14:30:00+00:00")
    plain = compare_reports(baseline, current)
    assert plain.failed and plain.drift is not None
    assert plain.drift.ratio == pytest.approx(1.3)
    assert plain.drift_note == (
        "the calibration workload ran ×1.30 (slower) in the current report, measured 6.5 h "
        "apart: the host's own drift, not the builds'; --normalise divides by it"
    )
    fair = compare_reports(baseline, current, normalise=True)
    assert not fair.failed, fair.verdict
    assert row(fair, B1, "latency p50").current == pytest.approx(0.010, rel=0.05)
    assert "Host drift: the calibration workload ran ×1.30" in fair.to_markdown()
    assert "timings normalised by it" in fair.drift_note
    with pytest.raises(ReportError, match="--normalise needs both reports' calibration"):
        compare_reports(report(), current, normalise=True)
    result = kiln_compare(tmp_path, baseline, current, "--normalise")
    assert result.exit_code == 0, result.output
    assert "host drift: the calibration workload ran ×1.30" in result.stderr
