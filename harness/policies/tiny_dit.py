"""A tiny text-conditional flow-matching DiT for the shapes world (about 1M parameters).

Pixel space (3×32×32 in [−1, 1]), patch 4 → 64 tokens, adaLN-Zero blocks (Peebles & Xie,
DiT, arXiv 2212.09748) with self-attention over patches and cross-attention to a small text
encoder over the grammar's vocabulary. The empty prompt (just ``<bos>``) is the unconditional
input, trained by condition dropout so that CFG works.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from harness.policy import Cond, WeightSet, to_device

if TYPE_CHECKING:
    from harness.policies.tiny_unet import TinyUNet


@dataclass(frozen=True)
class TinyDiTConfig:
    """Architecture of the tiny DiT; saved next to its weights."""

    vocabulary: tuple[str, ...] = field(default_factory=tuple)  # index 0 = <pad>; <bos> is appended
    image_size: int = 32
    channels: int = 3
    patch_size: int = 4
    hidden: int = 96
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    text_layers: int = 2
    max_tokens: int = 13  # <bos> + the longest prompt
    prediction: str = "v"  # what the network outputs: "v" (velocity) or "x" (the clean image; see TinyDiT)
    min_t: float = 0.05  # x-prediction: v = (x_t − x̂0) / max(t, min_t)
    conv_channels: int = 0  # > 0: a full-resolution conv stem and head of this width around the DiT (PixelHead)

    def __post_init__(self) -> None:
        if self.prediction not in ("v", "x"):
            raise ValueError(f"prediction must be 'v' or 'x', got {self.prediction!r}")
        if not 0.0 < self.min_t < 1.0:
            raise ValueError(f"min_t must be in (0, 1), got {self.min_t}")
        if self.conv_channels < 0:
            raise ValueError(f"conv_channels must be >= 0, got {self.conv_channels}")


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if context_mask is None else context_mask[:, None, None, :]
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(h.transpose(1, 2).reshape(b, n, d))


class TextLayer(nn.Module):
    """Pre-norm transformer layer (written out rather than nn.TransformerEncoderLayer, whose
    no-grad fast path changes the numerics: θ, old and ref must agree bit for bit)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = Attention(hidden, heads)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        x = self.norm1(h)
        h = h + self.attn(x, x, mask)
        return h + self.mlp(self.norm2(h))


class TextSpec(Protocol):
    """What the text encoder reads from a tiny model's config (the DiT's and the U-Net's)."""

    @property
    def vocabulary(self) -> tuple[str, ...]: ...
    @property
    def hidden(self) -> int: ...
    @property
    def heads(self) -> int: ...
    @property
    def text_layers(self) -> int: ...
    @property
    def max_tokens(self) -> int: ...


