"""Tiny random-weight checkpoints for the learned scorers, built offline and saved in their official layouts.

Each builder writes what the real loading code reads (``save_pretrained`` directories, an open_clip
model config + ``{"state_dict": ...}`` file, an ImageReward-layout ``.pt`` + ``med_config.json`` + a BERT
tokenizer directory), so the scorers are tested through their real loading paths. Also used by
``harness/bench/rewards.py``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

CLIP_IMAGE = 32  # tiny CLIP / open_clip / BLIP input size
TINY_OPEN_CLIP = "HPS-Tiny-Test"
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": CLIP_IMAGE, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def byte_clip_tokenizer():
    """A CLIP BPE tokenizer over the 256 byte characters (no merges): every text tokenises, offline."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def save_tiny_clip(directory: Path, seed: int = 0, projection_dim: int = 16) -> Path:
    """A tiny ``CLIPModel`` + ``CLIPProcessor`` (32 px, OpenAI mean/std) saved with ``save_pretrained``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = byte_clip_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": bos, "eos_token_id": eos,
            "pad_token_id": eos,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": CLIP_IMAGE, "patch_size": 8,
        },
        projection_dim=projection_dim,
    )  # fmt: skip
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(directory)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": CLIP_IMAGE}, crop_size={"height": CLIP_IMAGE, "width": CLIP_IMAGE}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def save_aesthetic_mlp(path: Path, embed_dim: int = 16, seed: int = 0) -> Path:
    """A random state dict with the aesthetic predictor's keys (``layers.{0,2,4,6,7}``) and layer sizes."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [(1024, embed_dim), (128, 1024), (64, 128), (16, 64), (1, 16)]
    state = {}
    for index, (out_dim, in_dim) in zip((0, 2, 4, 6, 7), sizes, strict=True):
        state[f"layers.{index}.weight"] = torch.randn(out_dim, in_dim, generator=generator) / in_dim**0.5
        state[f"layers.{index}.bias"] = torch.randn(out_dim, generator=generator) * 0.1
    torch.save(state, path)
    return path


def register_tiny_open_clip(directory: Path) -> str:
    """Register a tiny open_clip model config (public ``add_model_config``); returns its name."""
    import open_clip

    config = directory / f"{TINY_OPEN_CLIP}.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(config)
    return TINY_OPEN_CLIP


def save_tiny_hps(directory: Path, seed: int = 0) -> Path:
    """A tiny open_clip model's weights in the HPS checkpoint layout ``{"state_dict": ...}``."""
    import open_clip

    name = register_tiny_open_clip(directory)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    path = directory / "HPS_tiny.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


# --- ImageReward: BLIP ViT + BERT with cross-attention, in the official key layout ---------------

BLIP_VISION = {"width": 64, "depth": 2, "patch": 8, "mlp": 128}  # 64 / 64 → 1 head, as the scorer infers
BLIP_TEXT = {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "positions": 40}


def bert_tokenizer():
    """A WordPiece BERT tokenizer over letters (``c ##a ##t``), lower-casing, no files needed."""
    from transformers import BertTokenizer

    letters = string.ascii_lowercase
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *("##" + c for c in letters), ".", ","]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})


def med_config(vocab_size: int) -> dict:
    """A BLIP ``med_config.json`` (BertConfig fields) for the tiny text encoder."""
    return {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": BLIP_TEXT["hidden"], "initializer_range": 0.02,
        "intermediate_size": BLIP_TEXT["intermediate"], "layer_norm_eps": 1e-12,
        "max_position_embeddings": BLIP_TEXT["positions"], "model_type": "bert",
        "num_attention_heads": BLIP_TEXT["heads"], "num_hidden_layers": BLIP_TEXT["layers"], "pad_token_id": 0,
        "type_vocab_size": 2, "vocab_size": vocab_size, "encoder_width": 768, "add_cross_attention": True,
    }  # fmt: skip


