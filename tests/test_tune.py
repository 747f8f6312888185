"""`kiln tune`: the budget, the candidates, interleaved timing, and whole searches on the
digits ViT and a tiny SD."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cli_support import kiln_json

from modelkiln import digits
from modelkiln.bench.interleaved import time_interleaved
from modelkiln.errors import InputError, ProfileError
from modelkiln.plan import load_profile
from modelkiln.profiles import read_profile_file
from modelkiln.tune import TuneSettings, candidate_space, parse_budget, tune
from modelkiln.tune.search import INSIDE, OUTSIDE


def test_budget_becomes_the_builds_end_to_end_gate() -> None:
    budget = parse_budget("top1-drop=1, cosine=0.99")
    assert budget.bounds == (("max_accuracy_drop", 1.0), ("min_cosine", 0.99))
    assert budget.text == "top1-drop=1, cosine=0.99"
    assert budget.overrides("digits", (), None) == [
        "validation.max_accuracy_drop=1.0",
        "validation.min_cosine=0.99",
        # top-1 is the budget: the profile's bound on moved logits is not
        "validation.min_top1_agreement=0.0",
        "validation.min_sqnr_db=",
        'validation.data="digits"',
        'calibration.data="digits"',
    ]
    assert "validation.min_cosine=0.0" in parse_budget("top1-drop=1").overrides("digits", (), None)
    generated = parse_budget("psnr=30,ssim=0.9").overrides(None, ("a fox",), 4)
    assert generated[-2:] == ['validation.prompts=["a fox"]', "validation.steps=4"]
    profile = load_profile("vit-openvino-int8", budget.overrides("digits", (), None))
    assert profile.validation.max_accuracy_drop == 1.0 and profile.validation.data == "digits"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("top1=1", r"budget 'top1=1' is not one of top1-drop=N .*\(did you mean 'top1-drop'\?\)"),
        ("psnr", r"budget 'psnr' is not one of"),
        ("psnr=-3", r"budget psnr must be a finite number >= 0, got '-3'"),
        ("ssim=nan", r"budget ssim must be a finite number >= 0, got 'nan'"),
    ],
)
def test_bad_budgets_are_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_budget(text)


def test_candidates_turn_one_knob_the_plan_accepts() -> None:
    bf16_cpu = ["avx512_bf16"]
    space = candidate_space("vit", ["openvino"], cpu_features=bf16_cpu)
    labels = {candidate.label for candidate in space}
    assert "vit-openvino-int8-static" in labels
    assert "vit-openvino-int8-static [precision.compute=fp32]" in labels
    assert "vit-openvino-int8-static [quantization.per_channel=true]" in labels
    assert "vit-openvino-int4 [quantization.group_size=64]" in labels
    assert "vit-openvino-fp32 [precision.compute=bf16]" in labels
    assert "vit-openvino-int8-static [model.token_merging=8]" in labels  # the family's knob
    assert all(candidate.base.startswith("vit-openvino-") for candidate in space)
    # bf16 only where the CPU computes it natively (kiln env's features)
    plain = {c.label for c in candidate_space("vit", ["openvino"], cpu_features=["avx2"])}
    assert "vit-openvino-fp32 [precision.compute=bf16]" not in plain
    # ExecuTorch's int4 needs every layer in int4: no int8 share variant
    executorch = {c.label for c in candidate_space("vit", ["executorch"], cpu_features=bf16_cpu)}
    assert not any("ratio" in label for label in executorch)
    assert "vit-executorch-int4 [quantization.group_size=64]" in executorch
    # SD's pipeline stops guidance early; LCM's and Turbo's profiles only when named
    sd = {c.label for c in candidate_space("sd", ["openvino"], cpu_features=bf16_cpu)}
    assert "sd-openvino-int8 [generation.guidance_end=0.5]" in sd
    assert "sd-openvino-int8 [model.deep_cache=3]" in sd  # and reuses the UNet's features
    assert "sd-openvino-int8 [model.token_merging_ratio=0.5]" in sd  # and merges its tokens
    forecast = "generation.taylorseer_interval=3, generation.taylorseer_warmup=2"
    assert f"sd-openvino-int8 [{forecast}, generation.taylorseer_cooldown=1]" in sd  # TaylorSeer
    # The hybrid UNet's MatMuls on float weights: only where bf16 is native, and not with AMX
    # (where the int8 weights are decompressed at load instead)
    assert "sd-openvino-int8-hybrid [quantization.matmul_weights=float]" in sd
    amx = {
        c.label for c in candidate_space("sd", ["openvino"], cpu_features=[*bf16_cpu, "amx_bf16"])
    }
    assert "sd-openvino-int8-hybrid" in amx
    assert not any("matmul_weights" in label for label in amx)
    assert not any("matmul_weights" in label for label in plain | executorch)
    sd_plain = {c.label for c in candidate_space("sd", ["openvino"], cpu_features=["avx2"])}
    assert "sd-openvino-int8-hybrid" in sd_plain
    assert not any("matmul_weights" in label for label in sd_plain)
    sd3 = {c.label for c in candidate_space("sd3", ["openvino"], cpu_features=bf16_cpu)}
    assert "sd3-openvino-int8 [generation.guidance_end=0.5]" in sd3
    assert not any("deep_cache" in label for label in sd3)  # a transformer: no UNet to split
    assert not any("token_merging" in label for label in sd3)
    assert "sd3-openvino-int8 [model.first_block_cache=0.1]" in sd3  # but blocks to skip
    assert not any(label.startswith("sd-lcm") for label in sd)
    bundled = candidate_space("sd", ["openvino"], bases=["sd-openvino-int8"], wide=False)
    assert [c.label for c in bundled] == ["sd-openvino-int8"]
    flux = {c.label for c in candidate_space("flux", ["openvino"], cpu_features=bf16_cpu)}
    assert flux and not any("guidance_end" in label for label in flux)
    assert "flux-openvino-int8 [model.first_block_cache=0.1]" in flux


def test_candidate_space_errors_name_the_fix() -> None:
    with pytest.raises(InputError, match=r"no bundled vit profile runs on tensorrt on this"):
        candidate_space("vit", ["tensorrt"])
    with pytest.raises(InputError, match=r"'sd-openvino-int8' is for sd models, not vit"):
        candidate_space("vit", None, bases=["sd-openvino-int8"])
    with pytest.raises(ProfileError, match="vit-openvino-int9"):
        candidate_space("vit", None, bases=["vit-openvino-int9"])
    # a budget that does not suit the family is the user's error, not an empty search
    accuracy = parse_budget("top1-drop=1").overrides(None, (), None)
    with pytest.raises(ProfileError, match="max_accuracy_drop needs labelled images"):
        candidate_space("vit", ["openvino"], overrides=accuracy)


@pytest.mark.parametrize("keep_open", [True, False])
def test_interleaved_rounds_alternate_the_order_and_never_time_opening(keep_open: bool) -> None:
    events: list[str] = []

    @contextmanager
    def opener(label: str) -> Iterator[Callable[[], object]]:
        events.append(f"open {label}")
        yield lambda: events.append(label)
        events.append(f"close {label}")

    timings = time_interleaved(["a", "b"], opener, rounds=3, block=2, warmup=1, keep_open=keep_open)
    assert [len(t.rounds) for t in timings.values()] == [3, 3]
    calls = [e for e in events if " " not in e]
    # 1 warm-up each (once, or per block), then blocks of 2: a b | b a | a b
    if keep_open:
        assert events[:4] == ["open a", "a", "open b", "b"]
        assert calls[2:] == ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
        assert events[-2:] == ["close b", "close a"]
    else:
        assert events[:5] == ["open a", "a", "a", "a", "close a"]
        assert (
            events.count("open a") == 3 and calls == ["a"] * 3 + ["b"] * 6 + ["a"] * 6 + ["b"] * 3
        )
    with pytest.raises(InputError, match="nothing to time"):
        time_interleaved([], opener)


@pytest.mark.slow
@pytest.mark.onnxruntime
def test_tune_finds_the_fastest_digits_build_inside_the_budget(tmp_path: Path) -> None:
    model = digits.trained_model()
    settings = TuneSettings(parse_budget("top1-drop=1"), data="digits", batch=8, rounds=3)
    profiles = ["vit-onnxruntime-int8"]
    result = tune(model, settings, tmp_path, runtimes=["onnxruntime"], profiles=profiles)
    labels = [t.candidate.label for t in result.tried]
    assert labels == [
        "vit-onnxruntime-int8",
        "vit-onnxruntime-int8 [quantization.symmetric=true]",
        "vit-onnxruntime-int8 [quantization.per_channel=true]",
        "vit-onnxruntime-int8 [model.token_merging=8]",
    ]
    inside = [t for t in result.tried if t.status == INSIDE]
    assert inside, [t.reason for t in result.tried]
    for tried in inside:
        assert tried.latency_s is not None and tried.quality["top1_drop"] <= 1.0
        assert tried.quality["top1"] >= 0.9  # the digits ViT is trained: 98 %
    winner = result.winner
    assert winner is not None and result.best_bundled is not None
    # at least as fast as every bundled profile inside the same budget, by construction of
    # one interleaved measurement
    assert winner.latency_s == min(t.latency_s for t in inside if t.latency_s is not None)
    assert result.profile_file == tmp_path / "tuned.toml"
    tuned = read_profile_file(result.profile_file)
    expected = load_profile(winner.candidate.base, list(winner.candidate.changes))
    assert tuned.name == f"{winner.candidate.base}-tuned"
    assert tuned.quantization == expected.quantization and tuned.export == expected.export
    assert tuned.validation.max_accuracy_drop == 1.0 and tuned.validation.data == "digits"
    assert "kiln tune's fastest build inside top1-drop=1" in tuned.description
    recorded = json.loads((tmp_path / "tune.json").read_text())
    assert recorded["winner"] == winner.candidate.label
    assert [c["label"] for c in recorded["candidates"]] == labels
    table = (tmp_path / "tune.md").read_text()
    assert f"| {winner.candidate.label} **(winner)** | inside budget |" in table
    assert table.count("\n| vit-onnxruntime") == 4

    # The same search from the command line, its one build from the search's cache.
    document = kiln_json(
        "tune", "tune", model, "--budget", "top1-drop=1", "--data", "digits",
        "--target", "onnxruntime", "-p", "vit-onnxruntime-int8", "--bundled-only",
        "--rounds", "2", "--batch-size", "8", "--work", tmp_path,
    )  # fmt: skip
    assert document["winner"] == "vit-onnxruntime-int8"
    (only,) = document["candidates"]
    assert only["quality"] == recorded["candidates"][0]["quality"]  # the same build, restored


@pytest.mark.slow
@pytest.mark.torch
def test_tune_on_a_tiny_sd_gates_its_approximations_and_reports_what_missed(
    source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    settings = TuneSettings(parse_budget("psnr=99"), prompts=("a red fox",), steps=4, rounds=2)
    result = tune(source_dir("sd"), settings, tmp_path, profiles=["sd-torch-fp32"])
    by_label = {t.candidate.label: t for t in result.tried}
    # (and, on a CPU with native bf16, torch's bf16 compute)
    assert result.tried[0].candidate.label == "sd-torch-fp32"
    assert "sd-torch-fp32 [generation.guidance_end=0.5]" in by_label
    # torch fp32 is the reference itself: identical images; stopping guidance is not
    exact = by_label["sd-torch-fp32"]
    assert exact.status == INSIDE and exact.quality["min_psnr_db"] == float("inf")
    early = by_label["sd-torch-fp32 [generation.guidance_end=0.5]"]
    assert early.status == OUTSIDE and early.latency_s is None
    assert early.reason is not None and "< validation.min_psnr_db = 99.0" in early.reason
    cached = by_label["sd-torch-fp32 [model.deep_cache=3]"]
    assert cached.status == OUTSIDE and cached.reason is not None
    assert "lower model.deep_cache" in cached.reason
    merged = by_label["sd-torch-fp32 [model.token_merging_ratio=0.5]"]
    assert merged.status == OUTSIDE and merged.reason is not None
    assert "lower model.token_merging_ratio" in merged.reason
    (forecast,) = [t for t in result.tried if "taylorseer_interval=3" in t.candidate.label]
    assert forecast.status == OUTSIDE and forecast.reason is not None
    assert "lower generation.taylorseer_interval" in forecast.reason
    assert result.winner is exact
    recorded = json.loads((tmp_path / "tune.json").read_text())
    assert recorded["candidates"][0]["quality"]["min_psnr_db"] is None  # identical: no number