class TextEncoder(nn.Module):
    """Token + position embeddings and a few pre-norm transformer layers."""

    def __init__(self, cfg: TextSpec) -> None:
        super().__init__()
        self.token = nn.Embedding(len(cfg.vocabulary) + 1, cfg.hidden)  # +1: <bos>
        self.position = nn.Parameter(torch.randn(cfg.max_tokens, cfg.hidden) * 0.02)
        self.layers = nn.ModuleList(TextLayer(cfg.hidden, cfg.heads) for _ in range(cfg.text_layers))
        self.norm = nn.LayerNorm(cfg.hidden)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mask = tokens != 0  # (B, L); <bos> is never padding
        h = self.token(tokens) + self.position[: tokens.shape[1]]
        for layer in self.layers:
            h = layer(h, mask)
        h = self.norm(h)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return h, mask, pooled


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of 1000·t (the DiT/SD3 timestep scale stays inside the model)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class DiTBlock(nn.Module):
    """adaLN-Zero block: self-attention, cross-attention to text, MLP; each gated by the condition."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6) for _ in range(3))
        self.self_attn = Attention(hidden, heads)
        self.cross_attn = Attention(hidden, heads)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, int(hidden * mlp_ratio)),
            nn.GELU(approximate="tanh"),
            nn.Linear(int(hidden * mlp_ratio), hidden),
        )
        self.modulation = nn.Linear(hidden, 9 * hidden)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, c: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        # (shift, scale, gate) for self-attention, cross-attention and the MLP
        mod = self.modulation(F.silu(c))[:, None].chunk(9, dim=-1)
        h = self.norms[0](x) * (1 + mod[1]) + mod[0]
        x = x + mod[2] * self.self_attn(h, h)
        h = self.norms[1](x) * (1 + mod[4]) + mod[3]
        x = x + mod[5] * self.cross_attn(h, text, text_mask)
        h = self.norms[2](x) * (1 + mod[7]) + mod[6]
        return x + mod[8] * self.mlp(h)


class PixelHead(nn.Module):
    """Full-resolution 3×3 convolutions around the patch transformer (a one-level U-Net skip).

    The DiT sees 4×4 patches and writes each patch from one token, so shape edges inside a patch and
    the seams between patches come out blocky; the stem keeps x_t at full resolution and the head
    mixes it with the unpatchified DiT features. The last conv starts at zero (as adaLN-Zero does).
    """

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.mix = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        for parameter in self.out.parameters():
            nn.init.zeros_(parameter)

    def forward(self, features: Tensor, x_t: Tensor) -> Tensor:
        h = F.gelu(features + self.stem(x_t))
        return self.out(F.gelu(self.mix(h)))


class TinyDiT(nn.Module):
    """v_θ(x_t, t, text) for 3×32×32 images."""

    def __init__(self, cfg: TinyDiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.text = TextEncoder(cfg)
        self.patchify = nn.Conv2d(cfg.channels, cfg.hidden, cfg.patch_size, stride=cfg.patch_size)
        self.position = nn.Parameter(torch.randn(n_patches, cfg.hidden) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, cfg.hidden))
        self.text_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.blocks = nn.ModuleList(DiTBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(cfg.hidden, 2 * cfg.hidden)
        self.out_channels = cfg.conv_channels or cfg.channels
        self.final = nn.Linear(cfg.hidden, cfg.patch_size**2 * self.out_channels)
        for layer in (self.final_modulation, self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.pixel_head = PixelHead(cfg.channels, cfg.conv_channels) if cfg.conv_channels else None

    def encode_text(self, tokens: Tensor) -> Cond:
        text, mask, pooled = self.text(tokens)
        return Cond({"text": text, "mask": mask, "pooled": pooled})

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        cfg = self.cfg
        b = x_t.shape[0]
        h = self.patchify(x_t).flatten(2).transpose(1, 2) + self.position
        c = self.time_mlp(timestep_embedding(t, cfg.hidden)) + self.text_proj(cond.tensors["pooled"])
        for block in self.blocks:
            h = block(h, c, cond.tensors["text"], cond.tensors["mask"])
        shift, scale = self.final_modulation(F.silu(c))[:, None].chunk(2, dim=-1)
        h = self.final(self.final_norm(h) * (1 + scale) + shift)  # (B, N, p·p·C)
        side = cfg.image_size // cfg.patch_size
        h = h.view(b, side, side, cfg.patch_size, cfg.patch_size, self.out_channels)
        out = h.permute(0, 5, 1, 3, 2, 4).reshape(b, self.out_channels, cfg.image_size, cfg.image_size)
        if self.pixel_head is not None:
            out = self.pixel_head(out, x_t)
        if cfg.prediction == "v":
            return out
        # x-prediction (Li & He 2025, "Back to Basics", arXiv 2511.13720): a 4×4×3 patch carries
        # 48 noise values, too many for a 96-wide token to pass through, while the clean image is
        # simple; predict x̂0 and return the velocity of the straight path through it.
        return (x_t - out) / t.clamp(min=cfg.min_t)[:, None, None, None]


class Tokenizer:
    """Whitespace tokenizer over a closed vocabulary; ``<bos>`` first, padded with 0."""

    def __init__(self, vocabulary: Sequence[str], max_tokens: int) -> None:
        self.index = {word: i for i, word in enumerate(vocabulary)}
        self.bos = len(vocabulary)
        self.max_tokens = max_tokens

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        tokens = torch.zeros(len(prompts), self.max_tokens, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = prompt.lower().split()
            unknown = [w for w in words if w not in self.index or w == "<pad>"]
            if unknown:
                raise ValueError(f"prompt {prompt!r}: words {unknown} are not in the model's vocabulary")
            if len(words) + 1 > self.max_tokens:
                raise ValueError(f"prompt {prompt!r} is longer than {self.max_tokens - 1} words")
            tokens[row, 0] = self.bos
            tokens[row, 1 : len(words) + 1] = torch.tensor([self.index[w] for w in words], dtype=torch.long)
        return tokens


def cuda_determinism() -> None:
    """The deterministic settings the tiny models run under on CUDA; process-wide (docs/shapes.md, "On a GPU").

    IEEE fp32 matmuls and convolutions, not TF32 (the CPU's arithmetic); cuDNN's deterministic algorithms
    without autotuning; cuBLAS's deterministic workspace (read when its first handle is made); and torch's
    deterministic algorithms (``index_add``, the attention backward), warning where an operation has none.
    All cheap for models this small.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.fp32_precision = "ieee"
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


class TinyDiTPolicy:
    """:class:`harness.policy.Policy` for the tiny DiT; "old" and "ref" are parameter copies.

    The text encoder is frozen during RL, as SD3.5's text encoders are under LoRA, so prompt
    encodings are the same under every weight set and methods encode each prompt once.
    """

    supports_cfg = True

    def __init__(self, model: TinyDiT | TinyUNet, device: torch.device | str | None = None) -> None:
        """``device``: where every weight set lives (None: where ``model`` is); see :meth:`to`."""
        self.model = model
        model.text.requires_grad_(False)
        self.cfg = model.cfg
        self.sample_shape: tuple[int, ...] = (model.cfg.channels, model.cfg.image_size, model.cfg.image_size)
        self.tokenizer = Tokenizer(model.cfg.vocabulary, model.cfg.max_tokens)
        self._copies: dict[WeightSet, TinyDiT | TinyUNet] = {"old": self._frozen_copy(), "ref": self._frozen_copy()}
        self._active: WeightSet = "train"
        self.device: torch.device = next(model.parameters()).device
        if device is not None:
            self.to(device)

    def to(self, device: torch.device | str) -> TinyDiTPolicy:
        """Move θ, old and ref to ``device`` (in place: the parameters stay the same objects); on CUDA also set
        :func:`cuda_determinism`'s process-wide flags. Returns the policy."""
        device = torch.device(device)
        if device.type == "cuda":
            cuda_determinism()
        for network in (self.model, *self._copies.values()):
            network.to(device)
        self.device = next(self.model.parameters()).device  # cuda → cuda:0: the device the tensors report
        return self

    def _frozen_copy(self) -> TinyDiT | TinyUNet:
        clone = copy.deepcopy(self.model)
        clone.requires_grad_(False)
        return clone

    @property
    def active(self) -> TinyDiT | TinyUNet:
        return self.model if self._active == "train" else self._copies[self._active]

    def encode(self, prompts: Sequence[str]) -> Cond:
        # The text encoder is part of θ: encodings depend on the active weights.
        return self.active.encode_text(to_device(self.tokenizer(prompts), self.device))

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.active(x_t, t, cond)

    def decode(self, x0: Tensor) -> Tensor:
        return ((x0 + 1) / 2).clamp(0, 1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextmanager
    def use_weights(self, which: WeightSet) -> Iterator[None]:
        if which not in ("train", "old", "ref"):
            raise ValueError(f"weight set must be 'train', 'old' or 'ref', got {which!r}")
        previous, self._active = self._active, which
        try:
            yield
        finally:
            self._active = previous

    @torch.no_grad()
    def update_old(self, eta: float) -> None:
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        for old, new in zip(self._copies["old"].parameters(), self.model.parameters(), strict=True):
            old.mul_(eta).add_(new.detach(), alpha=1.0 - eta)

    def fully_shard(self, shard: Callable[[nn.Module], object]) -> None:
        """FSDP: shard each weight set's network per DiT block, the text encoder, then the root.

        ``encode_text`` is registered as a forward method, so encoding prompts all-gathers the root
        (its parameters are shards otherwise). Used by :func:`harness.fsdp.shard_policy`.
        """
        from torch.distributed.fsdp import register_fsdp_forward_method

        for network in (self.model, *self._copies.values()):
            for block in network.blocks:
                shard(block)
            shard(network.text)
            shard(network)
            register_fsdp_forward_method(network, "encode_text")

    def weight_state(self, which: WeightSet) -> dict[str, Tensor]:
        """A copy of one weight set's tensors (for checkpoints and EMA)."""
        module = self.model if which == "train" else self._copies[which]
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def load_weight_state(self, which: WeightSet, state: dict[str, Tensor]) -> None:
        module = self.model if which == "train" else self._copies[which]
        module.load_state_dict(state)


def save_tiny_dit(model: TinyDiT | TinyUNet, directory: Path, extra: dict[str, object] | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (architecture plus ``extra``)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    payload = {"architecture": asdict(model.cfg), **(extra or {})}
    (directory / "config.json").write_text(json.dumps(payload, indent=2) + "\n")
    return directory


def load_tiny_dit(directory: Path) -> TinyDiT | TinyUNet:
    """Load a model written by :func:`save_tiny_dit`: the DiT, or the U-Net if its architecture says ``backbone: unet``."""
    from harness.policies.tiny_unet import TinyUNet, TinyUNetConfig  # imports this module

    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: a tiny-DiT checkpoint is a folder with config.json and model.safetensors"
            )
    architecture = json.loads(config_path.read_text())["architecture"]
    architecture["vocabulary"] = tuple(architecture["vocabulary"])
    model: TinyDiT | TinyUNet
    if architecture.get("backbone") == "unet":
        architecture["widths"] = tuple(architecture["widths"])
        model = TinyUNet(TinyUNetConfig(**architecture))
    else:
        model = TinyDiT(TinyDiTConfig(**architecture))
    model.load_state_dict(load_file(weights_path))
    return model
