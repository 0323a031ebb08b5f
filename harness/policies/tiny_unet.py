"""A tiny text-conditional flow-matching U-Net for the shapes world (about 0.5M parameters).

The shapes base's backbone since issue 15 (results/shapes_base/diagnosis.md): a patch-4 DiT writes
each 4 × 4 patch from one token, so on 7–11 px shapes it draws blocky fragments and cannot restore
a half-noised ground truth; 3 × 3 convolutions at full resolution draw edges and flat colours.

Three resolutions (32, 16, 8) with one FiLM-conditioned residual block each way (Ho et al. 2020,
DDPM's U-Net, with the time and pooled-prompt embedding as scale and shift), and at 8 × 8 a few
transformer blocks with self-attention (layout: "left of", counts) and cross-attention to the
prompt's tokens (which shape gets which colour). The text encoder, time embedding and output
convention (x-prediction turned into a velocity) are the tiny DiT's, so :class:`TinyDiTPolicy`
wraps either network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.policies.tiny_dit import Attention, TextEncoder, timestep_embedding
from harness.policy import Cond


@dataclass(frozen=True)
class TinyUNetConfig:
    """Architecture of the tiny U-Net; saved next to its weights (``backbone`` tells the loader)."""

    vocabulary: tuple[str, ...] = field(default_factory=tuple)  # index 0 = <pad>; <bos> is appended
    image_size: int = 32
    channels: int = 3
    widths: tuple[int, int, int] = (16, 32, 64)  # feature channels at full, half and quarter resolution
    hidden: int = 96  # width of the text encoder and of the time/prompt condition
    heads: int = 4
    text_layers: int = 2
    max_tokens: int = 13  # <bos> + the longest prompt
    attention_blocks: int = 2  # transformer blocks at the quarter resolution
    prediction: str = "x"  # "x": the network outputs x̂0 (see forward); "v": the velocity
    min_t: float = 0.05  # x-prediction: v = (x_t − x̂0) / max(t, min_t)
    backbone: str = "unet"

    def __post_init__(self) -> None:
        if self.prediction not in ("v", "x"):
            raise ValueError(f"prediction must be 'v' or 'x', got {self.prediction!r}")
        if not 0.0 < self.min_t < 1.0:
            raise ValueError(f"min_t must be in (0, 1), got {self.min_t}")
        if len(self.widths) != 3 or any(w <= 0 or w % 8 for w in self.widths):
            raise ValueError(f"widths must be three positive multiples of 8 (GroupNorm groups), got {self.widths}")
        if self.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two halvings), got {self.image_size}")
        if self.backbone != "unet":
            raise ValueError(f"backbone must be 'unet' for TinyUNetConfig, got {self.backbone!r}")


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, FiLM by the condition, GroupNorm → SiLU → conv (zero-initialised), plus a skip."""

    def __init__(self, in_channels: int, out_channels: int, condition: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.film = nn.Linear(condition, 2 * out_channels)
        self.norm2 = nn.GroupNorm(8, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        for parameter in self.conv2.parameters():
            nn.init.zeros_(parameter)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(c))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class AttentionBlock(nn.Module):
    """Pre-norm self-attention over the feature map's positions, cross-attention to the prompt, MLP."""

    def __init__(self, width: int, heads: int, text_width: int) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = Attention(width, heads)
        self.cross_attn = Attention(width, heads)
        self.context = nn.Linear(text_width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = x.flatten(2).transpose(1, 2)
        normed = self.norm1(h)
        h = h + self.self_attn(normed, normed)
        h = h + self.cross_attn(self.norm2(h), self.context(text), text_mask)
        h = h + self.mlp(self.norm3(h))
        return h.transpose(1, 2).reshape(b, c, height, width)


class TinyUNet(nn.Module):
    """v_θ(x_t, t, text) for 3 × 32 × 32 images."""

    def __init__(self, cfg: TinyUNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        full, half, quarter = cfg.widths
        self.text = TextEncoder(cfg)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, cfg.hidden))
        self.text_proj = nn.Linear(cfg.hidden, cfg.hidden)
        side = cfg.image_size // 4
        self.position = nn.Parameter(torch.randn(1, quarter, side, side) * 0.02)
        self.stem = nn.Conv2d(cfg.channels, full, 3, padding=1)
        self.down_full = ResBlock(full, full, cfg.hidden)
        self.to_half = nn.Conv2d(full, half, 3, stride=2, padding=1)
        self.down_half = ResBlock(half, half, cfg.hidden)
        self.to_quarter = nn.Conv2d(half, quarter, 3, stride=2, padding=1)
        self.middle = ResBlock(quarter, quarter, cfg.hidden)
        self.blocks = nn.ModuleList(AttentionBlock(quarter, cfg.heads, cfg.hidden) for _ in range(cfg.attention_blocks))
        self.up_half = nn.ConvTranspose2d(quarter, half, 2, stride=2)
        self.up_half_block = ResBlock(2 * half, half, cfg.hidden)
        self.up_full = nn.ConvTranspose2d(half, full, 2, stride=2)
        self.up_full_block = ResBlock(2 * full, full, cfg.hidden)
        self.out_norm = nn.GroupNorm(8, full)
        self.out = nn.Conv2d(full, cfg.channels, 3, padding=1)
        for parameter in self.out.parameters():
            nn.init.zeros_(parameter)

    def encode_text(self, tokens: Tensor) -> Cond:
        text, mask, pooled = self.text(tokens)
        return Cond({"text": text, "mask": mask, "pooled": pooled})

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        c = self.time_mlp(timestep_embedding(t, self.cfg.hidden)) + self.text_proj(cond.tensors["pooled"])
        full = self.down_full(self.stem(x_t), c)
        half = self.down_half(self.to_half(full), c)
        h = self.middle(self.to_quarter(half), c) + self.position
        for block in self.blocks:
            h = block(h, cond.tensors["text"], cond.tensors["mask"])
        h = self.up_half_block(torch.cat([self.up_half(h), half], dim=1), c)
        h = self.up_full_block(torch.cat([self.up_full(h), full], dim=1), c)
        out = self.out(F.silu(self.out_norm(h)))
        if self.cfg.prediction == "v":
            return out
        # x-prediction (Li & He 2025, arXiv 2511.13720), as in the tiny DiT: the straight path's velocity through x̂0.
        return (x_t - out) / t.clamp(min=self.cfg.min_t)[:, None, None, None]
