"""ImageReward on transformers' BLIP vs a from-scratch forward of the official BLIP modules on the same state dict.

The reference below follows BLIP's ``vit.py`` (timm ViT, LayerNorm eps 1e-6, fused qkv) and ``med.py``
(BERT with cross-attention, eps 1e-12) directly on the *official* key names, so it checks the key renames,
the config read off the checkpoint, and the ``(r − mean) / std`` scale independently of transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness.types import Prompt, RewardError
from rewards._clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize
from rewards.imagereward import REWARD_MEAN, REWARD_STD, ImageReward, convert_state_dict
from tests.rewards.tiny_scorers import BLIP_TEXT, BLIP_VISION, CLIP_IMAGE

PROMPTS = [Prompt("a red apple on a table"), Prompt("a cat"), Prompt("two dogs playing in the snow, at dusk")]


def attention(q, k, v, heads, mask=None):
    b, n, d = q.shape
    q, k, v = (x.reshape(b, x.shape[1], heads, d // heads).transpose(1, 2) for x in (q, k, v))
    logits = q @ k.transpose(-1, -2) / (d // heads) ** 0.5
    if mask is not None:
        logits = logits + (1.0 - mask[:, None, None, :].float()) * -10000.0  # BERT's extended mask
    return (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


def reference_vit(s, x):
    p, width = "blip.visual_encoder.", BLIP_VISION["width"]
    heads = width // 64
    x = F.conv2d(x, s[p + "patch_embed.proj.weight"], s[p + "patch_embed.proj.bias"], stride=BLIP_VISION["patch"])
    x = torch.cat([s[p + "cls_token"].expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1) + s[p + "pos_embed"]
    for i in range(BLIP_VISION["depth"]):
        b = f"{p}blocks.{i}."
        h = F.layer_norm(x, (width,), s[b + "norm1.weight"], s[b + "norm1.bias"], 1e-6)
        q, k, v = F.linear(h, s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"]).chunk(3, dim=-1)
        x = x + F.linear(attention(q, k, v, heads), s[b + "attn.proj.weight"], s[b + "attn.proj.bias"])
        h = F.layer_norm(x, (width,), s[b + "norm2.weight"], s[b + "norm2.bias"], 1e-6)
        h = F.linear(F.gelu(F.linear(h, s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"])), s[b + "mlp.fc2.weight"],
                     s[b + "mlp.fc2.bias"])  # fmt: skip
        x = x + h
    return F.layer_norm(x, (width,), s[p + "norm.weight"], s[p + "norm.bias"], 1e-6)


def reference_text_cls(s, ids, mask, image_embeds):
    t, hidden, heads = "blip.text_encoder.", BLIP_TEXT["hidden"], BLIP_TEXT["heads"]

    def lin(x, name):
        return F.linear(x, s[name + ".weight"], s[name + ".bias"])

    def ln(x, name):
        return F.layer_norm(x, (hidden,), s[name + ".weight"], s[name + ".bias"], 1e-12)

    x = s[t + "embeddings.word_embeddings.weight"][ids] + s[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = ln(x, t + "embeddings.LayerNorm")
    for i in range(BLIP_TEXT["layers"]):
        b = f"{t}encoder.layer.{i}."
        a = attention(lin(x, b + "attention.self.query"), lin(x, b + "attention.self.key"),
                      lin(x, b + "attention.self.value"), heads, mask)  # fmt: skip
        x = ln(lin(a, b + "attention.output.dense") + x, b + "attention.output.LayerNorm")
        c = b + "crossattention."
        a = attention(lin(x, c + "self.query"), lin(image_embeds, c + "self.key"), lin(image_embeds, c + "self.value"),
                      heads)  # fmt: skip
        x = ln(lin(a, c + "output.dense") + x, c + "output.LayerNorm")
        x = ln(lin(F.gelu(lin(x, b + "intermediate.dense")), b + "output.dense") + x, b + "output.LayerNorm")
    return x[:, 0]


def test_scores_equal_the_official_blip_forward_and_scale(tiny_checkpoints):
    options = tiny_checkpoints["imagereward"]
    reward = ImageReward(**options)
    _, tokenizer, _ = reward.load()
    state = torch.load(options["checkpoint"], weights_only=True)
    images = torch.rand(3, 3, CLIP_IMAGE, CLIP_IMAGE, generator=torch.Generator().manual_seed(0))
    tokens = tokenizer([p.text for p in PROMPTS], padding="max_length", truncation=True, max_length=35,
                       return_tensors="pt")  # fmt: skip
    assert tokens["input_ids"].shape == (3, 35) and tokens["input_ids"][0, 0].item() == tokenizer.cls_token_id
    with torch.no_grad():
        embeds = reference_vit(state, normalize(images, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
        x = reference_text_cls(state, tokens["input_ids"], tokens["attention_mask"], embeds)
        for index in (0, 2, 4, 6, 7):
            x = F.linear(x, state[f"mlp.layers.{index}.weight"], state[f"mlp.layers.{index}.bias"])
        expected = (x.squeeze(1) - 0.16717362830052426) / 1.0333394966054072
    scores = reward(images, PROMPTS)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    assert (REWARD_MEAN, REWARD_STD) == (0.16717362830052426, 1.0333394966054072)


def test_key_renames_follow_the_official_layout():
    state = {
        "blip.visual_encoder.blocks.3.attn.qkv.weight": 1,
        "blip.visual_encoder.blocks.3.attn.proj.bias": 2,
        "blip.visual_encoder.norm.weight": 3,
        "blip.visual_encoder.cls_token": 4,
        "blip.text_encoder.encoder.layer.0.crossattention.self.key.weight": 5,
        "blip.text_encoder.embeddings.position_ids": 6,
        "blip.vision_proj.weight": 7,
        "mlp.layers.7.bias": 8,
    }
    converted, skipped = convert_state_dict(state)  # type: ignore[arg-type]
    assert converted == {
        "vision.encoder.layers.3.self_attn.qkv.weight": 1,
        "vision.encoder.layers.3.self_attn.projection.bias": 2,
        "vision.post_layernorm.weight": 3,
        "vision.embeddings.class_embedding": 4,
        "text.encoder.layer.0.crossattention.self.key.weight": 5,
        "mlp.layers.7.bias": 8,
    }
    assert sorted(skipped) == ["blip.text_encoder.embeddings.position_ids", "blip.vision_proj.weight"]


def test_a_missing_weight_is_an_error_not_a_random_init(tiny_checkpoints, tmp_path):
    options = dict(tiny_checkpoints["imagereward"])
    state = torch.load(options["checkpoint"], weights_only=True)
    del state["blip.text_encoder.encoder.layer.1.crossattention.self.query.weight"]
    torch.save(state, tmp_path / "partial.pt")
    options["checkpoint"] = str(tmp_path / "partial.pt")
    with pytest.raises(RewardError, match="missing .*crossattention.self.query.weight"):
        ImageReward(**options)(torch.rand(1, 3, 32, 32), PROMPTS[:1])
    med = json.loads(Path(tiny_checkpoints["imagereward"]["med_config"]).read_text())
    del med["hidden_size"]
    (tmp_path / "med.json").write_text(json.dumps(med))
    options = dict(tiny_checkpoints["imagereward"], med_config=str(tmp_path / "med.json"))
    with pytest.raises(RewardError, match="med_config has no 'hidden_size'"):
        ImageReward(**options)(torch.rand(1, 3, 32, 32), PROMPTS[:1])