def imagereward_state_dict(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the key names of the official ``ImageReward.pt`` (BLIP vit.py + med.py + MLP)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix: str, dim: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + rand(dim), f"{prefix}.bias": rand(dim)}

    def linear(prefix: str, out_dim: int, in_dim: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": rand(out_dim, in_dim, scale=in_dim**-0.5), f"{prefix}.bias": rand(out_dim)}

    w, p, m = BLIP_VISION["width"], BLIP_VISION["patch"], BLIP_VISION["mlp"]
    n_pos = (CLIP_IMAGE // p) ** 2 + 1
    v = "blip.visual_encoder."
    s = {v + "cls_token": rand(1, 1, w), v + "pos_embed": rand(1, n_pos, w)}
    s |= {
        v + "patch_embed.proj.weight": rand(w, 3, p, p, scale=(3 * p * p) ** -0.5),
        v + "patch_embed.proj.bias": rand(w),
    }
    for i in range(BLIP_VISION["depth"]):
        b = f"{v}blocks.{i}."
        s |= norm(b + "norm1", w) | linear(b + "attn.qkv", 3 * w, w) | linear(b + "attn.proj", w, w)
        s |= norm(b + "norm2", w) | linear(b + "mlp.fc1", m, w) | linear(b + "mlp.fc2", w, m)
    s |= norm(v + "norm", w)
    h, inter, t = BLIP_TEXT["hidden"], BLIP_TEXT["intermediate"], "blip.text_encoder."
    s[t + "embeddings.word_embeddings.weight"] = rand(vocab_size, h, scale=1.0)
    s[t + "embeddings.position_embeddings.weight"] = rand(BLIP_TEXT["positions"], h, scale=1.0)
    s[t + "embeddings.position_ids"] = torch.arange(BLIP_TEXT["positions"]).unsqueeze(0)
    s |= norm(t + "embeddings.LayerNorm", h)
    for i in range(BLIP_TEXT["layers"]):
        b = f"{t}encoder.layer.{i}."
        for kind, kv_dim in (("attention", h), ("crossattention", w)):
            s |= linear(f"{b}{kind}.self.query", h, h)
            s |= linear(f"{b}{kind}.self.key", h, kv_dim) | linear(f"{b}{kind}.self.value", h, kv_dim)
            s |= linear(f"{b}{kind}.output.dense", h, h) | norm(f"{b}{kind}.output.LayerNorm", h)
        s |= linear(b + "intermediate.dense", inter, h) | linear(b + "output.dense", h, inter)
        s |= norm(b + "output.LayerNorm", h)
    s |= linear("blip.vision_proj", 256, w) | linear("blip.text_proj", 256, h)
    for index, (out_dim, in_dim) in zip(
        (0, 2, 4, 6, 7), [(1024, h), (128, 1024), (64, 128), (16, 64), (1, 16)], strict=True
    ):
        s |= linear(f"mlp.layers.{index}", out_dim, in_dim)
    return s


def save_tiny_imagereward(directory: Path, seed: int = 0) -> dict[str, Path]:
    """``ImageReward.pt`` + ``med_config.json`` + a BERT tokenizer directory; returns the three paths."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = bert_tokenizer()
    tokenizer_dir = directory / "bert"
    tokenizer.save_pretrained(tokenizer_dir)
    vocab_size = len(tokenizer) + 2  # BLIP adds [DEC] and [ENC]
    (directory / "med_config.json").write_text(json.dumps(med_config(vocab_size)))
    torch.save(imagereward_state_dict(vocab_size, seed), directory / "ImageReward.pt")
    return {
        "checkpoint": directory / "ImageReward.pt",
        "med_config": directory / "med_config.json",
        "tokenizer": tokenizer_dir,
    }


def save_all(directory: Path, seed: int = 0) -> dict[str, dict[str, str]]:
    """Every tiny checkpoint under ``directory``; returns each registered reward's constructor options."""
    clip_dir = save_tiny_clip(directory / "clip", seed)
    mlp = save_aesthetic_mlp(directory / "aesthetic_mlp.pth", seed=seed)
    hps = save_tiny_hps(directory, seed)
    ir = save_tiny_imagereward(directory / "imagereward", seed)
    return {
        "pickscore": {"model": str(clip_dir), "processor": str(clip_dir)},
        "clipscore": {"model": str(clip_dir)},
        "aesthetic": {"model": str(clip_dir), "mlp": str(mlp)},
        "hpsv2": {"checkpoint": str(hps), "architecture": TINY_OPEN_CLIP},
        "imagereward": {k: str(v) for k, v in ir.items()},
    }
