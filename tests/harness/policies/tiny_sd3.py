"""A tiny random-weight ``StableDiffusion3Pipeline`` built offline from configs, for CPU tests.

Every component is the real diffusers/transformers class with a tiny config: SD3Transformer2DModel
(one dual-attention block, qk RMS norm, as SD3.5), AutoencoderKL with a shift factor, two
CLIPTextModelWithProjection and a T5EncoderModel. The tokenizers are built in memory (a byte-level
CLIP BPE over single characters; a T5 unigram vocabulary), so nothing is downloaded. The pipeline is
saved with ``save_pretrained`` so that tests load it back through the real loading code.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

TEXT_DIM = 16  # each CLIP's hidden size; both concatenated = the T5 width
T5_DIM = 2 * TEXT_DIM
PROJECTION_DIM = 8  # each CLIP's pooled projection; pooled_projection_dim = 2 * PROJECTION_DIM


def clip_tokenizer():
    """A CLIP BPE tokenizer over lower-case letters and digits (every word splits into characters)."""
    from transformers import CLIPTokenizer

    symbols = list(string.ascii_lowercase + string.digits + ".,")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols:
        vocab[s] = len(vocab)
        vocab[s + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    """A T5 unigram tokenizer whose pieces are single characters (``▁`` marks a word start)."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_lowercase + string.digits + ".,"]
    pieces += [("▁" + c, -2.5) for c in string.ascii_lowercase]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def build_tiny_sd3_pipeline(seed: int = 0):
    """All components of a tiny SD3.5-like pipeline with random weights (deterministic in ``seed``)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=T5_DIM, caption_projection_dim=16, pooled_projection_dim=2 * PROJECTION_DIM,
        out_channels=4, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    )  # fmt: skip
    with torch.no_grad():  # adaLN-Zero-like inits leave v nearly input-independent: perturb everything
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    clip_kwargs = {
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, "hidden_size": TEXT_DIM,
        "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2, "vocab_size": 80,
        "max_position_embeddings": 77, "projection_dim": PROJECTION_DIM, "hidden_act": "gelu",
    }  # fmt: skip
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip_kwargs))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_kwargs))
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=80,
            d_model=T5_DIM,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )  # fmt: skip
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer(),
    )


def save_tiny_sd3_pipeline(directory: Path, seed: int = 0) -> Path:
    """Build and ``save_pretrained`` the tiny pipeline into ``directory``; returns it."""
    build_tiny_sd3_pipeline(seed).save_pretrained(directory)
    return directory
