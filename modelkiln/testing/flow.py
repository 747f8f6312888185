"""Tiny SD3 / 3.5 and Flux.1 pipelines with random weights, saved in the diffusers layout, with
a T5 tokenizer built without sentencepiece."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from modelkiln.testing.diffusion import _tiny_clip_config, _tiny_vae, write_tiny_clip_tokenizer


def _tiny_flow_vae(*, shift_factor: float, scaling_factor: float) -> Any:
    """SD3's and Flux's 16-channel VAE (no quant convs, latents shifted before scaling)."""
    return _tiny_vae(
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


# Words the tiny T5 vocabulary holds whole; anything else falls back to single characters.
_T5_WORDS = ("a", "an", "the", "of", "photo", "cat", "dog", "astronaut", "riding", "horse")


def _tiny_t5_tokenizer(model_max_length: int = 512) -> Any:
    """A ~110-piece T5 Unigram tokenizer built without sentencepiece: <pad>=0, </s>=1, <unk>=2
    as in T5's real vocabulary, whole "▁word" pieces for _T5_WORDS, then ASCII characters.
    It saves as tokenizer.json (no spiece.model)."""
    import string

    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + word, -3.0 - i / 100) for i, word in enumerate(_T5_WORDS)]
    characters = string.ascii_letters + string.digits + string.punctuation
    vocab += [(c, -5.0) for c in characters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _tiny_t5_encoder(d_model: int) -> Any:
    """A 2-layer T5 v1.1-style encoder (gated GELU) like the T5-XXL SD3/Flux use;
    relative position buckets, so any sequence length works."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=128,  # the tiny tokenizer's ~110 pieces, rounded up
        d_model=d_model,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def tiny_sd3(
    directory: str | Path,
    *,
    t5: bool = True,
    qk_norm: str | None = None,
    dual_attention_layers: tuple[int, ...] = (),
    inpaint: bool = False,
    seed: int = 0,
) -> Path:
    """A diffusers StableDiffusion3(Inpaint)Pipeline directory mimicking Stable Diffusion 3
    medium: CLIP-L (hidden 32) and CLIP-G (hidden 64) text encoders with projections, a T5
    encoder (d_model 128, or none with t5=False), a 2-layer MMDiT and a 16-channel VAE; 32x32
    images. qk_norm="rms_norm" with dual_attention_layers=(0,) makes it SD 3.5-style.
    Without T5, model_index.json lists text_encoder_3/tokenizer_3 as null, which diffusers
    only loads when told so: from_pretrained(directory, text_encoder_3=None, tokenizer_3=None)."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3InpaintPipeline,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    directory = Path(directory)
    torch.manual_seed(seed)
    t5_width = 128  # >= 32 + 64: SD3 zero-pads the concatenated CLIP states to T5's width
    transformer = SD3Transformer2DModel(
        sample_size=16,  # latents; the VAE halves once -> 32x32 images
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5_width,
        caption_projection_dim=32,  # = heads * head dim, as in SD3
        pooled_projection_dim=32 + 64,  # both CLIP projections, concatenated
        pos_embed_max_size=32,  # latents up to 64x64 (128x128 images)
        dual_attention_layers=dual_attention_layers,
        qk_norm=qk_norm,
    )
    first = write_tiny_clip_tokenizer(directory / "_tokenizer")
    second = write_tiny_clip_tokenizer(directory / "_tokenizer_2", pad_token="!")
    pipeline_class: Any = StableDiffusion3InpaintPipeline if inpaint else StableDiffusion3Pipeline
    pipeline = pipeline_class(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_tiny_flow_vae(shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=CLIPTextModelWithProjection(_tiny_clip_config(32)),
        tokenizer=CLIPTokenizer.from_pretrained(first),
        text_encoder_2=CLIPTextModelWithProjection(
            _tiny_clip_config(64, hidden_size=64, hidden_act="gelu")
        ),
        tokenizer_2=CLIPTokenizer.from_pretrained(second),
        text_encoder_3=_tiny_t5_encoder(t5_width) if t5 else None,
        tokenizer_3=_tiny_t5_tokenizer() if t5 else None,
    )
    pipeline.save_pretrained(directory)
    shutil.rmtree(first)
    shutil.rmtree(second)
    return directory


def flux_scheduler(*, dev: bool) -> Any:
    """The hub's Flux.1 scheduler: dev shifts by image size, schnell uses a plain schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    shifting: dict[str, Any] = (
        {"use_dynamic_shifting": True, "shift": 3.0}
        if dev
        else {"use_dynamic_shifting": False, "shift": 1.0}
    )
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        **shifting,
    )


def tiny_flux(directory: str | Path, *, guidance: bool = True, seed: int = 0) -> Path:
    """A diffusers FluxPipeline directory mimicking FLUX.1-dev (guidance=True: guidance
    embedding, dynamically shifted schedule) or FLUX.1-schnell (guidance=False, fixed schedule):
    a CLIP-L text encoder (hidden 32, pooled), a T5 encoder (d_model 64), a 1+1-block Flux
    transformer (2 heads of 16) and a 16-channel VAE. The pipeline's own default size is 256x256
    (128 latents, hard-coded); pass height=width=32 (any multiple of 4 works)."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    torch.manual_seed(seed)
    t5_width = 64
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels, packed 2x2
        out_channels=None,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_width,
        pooled_projection_dim=32,  # CLIP's pooled output
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, like (16, 56, 56) for 128
    )
    scheduler = flux_scheduler(dev=guidance)
    tokenizer_dir = write_tiny_clip_tokenizer(directory / "_tokenizer")
    pipeline: Any = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_tiny_flow_vae(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=CLIPTextModel(_tiny_clip_config()),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        text_encoder_2=_tiny_t5_encoder(t5_width),
        tokenizer_2=_tiny_t5_tokenizer(),
    )
    pipeline.save_pretrained(directory)
    shutil.rmtree(tokenizer_dir)
    return directory
