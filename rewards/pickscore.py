"""PickScore (Kirstain et al., arXiv 2305.01569), on FlowGRPO/DiffusionNFT's scale: ``logit_scale · cos / 26``.

Procedure (model card of ``yuvalkirstain/PickScore_v1``; FlowGRPO ``flow_grpo/pickscore_scorer.py``):
the processor is ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s (224 px, OpenAI mean/std, CLIP BPE), the
model ``yuvalkirstain/PickScore_v1`` (a fine-tuned ``CLIPModel`` ViT-H/14). Image and text embeddings
(text padded, truncated at 77 tokens) are L2-normalised; the paired score is
``exp(logit_scale) · ⟨txt_i, img_i⟩``, and FlowGRPO/DiffusionNFT divide it by 26 ("norm to 0-1").

Scale: raw PickScores of SD images are about 20–23 and papers report those (e.g. 23.31), so the
tables show ``26 ×`` this reward. The bounds are ±exp(logit_scale)/26 = ±100/26 for the real model.
Deviation: the processor's PIL resize is replaced by the tensor transform of :mod:`rewards._clip`
(differentiable).
"""

from __future__ import annotations

from harness.types import RewardSpec
from rewards._clip import PairedClipScore

PICKSCORE_DIVISOR = 26.0  # FlowGRPO / DiffusionNFT: ``scores / 26``


class PickScore(PairedClipScore):
    """PickScore / 26: images (B, 3, H, W) in [0, 1] + prompts → (B,); weights load on the first call.

    ``model`` and ``processor`` are hub ids or local directories (``save_pretrained`` layout).
    """

    divisor = PICKSCORE_DIVISOR
    text_padding = True

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 16,
    ) -> None:
        spec = RewardSpec(
            name="pickscore",
            version="1/PickScore_v1/26",
            description="PickScore exp(logit_scale)*cos(text, image)/26 (FlowGRPO scale; tables show x26)",
            higher_is_better=True,
            value_range=(-100.0 / PICKSCORE_DIVISOR, 100.0 / PICKSCORE_DIVISOR),
            differentiable=True,
        )
        super().__init__(model, processor, device, dtype, batch_size, spec)
