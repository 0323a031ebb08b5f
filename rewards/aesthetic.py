"""LAION improved aesthetic predictor: an MLP on the L2-normalised CLIP ViT-L/14 image embedding.

Procedure (christophschuhmann/improved-aesthetic-predictor ``simple_inference.py``; FlowGRPO
``flow_grpo/aesthetic_scorer.py``): ``CLIPModel.get_image_features`` of ``openai/clip-vit-large-patch14``
(through its ``CLIPProcessor``), divided by its L2 norm, into the MLP
``Linear(768,1024) → Dropout(.2) → Linear(1024,128) → Dropout(.2) → Linear(128,64) → Dropout(.1) →
Linear(64,16) → Linear(16,1)`` (:class:`rewards._clip.PreferenceMLP`, no activations, as the original)
with the weights ``sac+logos+ava1-l14-linearMSE.pth``. The raw output is the reward (the AVA 1–10
rating scale; SD images typically 5–6); neither FlowGRPO nor DiffusionNFT normalises it. The prompt is
not used.

Weights: FlowGRPO commits the MLP file as ``flow_grpo/assets/sac+logos+ava1-l14-linearMSE.pth``; pass that
path as ``mlp``. The default hub file is trl's DDPO re-upload of the same predictor ([inferred]: same
layer sizes and keys; compare the file with the original, 3,714,759 bytes, before relying on it).
Deviation: the processor's PIL resize is replaced by the tensor transform of :mod:`rewards._clip`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from harness.types import Prompt, RewardError, RewardSpec
from rewards._clip import (
    HFClip,
    PreferenceMLP,
    check_batch,
    check_batch_size,
    chunks,
    grad_context,
    load_hf_clip,
    resolve_dtype,
    resolve_file,
)


class Aesthetic:
    """LAION aesthetic score: images (B, 3, H, W) in [0, 1] → (B,) raw scores (about 1–10); prompts unused.

    ``model``/``processor``: the CLIP ViT-L/14 (hub id or local directory); ``mlp``: the MLP's state-dict
    file (local path or ``owner/repo/filename`` on the hub).
    """

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        mlp: str = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth",
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 32,
    ) -> None:
        self.model_ref, self.processor_ref, self.mlp_ref = model, processor or model, mlp
        self.device, self.dtype, self.batch_size = device, resolve_dtype(dtype), check_batch_size(batch_size)
        self.spec = RewardSpec(
            name="aesthetic",
            version="1/sac+logos+ava1-l14-linearMSE",
            description="LAION improved aesthetic predictor (MLP on normalised CLIP ViT-L/14 image embedding), raw",
            higher_is_better=True,
            value_range=(1.0, 10.0),  # the AVA rating scale it regresses; the linear MLP itself is unbounded
            differentiable=True,
        )
        self._loaded: tuple[HFClip, PreferenceMLP] | None = None

    def load(self) -> tuple[HFClip, PreferenceMLP]:
        """Load CLIP and the MLP (once); the only place weights are touched."""
        if self._loaded is None:
            clip = load_hf_clip(self.model_ref, self.processor_ref, self.device, self.dtype, ("model", "processor"))
            state = torch.load(resolve_file(self.mlp_ref, "mlp"), map_location="cpu", weights_only=True)
            dim = int(clip.model.config.projection_dim)
            head = PreferenceMLP(dim)
            try:
                head.load_state_dict(state)
            except RuntimeError as error:
                raise RewardError(
                    f"mlp={self.mlp_ref!r} is not an aesthetic-MLP state dict for {dim}-d CLIP embeddings: {error}"
                ) from error
            self._loaded = (clip, head.eval().requires_grad_(False).to(self.device))
        return self._loaded

    def __call__(self, images: Tensor, prompts: Sequence[Prompt]) -> Tensor:
        check_batch(self.spec.name, images, prompts)
        clip, head = self.load()
        out = []
        with grad_context(images):
            for part in chunks(images.shape[0], self.batch_size):
                out.append(head(clip.image_embeds(images[part])))
        return torch.cat(out).float().cpu()
