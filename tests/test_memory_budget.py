"""A build that cannot fit the machine's memory is refused before it exports anything, with
its estimate and what would fit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from modelkiln import memory_budget
from modelkiln.errors import UnsupportedError
from modelkiln.models import detect_family
from modelkiln.plan import load_profile
from modelkiln.sources import resolve_source

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def sd3_components(source_dir: Callable[[str], Path]) -> list:  # type: ignore[type-arg]
    source = resolve_source(source_dir("sd3"))
    return detect_family(source).load(source, load_profile("sd3-openvino-int8")).components


def test_the_estimate_reads_parameter_counts_from_the_checkpoint_headers(
    sd3_components: list,
    source_dir: Callable[[str], Path],  # type: ignore[type-arg]
) -> None:
    from diffusers import SD3Transformer2DModel

    found = memory_budget.estimate(sd3_components, whole_pipeline=True)
    assert found is not None
    model = SD3Transformer2DModel.from_pretrained(source_dir("sd3") / "transformer")
    # parameters and saved buffers (the positional embedding)
    assert found.components["transformer"] == 4 * sum(
        t.numel() for t in model.state_dict().values()
    )
    # The VAE's two halves are one module: counted once.
    assert found.components["vae_encoder"] > 0 and found.components["vae_decoder"] == 0
    assert found.needed() == found.pipeline_bytes + memory_budget.OVERHEAD_BYTES
    assert found.needed(whole_pipeline=False) == found.largest[1] + memory_budget.OVERHEAD_BYTES


def test_a_pipeline_too_big_for_its_gate_is_told_to_validate_per_component(
    sd3_components: list,  # type: ignore[type-arg]
) -> None:
    found = memory_budget.estimate(sd3_components, whole_pipeline=True)
    assert found is not None
    between = (found.needed(whole_pipeline=False) + found.needed()) / 2 / memory_budget.GB
    with pytest.raises(UnsupportedError) as refused:
        memory_budget.check_fits(found, between, "profile 'sd3-openvino-int8'")
    message = str(refused.value)
    assert message.startswith("profile 'sd3-openvino-int8': this build needs about")
    assert "run the whole fp32 torch pipeline (text_encoder " in message
    assert "--set validation.prompts=[]" in message and "\n" not in message
    memory_budget.check_fits(
        memory_budget.estimate(sd3_components, whole_pipeline=False),  # type: ignore[arg-type]
        between,
        "profile",
    )


def test_a_build_over_budget_stops_before_exporting_and_keeps_the_old_artifact(
    source_dir: Callable[[str], Path], built: Callable[..., Path], tmp_path: Path
) -> None:
    import shutil

    from modelkiln import build

    previous = tmp_path / "art"
    shutil.copytree(built("sd", "sd-torch-fp32"), previous)
    before = sorted(p.relative_to(previous) for p in previous.rglob("*"))
    with pytest.raises(UnsupportedError, match=r"validation runs \w+ whole in fp32 \(0\.0 GB\)"):
        build(
            source_dir("sd"), "sd-onnxruntime-fp32", previous, overrides=["build.max_memory_gb=0.5"]
        )
    assert sorted(p.relative_to(previous) for p in previous.rglob("*")) == before


def test_the_default_budget_is_a_share_of_this_machine() -> None:
    found = memory_budget.Estimate({"unet": 10**15}, whole_pipeline=False)
    machine = memory_budget.machine_memory_bytes() / memory_budget.GB
    with pytest.raises(UnsupportedError, match=rf"90% of this machine's {machine:.1f} GB"):
        memory_budget.check_fits(found, None, "profile")
