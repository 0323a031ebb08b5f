"""Reward registry: one line per reward (``name → "module:factory"``), imported lazily."""

from harness.registry import Registry

REWARDS: Registry = Registry("reward")
REWARDS.add(
    "shapes_geneval", "rewards.shapes:ShapesGenEval", "GenEval rules on the shapes world (partial credit by default)"
)
REWARDS.add(
    "ocr", "rewards.ocr:OCRReward", "FlowGRPO OCR reward (quoted text vs OCR, capped Levenshtein); RapidOCR by default"
)
REWARDS.add(
    "remote", "rewards.server:RemoteReward", "a reward served by `diffrl serve-reward` in another process or host"
)
REWARDS.add(
    "pickscore", "rewards.pickscore:PickScore", "PickScore_v1 logit_scale*cos/26 (FlowGRPO scale; tables show x26)"
)
REWARDS.add("hpsv2", "rewards.hpsv2:HPSv2", "HPSv2.1 raw cosine (open_clip ViT-H-14 + HPS_v2.1_compressed.pt)")
REWARDS.add("clipscore", "rewards.clipscore:CLIPScore", "CLIP ViT-L/14 cosine (DiffusionNFT clipscore: logits/100)")
REWARDS.add("aesthetic", "rewards.aesthetic:Aesthetic", "LAION improved aesthetic predictor on CLIP ViT-L/14, raw 1-10")
REWARDS.add(
    "imagereward", "rewards.imagereward:ImageReward", "ImageReward v1.0 (BLIP + MLP, z-scored), on transformers' BLIP"
)
REWARDS.add(
    "geneval",
    "rewards.geneval_reward:GenEvalReward",
    "GenEval: Mask2Former (mmdet or hf) + CLIP colours + official rules; FlowGRPO partial credit by default",
)
REWARDS.add(
    "random_control",
    "rewards.random_control:RandomControl",
    "prompt-blind Bernoulli(p) per image (a hash of its bytes): the control that tells learning from drift",
)
REWARDS.add(
    "shapes_classifier",
    "rewards.shapes_classifier:ShapesClassifierReward",
    "differentiable proxy of shapes_geneval's partial credit: a small CNN + soft GenEval rules, in [0, 1]",
)
