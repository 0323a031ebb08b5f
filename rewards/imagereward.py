"""ImageReward v1.0 (Xu et al., arXiv 2304.05977), reimplemented on transformers' BLIP so it runs on transformers 5.

Procedure (``image-reward`` 1.5, ``ImageReward.ImageReward.inference_rank``, as DiffusionNFT calls it):
images → Resize(224, bicubic) → CenterCrop(224) → OpenAI mean/std → BLIP ViT-L/16 (all tokens after its
final LayerNorm); the prompt → BERT tokenizer (``bert-base-uncased`` + BLIP's ``[DEC]``/``[ENC]`` tokens),
``padding="max_length"``, truncation, ``max_length=35``; the BLIP text encoder cross-attends to the image
tokens; its [CLS] output goes through the 5-layer MLP head (:class:`rewards._clip.PreferenceMLP`) and the
score is ``(r − 0.16717362830052426) / 1.0333394966054072``. That is the reward, with no further
normalisation (about −2…2).

Why a reimplementation rather than the ``image-reward`` package: that package pins transformers < 5 and
does not import on 5.x (``apply_chunking_to_forward`` and more are gone), while the rest of diffrl needs 5.x.
transformers' ``BlipVisionModel`` / ``BlipTextModel`` are ports of the same BLIP ``vit.py`` / ``med.py``
modules, so the official ``ImageReward.pt`` state dict loads after the key renames in :func:`convert_state_dict`
(the same renames as transformers' BLIP conversion script). The ViT's size is read from the checkpoint
(heads = width / 64, as BLIP's base and large ViTs), the text encoder's from ``med_config.json`` with
``encoder_width`` = the ViT width, as ``BLIP_Pretrain`` sets it. Unused checkpoint entries
(``blip.vision_proj``, ``blip.text_proj``) are skipped; any missing weight is an error.
Deviation: tensor (differentiable) resizing instead of PIL, as for the CLIP scorers.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from harness.types import Prompt, RewardError, RewardSpec
from rewards._clip import (
    CropTransform,
    PreferenceMLP,
    check_batch,
    check_batch_size,
    chunks,
    grad_context,
    load_pretrained,
    resolve_dtype,
    resolve_file,
)

logger = logging.getLogger(__name__)

REWARD_MEAN = 0.16717362830052426  # ImageReward.mean
REWARD_STD = 1.0333394966054072  # ImageReward.std
MAX_TEXT_LENGTH = 35
IGNORED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")

_VISION_RENAMES = (  # BLIP vit.py (timm layout) → transformers BlipVisionModel
    (r"^blip\.visual_encoder\.cls_token$", "vision.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", "vision.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.patch_embed\.proj\.", "vision.embeddings.patch_embedding."),
    (r"^blip\.visual_encoder\.norm\.", "vision.post_layernorm."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision.encoder.layers.\1.layer_norm1."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision.encoder.layers.\1.layer_norm2."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision.encoder.layers.\1.self_attn.qkv."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision.encoder.layers.\1.self_attn.projection."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision.encoder.layers.\1.mlp."),
    (r"^blip\.text_encoder\.", "text."),  # med.py BertModel → BlipTextModel: the same names
    (r"^mlp\.layers\.", "mlp.layers."),
)


def convert_state_dict(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Official ``ImageReward.pt`` keys → :class:`ImageRewardModel` keys; returns (converted, skipped keys)."""
    converted: dict[str, Tensor] = {}
    skipped: list[str] = []
    for key, value in state.items():
        for pattern, replacement in _VISION_RENAMES:
            new, hits = re.subn(pattern, replacement, key)
            if hits:
                break
        if not hits or key.endswith("embeddings.position_ids") or key.startswith(IGNORED_PREFIXES):
            skipped.append(key)
            continue
        converted[new] = value
    return converted, skipped


