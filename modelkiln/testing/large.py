"""Real-size pipelines with random weights, written shard by shard, for benchmarks.

SD 3.5 Large is 8 B (transformer) + 4.8 B (T5-XXL) + 0.8 B (CLIPs) parameters, Flux.1-schnell
11.9 B + 4.8 B + 0.1 B: more than this machine holds in fp32. The big models are built on the
meta device and each tensor is drawn, written into a bf16 shard and dropped, so writing never
holds more than one shard; the small ones (CLIPs, VAE) are built in memory. Tokenizers are the
tiny test ones (token ids only index the real-size embeddings), so these pipelines measure
cost, not image quality.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

# stabilityai/stable-diffusion-3.5-large transformer/config.json (8.06 B parameters).
SD35_LARGE_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
}
# black-forest-labs/FLUX.1-schnell transformer/config.json (11.9 B parameters).
FLUX_SCHNELL_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
# google/t5-v1_1-xxl's encoder as SD3 and Flux ship it (text_encoder_3 / text_encoder_2).
T5_XXL: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
}
# The tiny tokenizer's special tokens (CLIP pools at the end-of-text token).
_TINY_TOKENS = {"bos_token_id": 523, "eos_token_id": 524, "pad_token_id": 524}
# SD3's CLIP ViT-L/14 and OpenCLIP bigG/14 text towers, with projections.
CLIP_L: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    **_TINY_TOKENS,
}
CLIP_G: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
    **_TINY_TOKENS,
}
SD3_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "shift_factor": 0.0609,
    "scaling_factor": 1.5305,
    "sample_size": 1024,
}
FLUX_VAE: dict[str, Any] = {**SD3_VAE, "shift_factor": 0.1159, "scaling_factor": 0.3611}
SHARD_BYTES = 2_000_000_000


def torch_default_std(name: str, shape: tuple[int, ...]) -> float:
    """The spread of torch's default init of a Linear / Conv weight (kaiming uniform with
    a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))), which diffusers models keep."""
    fan_in = 1
    for size in shape[1:]:
        fan_in *= size
    return float((3 * fan_in) ** -0.5)


def t5_std(config: dict[str, Any]) -> Callable[[str, tuple[int, ...]], float]:
    """T5's own init (T5PreTrainedModel._init_weights): attention queries scaled down by the
    head width, which keeps a random T5's attention from collapsing onto single tokens."""
    d_model, d_kv, d_ff = config["d_model"], config["d_kv"], config["d_ff"]
    rules = {
        "q.weight": (d_model * d_kv) ** -0.5,
        "k.weight": d_model**-0.5,
        "v.weight": d_model**-0.5,
        "o.weight": (config["num_heads"] * d_kv) ** -0.5,
        "wi_0.weight": d_model**-0.5,
        "wi_1.weight": d_model**-0.5,
        "wo.weight": d_ff**-0.5,
        "relative_attention_bias.weight": d_model**-0.5,
        "shared.weight": 1.0,
    }

    def std(name: str, shape: tuple[int, ...]) -> float:
        return next(
            (v for k, v in rules.items() if name.endswith(k)), torch_default_std(name, shape)
        )

    return std


