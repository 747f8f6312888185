"""Components built one block at a time (exporters/by_block.py): what a build of a model larger
than memory does for SD 3.5 Large's transformer and T5-XXL, run here on the tiny SD3 and Flux
pipelines with `build.by_block = "always"`.

The blocks run in order compute exactly what the whole component computes; artifacts built so
reproduce diffusers' images like whole builds; the manifest records every block's score; the
plan picks by-block only where a component does not fit, and says why one cannot.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from diffusion_checks import SIZE, generate, psnr
from flow_checks import diffusers_flow_reference

from modelkiln import load, memory_budget
from modelkiln.errors import ExportError, ProfileError
from modelkiln.exporters import block_run, by_block, by_block_openvino
from modelkiln.models import detect_family
from modelkiln.plan import load_plan
from modelkiln.sources import resolve_source

pytestmark = [pytest.mark.torch]

ALWAYS = "build.by_block=always"
AT_SIZE = (f"shapes.height={SIZE}", f"shapes.width={SIZE}")


def _specs(source: Path, profile: str, *overrides: str) -> tuple[list, object]:  # type: ignore[type-arg]
    plan = load_plan(profile, overrides)
    resolved = resolve_source(source)
    family = detect_family(resolved)
    loaded = family.load(resolved, plan.profile)
    specs = [family.export_spec(spec, plan.format) for spec in loaded.components]
    return specs, plan


@pytest.mark.parametrize(
    ("source", "profile", "component"),
    [
        ("sd3.5", "sd3-openvino-fp32", "transformer"),
        ("flux-dev", "flux-openvino-fp32", "transformer"),
        ("sd3", "sd3-openvino-fp32", "text_encoder_3"),
    ],
)
def test_the_blocks_in_order_compute_exactly_what_the_component_computes(
    source: str, profile: str, component: str, source_dir: Callable[[str], Path]
) -> None:
    import torch

    from modelkiln.models.blocks import run_in_order, segments

    specs, _ = _specs(source_dir(source), profile, *AT_SIZE)
    spec = next(s for s in specs if s.name == component)
    wrapper = spec.module()
    feed = {k: torch.from_numpy(v) for k, v in spec.dummy_inputs({"batch": 2}, seed=3).items()}
    pieces = segments(wrapper, tuple(spec.outputs))
    assert pieces is not None and len(pieces) >= 4
    with torch.no_grad():
        whole = wrapper(*feed.values())
        values = run_in_order(pieces, dict(feed))
    for name, expected in zip(spec.outputs, whole, strict=True):
        assert torch.equal(values[name], expected), name


@pytest.mark.openvino
@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "profile", "overrides"),
    [("sd3.5", "sd3-openvino-fp32", ()), ("flux-dev", "flux-openvino-fp32", AT_SIZE)],
)
def test_an_artifact_built_by_block_reproduces_diffusers(
    source: str,
    profile: str,
    overrides: tuple[str, ...],
    built: Callable[..., Path],
    source_dir: Callable[[str], Path],
) -> None:
    artifact = built(source, profile, ALWAYS, *overrides)
    components = json.loads((artifact / "kiln.json").read_text())["components"]
    transformer = components["transformer"]["validation"]
    blocks = list(transformer["by_block"])
    assert blocks[0] == "embed" and blocks[-1] == "out"
    assert blocks[1] == "transformer_blocks.0"
    assert all(score["min_cosine"] > 0.9999 for score in transformer["by_block"].values())
    assert transformer["passed"] and transformer["outputs"]["out_hidden_states"]["max_abs"] < 1e-3
    t5 = "text_encoder_2" if source.startswith("flux") else "text_encoder_3"
    assert list(components[t5]["validation"]["by_block"])[-1] == "final_layer_norm"
    assert "by_block" not in components["text_encoder"]["validation"]  # CLIP is built whole
    with load(artifact) as pipeline:
        image = generate(pipeline, "text")
    assert psnr(image, diffusers_flow_reference(source_dir(source), "text")) >= 35


@pytest.mark.openvino
@pytest.mark.slow
def test_int8_weights_by_block_pass_the_end_to_end_gate_validated_as_a_chain(
    source_dir: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelkiln import build

    # As if running the saved components whole would not fit the budget.
    monkeypatch.setattr(block_run, "WHOLE_CHECK_ACTIVATIONS", int(1e15))
    artifact = build(source_dir("sd3"), "sd3-openvino-int8", tmp_path / "a", overrides=[ALWAYS])
    manifest = json.loads((artifact / "kiln.json").read_text())
    quantization = manifest["components"]["transformer"]["quantization"]
    assert quantization["scheme"] == "int8-weights" and quantization["nncf_mode"] == "int8_asym"
    assert quantization["blocks"] == 4  # embed, two blocks, out
    assert quantization["weight_types"] == {"u8": quantization["quantized_weights"]}
    assert quantization["quantized_weights"] > 20
    validation = manifest["components"]["transformer"]["validation"]
    assert validation["passed"] and validation["label"].endswith("int8-weights, blocks chained")
    # 1e6 GB of activations plus what this process and the files hold (a few GB, by machine).
    assert re.match(r"run whole it would hold about 10000\d\d\.\d GB", validation["chained"])
    assert validation["chained"].endswith("GB; build.max_memory_gb sets it)")
    assert validation["outputs"]["out_hidden_states"]["min_cosine"] > 0.99
    runtime = manifest["components"]["transformer"]["runtime"]
    assert runtime["runtime"] == "openvino" and runtime["inference_precision"] in ("f32", "bf16")
    assert "chained" not in manifest["components"]["vae_decoder"]["validation"]  # built whole
    assert min(manifest["end_to_end"]["psnr_db"]) >= 15  # the profile's own gate


def test_onnx_builds_by_block_only_int4_weights(source_dir: Callable[[str], Path]) -> None:
    """T5 by block in ONNX would need int8 dynamic on the whole model: it is built whole, and
    the plan says why (the int4 transformer's build: tests/models/test_sd3.py)."""
    specs, plan = _specs(source_dir("sd3"), "sd3-onnxruntime-int4")
    t5 = next(s for s in specs if s.name == "text_encoder_3")
    reason = by_block.refusal(t5, plan.component("text_encoder_3"))  # type: ignore[attr-defined]
    assert reason is not None and reason.startswith(
        "block by block, ONNX takes int4-weights only (quantized as the file is written; "
        "int8-dynamic needs the whole model in memory)"
    )
    transformer = next(s for s in specs if s.name == "transformer")
    assert by_block.refusal(transformer, plan.component("transformer")) is None  # type: ignore[attr-defined]


def test_first_block_cache_builds_its_transformer_whole(
    source_dir: Callable[[str], Path],
) -> None:
    specs, plan = _specs(source_dir("sd3"), "sd3-openvino-int8", "model.first_block_cache=0.1")
    found = memory_budget.estimate(specs, whole_pipeline=False)
    chosen, planned = by_block.choose(specs, plan, found, 1.0)  # type: ignore[arg-type]
    assert chosen == {"text_encoder_3"}  # T5 still cuts
    assert planned is not None
    for name in ("transformer", "transformer_head"):
        assert planned.not_by_block[name].startswith(
            "built for model.first_block_cache, the transformer and its head are built whole"
        )


@pytest.mark.openvino
@pytest.mark.parametrize(
    ("source", "component"), [("sd3", "transformer"), ("flux-schnell", "text_encoder_2")]
)
def test_the_chain_of_compressed_blocks_scores_what_the_saved_component_scores(
    source: str, component: str, source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """The chained check stands in for running the whole component: same error, to the
    rounding that fusing across a block boundary changes."""
    import openvino as ov

    from modelkiln.component_checks import _feeds
    from modelkiln.evaluation.metrics import OutputMetrics
    from modelkiln.progress import NullProgress
    from modelkiln.runtimes.openvino import compile_config

    profile = "sd3-openvino-int8" if source == "sd3" else "flux-openvino-int8"
    specs, plan = _specs(source_dir(source), profile, "precision.compute=fp32")
    spec = next(s for s in specs if s.name == component)
    built_plan = plan.component(component)  # type: ignore[attr-defined]
    feeds = _feeds(spec, built_plan.profile, ())
    options = plan.runtime_options(component)  # type: ignore[attr-defined]
    made = by_block_openvino.export(spec, built_plan, options, tmp_path, feeds, NullProgress())
    compiled = ov.Core().compile_model(str(made.entry), "CPU", compile_config(options))
    whole = {name: OutputMetrics() for name in spec.outputs}
    for feed, expected in zip(feeds, made.expected, strict=True):
        actual = compiled(dict(feed))
        for name in spec.outputs:
            whole[name].add(expected[name], actual[name], is_logits=False)
    for name in spec.outputs:
        chained, run_whole = made.chained[name], whole[name]
        assert 0.9 < chained.min_cosine < 1.0 - 1e-7  # int8 moved it, a little
        assert chained.min_cosine == pytest.approx(run_whole.min_cosine, abs=1e-5)
        assert chained.max_abs == pytest.approx(run_whole.max_abs, rel=1e-2)
    files = made.entry.stat().st_size + made.entry.with_suffix(".bin").stat().st_size
    assert made.whole_check_bytes() == 2 * files + block_run.WHOLE_CHECK_ACTIVATIONS


def test_auto_cuts_only_what_does_not_fit_and_says_why_others_cannot(
    source_dir: Callable[[str], Path],
) -> None:
    specs, plan = _specs(source_dir("sd3"), "sd3-openvino-int8")
    found = memory_budget.estimate(specs, whole_pipeline=False)
    assert found is not None
    sizes = found.components
    # A budget the transformer and T5 do not fit whole (the tiny VAE does not either).
    limit = memory_budget.OVERHEAD_BYTES + min(sizes["transformer"], sizes["text_encoder_3"]) - 1
    chosen, planned = by_block.choose(specs, plan, found, limit)  # type: ignore[arg-type]
    assert chosen == {"transformer", "text_encoder_3"}
    assert planned is not None
    assert planned.held("transformer") == planned.by_block["transformer"] > 0
    assert planned.not_by_block["vae_encoder"].startswith("modelkiln cuts only ")
    assert "T5EncoderModel" in planned.not_by_block["vae_encoder"]
    assert "text_encoder" not in planned.not_by_block  # it fits whole
    never, _ = by_block.choose(
        specs, load_plan("sd3-openvino-int8", ["build.by_block=never"]), found, limit
    )
    assert never == set()


def test_a_format_without_block_builds_is_refused_with_the_reason(
    source_dir: Callable[[str], Path],
) -> None:
    specs, plan = _specs(source_dir("sd3"), "sd3-onnxruntime-fp32", ALWAYS)
    with pytest.raises(ProfileError) as refused:
        by_block.choose(specs, plan, None, 0)  # type: ignore[arg-type]
    message = str(refused.value)
    assert "build.by_block = 'always' but no component can be built block by block" in message
    assert (
        "transformer: block by block, ONNX takes int4-weights only (quantized as the file is "
        "written; fp32 needs the whole model in memory); OpenVINO takes fp32/int8/int4/nf4"
    ) in message
    specs, plan = _specs(source_dir("sd3"), "sd3-onnxruntime-int8")
    found = memory_budget.estimate(specs, whole_pipeline=False)
    _, planned = by_block.choose(specs, plan, found, 1.0)  # type: ignore[arg-type]
    assert planned is not None and "int8-dynamic needs" in planned.not_by_block["transformer"]
    specs, plan = _specs(source_dir("sd3"), "sd3-tensorrt-fp16", ALWAYS)
    with pytest.raises(ProfileError, match="write OpenVINO IR or ONNX, not tensorrt"):
        by_block.choose(specs, plan, None, 0)  # type: ignore[arg-type]


def test_the_budget_error_names_what_a_block_build_holds() -> None:
    from modelkiln.errors import UnsupportedError

    gb = int(memory_budget.GB)
    found = memory_budget.Estimate(
        {"transformer": 32 * gb, "text_encoder_3": 19 * gb, "vae_encoder": gb // 3},
        whole_pipeline=False,
        by_block={"transformer": 11 * gb, "text_encoder_3": 7 * gb},
    )
    assert found.needed() == 11 * gb + memory_budget.OVERHEAD_BYTES
    with pytest.raises(UnsupportedError) as refused:
        memory_budget.check_fits(found, 8.0, "profile 'sd3-openvino-int8'")
    message = str(refused.value)
    assert message.startswith(
        "profile 'sd3-openvino-int8': this build needs about 15.5 GB of memory and may use "
        "8.0 GB (build.max_memory_gb): transformer built block by block holds 11.0 GB"
    )
    assert "\n" not in message
    memory_budget.check_fits(found, 15.6, "profile")


def test_a_weight_missing_from_the_checkpoint_is_named(
    source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    import shutil

    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "sd3"
    shutil.copytree(source_dir("sd3"), folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    del tensors["proj_out.weight"]
    save_file(tensors, weights)
    specs, _ = _specs(folder, "sd3-openvino-fp32")
    spec = next(s for s in specs if s.name == "transformer")
    wrapper = spec.meta_module()
    from modelkiln.models.blocks import segments

    pieces = segments(wrapper, tuple(spec.outputs))
    assert pieces is not None
    weights_reader = block_run.BlockWeights(wrapper, spec.checkpoint)
    with (
        pytest.raises(
            ExportError, match=r"block out: its weight 'weight' is not in the checkpoint"
        ),
        weights_reader.loaded(pieces[-1]),
    ):
        pass
    # The meta tensors are back: nothing of a failed block stays in memory.
    assert all(p.is_meta for p in pieces[-1].module.parameters())


def test_random_shards_load_with_from_pretrained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from diffusers import SD3Transformer2DModel

    from modelkiln.testing import large

    config = {**large.SD35_LARGE_TRANSFORMER, "num_layers": 1, "num_attention_heads": 2}
    config |= {"caption_projection_dim": 128, "joint_attention_dim": 64, "pos_embed_max_size": 8}
    config |= {"pooled_projection_dim": 32, "sample_size": 8}
    with torch.device("meta"):
        meta = SD3Transformer2DModel(**config)
    real = SD3Transformer2DModel(**config)
    monkeypatch.setattr(large, "SHARD_BYTES", 200_000)
    count = large.write_random_shards(
        meta,
        tmp_path,
        weights_name="diffusion_pytorch_model.safetensors",
        buffers=lambda name: real.pos_embed.pos_embed if name == "pos_embed.pos_embed" else None,
    )
    meta.save_config(tmp_path)
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0].name.endswith(f"-00001-of-{len(shards):05d}.safetensors")
    loaded = SD3Transformer2DModel.from_pretrained(tmp_path)
    assert count == sum(p.numel() for p in real.parameters())
    # torch's default spread for a Linear: 1 / sqrt(3 * fan_in)
    assert loaded.norm_out.linear.weight.std().item() == pytest.approx((3 * 128) ** -0.5, rel=0.05)
    assert torch.equal(loaded.pos_embed.pos_embed, real.pos_embed.pos_embed)  # as given
    assert torch.all(loaded.transformer_blocks[0].attn.norm_q.weight == 1.0)


def test_sd35_large_by_block_plans_a_third_of_its_fp32_weights() -> None:
    """Read from the meta-device model of SD 3.5 Large's real config: 8.2 B parameters,
    32.9 GB in fp32; int8 by block holds the int8 weights and one 0.85 GB block three times."""
    import torch
    from diffusers import SD3Transformer2DModel

    from modelkiln.models.blocks import segments
    from modelkiln.models.stable_diffusion_modules import SD3Transformer
    from modelkiln.testing.large import SD35_LARGE_TRANSFORMER

    with torch.device("meta"):
        wrapper = SD3Transformer(SD3Transformer2DModel(**SD35_LARGE_TRANSFORMER))
    pieces = segments(wrapper, ("out_hidden_states",))
    assert pieces is not None and len(pieces) == 40
    total = sum(piece.weight_bytes() for piece in pieces)
    assert 32e9 < total < 33e9
    plan = load_plan("sd3-openvino-int8")
    int8 = by_block.needed_bytes(pieces, plan.component("transformer"))
    assert 10e9 < int8 < 12e9
    int4 = by_block.needed_bytes(pieces, load_plan("sd3-openvino-int4").component("transformer"))
    assert int4 < int8
    # ONNX int4 holds nothing while the file is written, then checks the int4 model whole.
    onnx = by_block.needed_bytes(pieces, load_plan("sd3-onnxruntime-int4").component("transformer"))
    assert onnx == int(2 * 0.16 * total + by_block.WHOLE_CHECK_ACTIVATIONS)


def test_the_random_flux_schnell_writer_makes_a_pipeline_diffusers_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/sd35_large_build.py --model flux-schnell: the same writer at a tiny width."""
    import diffusers
    import torch

    from modelkiln.testing import large

    tiny_t5 = {**large.T5_XXL, "vocab_size": 600, "d_model": 32, "d_ff": 64, "num_heads": 2}
    monkeypatch.setattr(large, "T5_XXL", {**tiny_t5, "d_kv": 16})
    monkeypatch.setattr(
        large,
        "FLUX_SCHNELL_TRANSFORMER",
        large.FLUX_SCHNELL_TRANSFORMER
        | {"attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32}
        | {"pooled_projection_dim": 32, "axes_dims_rope": (4, 6, 6)},
    )
    clip = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
    monkeypatch.setattr(large, "CLIP_L", large.CLIP_L | clip | {"projection_dim": 32})
    vae = {"block_out_channels": (8, 8), "layers_per_block": 1, "norm_num_groups": 4}
    vae |= {"down_block_types": ("DownEncoderBlock2D",) * 2}
    vae |= {"up_block_types": ("UpDecoderBlock2D",) * 2}
    monkeypatch.setattr(large, "FLUX_VAE", large.FLUX_VAE | vae)
    monkeypatch.setattr(large, "SHARD_BYTES", 100_000)

    source = large.random_flux_schnell(tmp_path / "flux", blocks=1)
    assert len(list((source / "transformer").glob("*.safetensors"))) > 1  # sharded
    pipeline = diffusers.FluxPipeline.from_pretrained(source, torch_dtype=torch.float32)
    assert pipeline.transformer.config.guidance_embeds is False
    assert pipeline.transformer.config.num_layers == pipeline.transformer.config.num_single_layers
    assert not pipeline.scheduler.config.use_dynamic_shifting
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a lighthouse", num_inference_steps=1, height=32, width=32).images[0]
    assert image.size == (32, 32)