def blip_configs(state: Mapping[str, Tensor], med_config: Mapping[str, Any]) -> tuple[Any, Any]:
    """The vision config read off the checkpoint's shapes; the text config from ``med_config.json``."""
    from transformers import BlipTextConfig, BlipVisionConfig

    prefix = "blip.visual_encoder."
    try:
        width = state[prefix + "cls_token"].shape[-1]
        patch = state[prefix + "patch_embed.proj.weight"].shape[-1]
        positions = state[prefix + "pos_embed"].shape[1]
        intermediate = state[prefix + "blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as error:
        raise RewardError(f"not an ImageReward checkpoint: no {error.args[0]!r} (expected BLIP ViT keys)") from None
    depth = len({k.split(".")[3] for k in state if k.startswith(prefix + "blocks.")})
    vision = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=depth,
        num_attention_heads=max(1, width // 64),
        image_size=math.isqrt(positions - 1) * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # BLIP vit.py: partial(nn.LayerNorm, eps=1e-6)
    )
    try:
        text = BlipTextConfig(
            vocab_size=med_config["vocab_size"],
            hidden_size=med_config["hidden_size"],
            encoder_hidden_size=width,  # BLIP_Pretrain: encoder_config.encoder_width = vision_width
            intermediate_size=med_config["intermediate_size"],
            num_hidden_layers=med_config["num_hidden_layers"],
            num_attention_heads=med_config["num_attention_heads"],
            max_position_embeddings=med_config["max_position_embeddings"],
            hidden_act=med_config.get("hidden_act", "gelu"),
            layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
            pad_token_id=med_config.get("pad_token_id", 0),
            is_decoder=True,  # builds the cross-attention layers; we run it with is_decoder=False (bidirectional)
        )
    except KeyError as error:
        raise RewardError(f"med_config has no {error.args[0]!r}; expected BLIP's med_config.json") from None
    return vision, text


class ImageRewardModel(nn.Module):
    """BLIP ViT + BLIP text encoder (cross-attention) + MLP head → raw reward ``r`` (before mean/std)."""

    def __init__(self, vision_config: Any, text_config: Any) -> None:
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = PreferenceMLP(text_config.hidden_size)

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, 3, S, S) normalised pixels + (B, L) tokens → (B,) raw MLP output on the [CLS] feature."""
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        out = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        )
        return self.mlp(out.last_hidden_state[:, 0, :].float())


def blip_tokenizer(ref: str) -> Any:
    """BLIP's ``init_tokenizer``: the BERT tokenizer plus ``[DEC]`` (bos) and ``[ENC]`` (vocabulary 30524)."""
    from transformers import AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, ref, "tokenizer")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_tokens(["[ENC]"], special_tokens=True)
    return tokenizer


class ImageReward:
    """ImageReward v1.0: images (B, 3, H, W) in [0, 1] + prompts → (B,) z-scored rewards; lazy loading.

    ``checkpoint`` / ``med_config``: local files or ``owner/repo/filename`` on the hub; ``tokenizer``: a hub
    id or local directory of the BERT tokenizer.
    """

    def __init__(
        self,
        checkpoint: str = "THUDM/ImageReward/ImageReward.pt",
        med_config: str = "THUDM/ImageReward/med_config.json",
        tokenizer: str = "bert-base-uncased",
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 16,
    ) -> None:
        self.checkpoint, self.med_config, self.tokenizer_ref = checkpoint, med_config, tokenizer
        self.device, self.dtype, self.batch_size = device, resolve_dtype(dtype), check_batch_size(batch_size)
        self.spec = RewardSpec(
            name="imagereward",
            version="1/ImageReward-v1.0",
            description="ImageReward v1.0 (BLIP + MLP, (r - 0.1672) / 1.0333), on transformers' BLIP",
            higher_is_better=True,
            value_range=(-3.0, 3.0),  # z-scored by the official constants; nominal ±3σ, not a hard bound
            differentiable=True,
        )
        self._loaded: tuple[ImageRewardModel, Any, CropTransform] | None = None

    def load(self) -> tuple[ImageRewardModel, Any, CropTransform]:
        """Read med_config, checkpoint and tokenizer; build and fill the model (once)."""
        if self._loaded is None:
            med = json.loads(resolve_file(self.med_config, "med_config").read_text())
            state = torch.load(resolve_file(self.checkpoint, "checkpoint"), map_location="cpu", weights_only=True)
            vision_config, text_config = blip_configs(state, med)
            model = ImageRewardModel(vision_config, text_config)
            converted, skipped = convert_state_dict(state)
            result = model.load_state_dict(converted, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise RewardError(
                    f"checkpoint={self.checkpoint!r} does not fit ImageReward: missing {result.missing_keys[:5]}, "
                    f"unexpected {result.unexpected_keys[:5]}"
                )
            if skipped:
                logger.info("ImageReward: skipped %d unused checkpoint entries: %s", len(skipped), skipped[:5])
            tokenizer = blip_tokenizer(self.tokenizer_ref)
            size = int(vision_config.image_size)
            model = model.eval().requires_grad_(False).to(self.device, self.dtype)
            model.mlp.float()
            self._loaded = (model, tokenizer, CropTransform(size=size, crop=(size, size)))
        return self._loaded

    def __call__(self, images: Tensor, prompts: Sequence[Prompt]) -> Tensor:
        check_batch(self.spec.name, images, prompts)
        model, tokenizer, transform = self.load()
        out = []
        with grad_context(images):
            for part in chunks(images.shape[0], self.batch_size):
                pixels = transform(images[part].to(self.device)).to(self.dtype)
                tokens = tokenizer(
                    [p.text for p in prompts[part]],
                    padding="max_length",
                    truncation=True,
                    max_length=MAX_TEXT_LENGTH,
                    return_tensors="pt",
                ).to(self.device)
                raw = model(pixels, tokens["input_ids"], tokens["attention_mask"])
                out.append((raw - REWARD_MEAN) / REWARD_STD)
        return torch.cat(out).float().cpu()
