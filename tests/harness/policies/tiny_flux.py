"""A tiny random-weight ``FluxPipeline`` built offline from configs, for CPU tests.

Every component is the real diffusers/transformers class with a tiny config: FluxTransformer2DModel (one
double-stream and one single-stream block, with the guidance embedding of FLUX.1-dev), AutoencoderKL with
a shift factor (4 latent channels, so 16 packed channels), CLIPTextModel (pooled output) and a
T5EncoderModel. The tokenizers are the in-memory ones of ``tiny_sd3``, and the scheduler has FLUX.1-dev's
config (dynamic shifting, μ from 0.5 at 256 tokens to 1.15 at 4096). The pipeline is saved with
``save_pretrained`` so that tests load it back through the real loading code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.harness.policies.tiny_sd3 import clip_tokenizer, t5_tokenizer

CLIP_DIM = 16  # CLIP hidden size = its pooled output = pooled_projection_dim
T5_DIM = 32  # = joint_attention_dim
LATENT_CHANNELS = 4  # the transformer sees 4 · 4 = 16 channels per packed 2×2 patch
# FLUX.1-dev's scheduler/scheduler_config.json.
FLUX_DEV_SCHEDULER = {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}  # fmt: skip


def build_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """All components of a tiny FLUX.1-dev-like pipeline with random weights (deterministic in ``seed``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_DIM,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    with torch.no_grad():  # adaLN-Zero-like inits leave v nearly input-independent: perturb everything
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=16, scaling_factor=0.3611,
        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    clip_kwargs = {
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, "hidden_size": CLIP_DIM, "intermediate_size": 32,
        "num_attention_heads": 2, "num_hidden_layers": 2, "vocab_size": 80, "max_position_embeddings": 77,
        "hidden_act": "gelu",
    }  # fmt: skip
    t5_kwargs = {
        "vocab_size": 80, "d_model": T5_DIM, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2,
        "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
    }  # fmt: skip
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip_kwargs))
    text_encoder_2 = T5EncoderModel(T5Config(**t5_kwargs))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )


def save_tiny_flux_pipeline(directory: Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Build and ``save_pretrained`` the tiny pipeline into ``directory``; returns it."""
    build_tiny_flux_pipeline(seed, guidance_embeds).save_pretrained(directory)
    return directory
