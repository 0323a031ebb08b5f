"""HPSv2.1 (Wu et al., arXiv 2306.09341): the raw cosine of an open_clip ViT-H-14 fine-tuned on human preferences.

Procedure (``hpsv2.score`` in hpsv2/hpsv2x 1.2.0; DiffusionNFT ``flow_grpo/hpsv2_scorer.py``): open_clip
``ViT-H-14`` whose every weight is replaced by ``HPS_v2.1_compressed.pt`` (``state_dict``, strict load);
images: longer side → 224 (bicubic), pad to 224² with 0, OpenAI mean/std (no centre crop); text: the
CLIP BPE tokenizer, 77 tokens. The reward is ``diag(img_feat @ txt_feat.T)`` of the L2-normalised
features, the raw cosine (about 0.2–0.35): no logit scale and no further normalisation. Papers often
quote ×100.

Choices, stated:

* Model and tokenizer come from open_clip 3.x (a declared dependency); the hpsv2/hpsv2x package is not
  used (it pins pytest==7.2.0 and protobuf<4). Its vendored 2023 open_clip fork has the same ViT-H-14
  architecture and state-dict keys, the load is strict, and so every weight comes from the HPS
  checkpoint: the 3.9 GB LAION base weights are never needed ([inferred] in rewards.md §4; verify on the
  real files). The tokenizer is the one open_clip's ``architecture`` config names (ViT-H-14: the CLIP BPE
  SimpleTokenizer, 77 tokens), whose ids equal hpsv2x 1.2.0's ``tokenize`` (checked in the tests against
  ids recorded from it).
* hpsv2 runs the model under CUDA autocast (``precision='amp'``); DiffusionNFT runs it in fp32. We run in
  ``dtype`` (float32 by default).
* Deviation: PIL resizing is replaced by the tensor transform of :mod:`rewards._clip` (differentiable).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from harness.types import Prompt, RewardError, RewardSpec
from rewards._clip import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    check_batch,
    check_batch_size,
    chunks,
    grad_context,
    normalize,
    resize_longest_and_pad,
    resolve_dtype,
    resolve_file,
)


class HPSv2:
    """HPSv2.1 raw cosine: images (B, 3, H, W) in [0, 1] + prompts → (B,); weights load on the first call.

    ``checkpoint``: the HPS state-dict file, a local path or ``owner/repo/filename`` on the hub
    (``xswu/HPSv2/HPS_v2_compressed.pt`` is HPSv2.0). ``architecture``: the open_clip model config name;
    its tokenizer is open_clip's for that config.
    """

    def __init__(
        self,
        checkpoint: str = "xswu/HPSv2/HPS_v2.1_compressed.pt",
        architecture: str = "ViT-H-14",
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 16,
    ) -> None:
        self.checkpoint, self.architecture = checkpoint, architecture
        self.device, self.dtype, self.batch_size = device, resolve_dtype(dtype), check_batch_size(batch_size)
        self.spec = RewardSpec(
            name="hpsv2",
            version=f"1/{checkpoint.rsplit('/', 1)[-1]}",
            description="HPSv2.1 raw cosine(text, image) of the HPS-tuned open_clip ViT-H-14 (papers quote x100)",
            higher_is_better=True,
            value_range=(-1.0, 1.0),
            differentiable=True,
        )
        self._loaded: tuple[Any, Any] | None = None

    def load(self) -> tuple[Any, Any]:
        """Build the open_clip model, load the HPS checkpoint strictly (once); the only place weights are touched."""
        if self._loaded is None:
            import open_clip

            if self.architecture not in open_clip.list_models():
                raise RewardError(f"architecture={self.architecture!r} is not an open_clip model config")
            path = resolve_file(self.checkpoint, "checkpoint")
            tokenize = open_clip.get_tokenizer(self.architecture)
            model = open_clip.create_model(self.architecture, pretrained=None, device="cpu", output_dict=True)
            try:
                open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
            except RuntimeError as error:
                raise RewardError(
                    f"checkpoint={str(path)!r} does not fit open_clip {self.architecture}: {error}"
                ) from error
            self._loaded = (model.eval().requires_grad_(False).to(self.device, self.dtype), tokenize)
        return self._loaded

    def preprocess(self, images: Tensor, model: Any) -> Tensor:
        """hpsv2's ``preprocess_val`` on tensors: longer side → image size, pad with 0, normalise."""
        size = model.visual.image_size
        size = size[0] if isinstance(size, tuple | list) else size
        mean = getattr(model.visual, "image_mean", None) or OPENAI_CLIP_MEAN
        std = getattr(model.visual, "image_std", None) or OPENAI_CLIP_STD
        return normalize(resize_longest_and_pad(images.float(), int(size), fill=0.0), mean, std)

    def __call__(self, images: Tensor, prompts: Sequence[Prompt]) -> Tensor:
        check_batch(self.spec.name, images, prompts)
        model, tokenize = self.load()
        out = []
        with grad_context(images):
            for part in chunks(images.shape[0], self.batch_size):
                pixels = self.preprocess(images[part].to(self.device), model).to(self.dtype)
                tokens = tokenize([p.text for p in prompts[part]]).to(self.device)
                img = model.encode_image(pixels, normalize=True).float()
                txt = model.encode_text(tokens, normalize=True).float()
                out.append((img * txt).sum(dim=-1))
        return torch.cat(out).float().cpu()