def write_random_shards(
    model: Any,
    directory: Path,
    *,
    weights_name: str,
    buffers: Callable[[str], Any] = lambda name: None,
    std: Callable[[str, tuple[int, ...]], float] = torch_default_std,
    seed: int = 0,
) -> int:
    """Write `model` (built on the meta device) as bf16 safetensors shards of ~2 GB with an
    index, each tensor drawn when its shard is written: N(0, std(name, shape)) for matrices
    (the model's own init spread), ones for norm weights, zeros for biases; `buffers(name)`
    gives saved buffers' real values. Returns the number of parameters written."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    shards: list[dict[str, Any]] = [{}]
    sizes = [0]
    parameters = dict(model.named_parameters())
    count = 0
    for name, meta in model.state_dict(keep_vars=True).items():
        if id(meta) in seen:
            continue  # tied weights are saved once
        seen.add(id(meta))
        if name in parameters:
            value = _draw(name, tuple(meta.shape), std, generator)
            count += value.numel()
        else:
            value = buffers(name)
            if value is None:
                raise ValueError(f"no value for the buffer {name}")  # a bug, not input
        if sizes[-1] and sizes[-1] + value.nbytes > SHARD_BYTES:
            _save(shards, sizes, directory, weights_name, save_file, final=False)
        shards[-1][name] = value.contiguous()
        sizes[-1] += value.nbytes
    _save(shards, sizes, directory, weights_name, save_file, final=True)
    return count


def _draw(
    name: str, shape: tuple[int, ...], std: Callable[[str, tuple[int, ...]], float], generator: Any
) -> Any:
    import torch

    if len(shape) >= 2:
        value = torch.empty(shape, dtype=torch.bfloat16)
        return value.normal_(0.0, std(name, shape), generator=generator)
    fill = 1.0 if "norm" in name and name.endswith("weight") else 0.0
    return torch.full(shape, fill, dtype=torch.bfloat16)


def _save(
    shards: list[dict[str, Any]],
    sizes: list[int],
    directory: Path,
    weights_name: str,
    save_file: Any,
    *,
    final: bool,
) -> None:
    """Write the open shard (numbered for now); on the last one, rename all N of them to
    diffusers' / transformers' "-0000i-of-0000N" names and write the index."""
    stem, suffix = weights_name.rsplit(".", 1)
    number = len(shards)
    save_file(shards[-1], str(directory / f"{stem}-part{number}.{suffix}"), {"format": "pt"})
    shards[-1] = {name: None for name in shards[-1]}  # the tensors go; their names stay
    if not final:
        shards.append({})
        sizes.append(0)
        return
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        name = f"{stem}-{index:05d}-of-{number:05d}.{suffix}"
        (directory / f"{stem}-part{index}.{suffix}").rename(directory / name)
        weight_map.update({key: name for key in shard})
    index_file = directory / f"{weights_name}.index.json"
    total = sum(sizes)
    index_file.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def random_sd35_large(directory: str | Path, *, seed: int = 0, blocks: int | None = None) -> Path:
    """A StableDiffusion3Pipeline directory with SD 3.5 Large's configs and random bf16
    weights (13.6 B parameters, ~27 GB on disk), written without holding any model whole.
    `blocks`: only that many transformer and T5 blocks (a smoke test of the same path)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers.models.embeddings import PatchEmbed

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = {**SD35_LARGE_TRANSFORMER, **({"num_layers": blocks} if blocks else {})}
    with torch.device("meta"):
        transformer: Any = SD3Transformer2DModel(**config)
    inner = config["num_attention_heads"] * config["attention_head_dim"]

    def positions(name: str) -> Any:
        # The sin-cos table SD3's PatchEmbed computes at init (a saved buffer).
        if name != "pos_embed.pos_embed":
            return None
        patch: Any = PatchEmbed(
            height=config["sample_size"],
            width=config["sample_size"],
            patch_size=config["patch_size"],
            in_channels=config["in_channels"],
            embed_dim=inner,
            pos_embed_max_size=config["pos_embed_max_size"],
        )
        return patch.pos_embed.to(torch.bfloat16)

    folder = directory / "transformer"
    write_random_shards(
        transformer,
        folder,
        weights_name="diffusion_pytorch_model.safetensors",
        buffers=positions,
        seed=seed,
    )
    transformer.save_config(folder)
    t5_tokenizer = _write_t5(
        directory / "text_encoder_3", directory / "tokenizer_3", blocks, seed + 1
    )
    for name, settings in (("text_encoder", CLIP_L), ("text_encoder_2", CLIP_G)):
        _write_clip(directory / name, settings, projection=True)
    _write_vae(directory / "vae", SD3_VAE)
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        _write_clip_tokenizer(directory / name, pad)
    scheduler: Any = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.save_pretrained(directory / "scheduler")
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", t5_tokenizer],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))
    return directory


