"""CLIP score as DiffusionNFT computes it: the cosine of CLIP ViT-L/14 image and text embeddings.

Procedure (DiffusionNFT ``flow_grpo/clip_scorer.py``): HF ``openai/clip-vit-large-patch14``
(``CLIPModel`` + ``CLIPProcessor``); text padded to ``max_length`` (77) with truncation; images through
the tensor transform ``Resize(224)`` → ``CenterCrop(224)`` → ``Normalize(OpenAI)``; the reward is
``logits_per_image.diagonal() / 100`` = ``exp(logit_scale) · cos / 100``. OpenAI's ``exp(logit_scale)``
is 100, so this is the plain cosine (about 0.2–0.35 for matching pairs). We compute exactly
``exp(logit_scale) · cos / 100`` so a checkpoint with another temperature is scored as the official code does.

Conventions elsewhere (not used here): torchmetrics ``CLIPScore`` reports ``max(100 · cos, 0)``, and
Hessel et al.'s CLIPScore (arXiv 2104.08718) is ``2.5 · max(cos, 0)`` with ViT-B/32; papers that quote
"CLIP score ≈ 30" use the ×100 convention.
"""

from __future__ import annotations

from harness.types import RewardSpec
from rewards._clip import PairedClipScore

LOGITS_DIVISOR = 100.0  # DiffusionNFT: ``outputs.logits_per_image.diagonal() / 100``


class CLIPScore(PairedClipScore):
    """CLIP ViT-L/14 cosine (DiffusionNFT's ``clipscore``): images (B, 3, H, W) in [0, 1] + prompts → (B,).

    ``model`` and ``processor`` are hub ids or local directories; ``processor`` defaults to ``model``.
    """

    divisor = LOGITS_DIVISOR
    text_padding = "max_length"

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 16,
    ) -> None:
        spec = RewardSpec(
            name="clipscore",
            version="1/clip-vit-large-patch14",
            description="CLIP ViT-L/14 exp(logit_scale)*cos(text, image)/100 = cos (DiffusionNFT clipscore)",
            higher_is_better=True,
            value_range=(-1.0, 1.0),
            differentiable=True,
        )
        super().__init__(model, processor or model, device, dtype, batch_size, spec)