def random_flux_schnell(directory: str | Path, *, seed: int = 0, blocks: int | None = None) -> Path:
    """A FluxPipeline directory with FLUX.1-schnell's configs and random bf16 weights
    (16.8 B parameters, ~34 GB on disk), written without holding any model whole. `blocks`:
    only that many double and single transformer blocks and T5 blocks (a smoke test)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from modelkiln.testing.flow import flux_scheduler

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    fewer = {"num_layers": blocks, "num_single_layers": blocks} if blocks else {}
    config = {**FLUX_SCHNELL_TRANSFORMER, **fewer}
    with torch.device("meta"):
        transformer: Any = FluxTransformer2DModel(**config)
    folder = directory / "transformer"
    write_random_shards(
        transformer, folder, weights_name="diffusion_pytorch_model.safetensors", seed=seed
    )
    transformer.save_config(folder)
    t5_tokenizer = _write_t5(
        directory / "text_encoder_2", directory / "tokenizer_2", blocks, seed + 1
    )
    _write_clip(directory / "text_encoder", CLIP_L, projection=False)
    _write_vae(directory / "vae", FLUX_VAE)
    _write_clip_tokenizer(directory / "tokenizer", "<|endoftext|>")
    flux_scheduler(dev=False).save_pretrained(directory / "scheduler")
    index = {
        "_class_name": "FluxPipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", t5_tokenizer],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))
    return directory


def _write_t5(folder: Path, tokenizer_folder: Path, blocks: int | None, seed: int) -> str:
    """T5-XXL's encoder, shard by shard, and the tiny T5 tokenizer; returns the tokenizer's
    class name (for model_index.json)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    from modelkiln.testing.flow import _tiny_t5_tokenizer

    config = T5Config(**{**T5_XXL, **({"num_layers": blocks} if blocks else {})})
    with torch.device("meta"):
        t5 = T5EncoderModel(config)
    write_random_shards(t5, folder, weights_name="model.safetensors", std=t5_std(T5_XXL), seed=seed)
    config.architectures = ["T5EncoderModel"]
    config.save_pretrained(folder)
    tokenizer = _tiny_t5_tokenizer()
    tokenizer.save_pretrained(tokenizer_folder)
    return type(tokenizer).__name__


def _write_clip(folder: Path, settings: dict[str, Any], *, projection: bool) -> None:
    """A CLIP text tower (small enough to build in memory), saved in bf16."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    kind: Any = CLIPTextModelWithProjection if projection else CLIPTextModel
    clip: Any = kind(CLIPTextConfig(**settings))
    clip.to(torch.bfloat16).save_pretrained(folder)


def _write_vae(folder: Path, settings: dict[str, Any]) -> None:
    import torch
    from diffusers import AutoencoderKL

    vae: Any = AutoencoderKL(**settings)
    vae.to(torch.bfloat16).save_pretrained(folder)


def _write_clip_tokenizer(folder: Path, pad_token: str) -> None:
    from transformers import CLIPTokenizer

    from modelkiln.testing.diffusion import write_tiny_clip_tokenizer

    scratch = folder.with_name(f"_{folder.name}")
    CLIPTokenizer.from_pretrained(
        write_tiny_clip_tokenizer(scratch, pad_token=pad_token)
    ).save_pretrained(folder)
    shutil.rmtree(scratch)


__all__ = [
    "CLIP_G",
    "CLIP_L",
    "FLUX_SCHNELL_TRANSFORMER",
    "FLUX_VAE",
    "SD3_VAE",
    "SD35_LARGE_TRANSFORMER",
    "T5_XXL",
    "random_flux_schnell",
    "random_sd35_large",
    "t5_std",
    "torch_default_std",
    "write_random_shards",
]
