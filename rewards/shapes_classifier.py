"""A differentiable proxy of the shapes world's GenEval judge: a small CNN plus a soft partial-credit score.

This is a learned stand-in for the judge, not the judge. The judge (:mod:`rewards.shapes`: uint8
rounding, nearest-palette colours, connected components, template IoU, then the rules of
:mod:`harness.geneval_rules`) has no gradient. Here a CenterNet-style CNN (113k parameters, 0.45 MB)
reads the image plus a softened copy of the detector's first step (per-pixel nearest-palette
membership within ``MAX_COLOR_DISTANCE``) and predicts, on an 8×8 grid of 4-pixel cells and per
shape class, the logit that a detection's box centre lies in the cell (at the 0.3 and at the 0.9
score threshold), that detection's centre and extent, and per cell its colour. From these:

* count distributions 0..8+ per class and threshold: the Poisson-binomial law of the cells;
* colour, centre and extent of a class's detection given that there is exactly one: the cells
  weighted by P(only cell j) ∝ p_j/(1 − p_j), i.e. a softmax of the logits over cells.

:func:`expected_partial_score` turns these into the expectation of FlowGRPO's partial-credit score
(``reward_server/gen_eval.py:evaluate_reward``, as :func:`harness.geneval_rules.judge_partial`), clause by
clause: count terms ``1 − |count − n|/count`` (0.9 threshold for the counting task), colour terms
``P(n = 1)·P(colour | n = 1)``, the position clause (with the ``flowgrpo`` variant's stray 1.0) through
:func:`soft_relation`, GenEval's ``relative_position`` with ``max(·, 0)`` softened to a softplus and
the ``> 0.5`` tests to sigmoids at a temperature fitted after training; the two classes of a
position prompt are taken as independent. Fed the rule detector's own one-hot output at temperature
0 it reproduces the rule score exactly (tested). Deviation: each count term is clipped at 0 (the
rule's reaches −14 with clutter), so the score lies in [0, 1]. Gradients reach the pixels: no
detach, no no_grad, no uint8 rounding in the forward.

Training (:mod:`harness.train_classifier`): labels are the rule detector's output on each
training image, so the proxy learns the detector, not the prompt: renders of grammar prompts,
edited renders, random clutter, and samples of the committed base model, with flips, composites,
noise, blur and colour gains. The committed asset ``benchmarks/shapes/assets/classifier/`` was made by
``OMP_NUM_THREADS=1 diffrl pretrain-reward --out benchmarks/shapes/assets/classifier`` (352 s on the
2-core CPU machine, 1 thread), which also wrote ``agreement.md`` beside it
(``diffrl pretrain-reward --measure-only`` or ``python -m harness.train_classifier --measure``
remeasure it). Agreement with ``ShapesGenEval(judgement="score")``; "clipped" is the rule score with
the proxy's clipped count terms, the proxy's exact target:

=================================  =====  =======  =====  ==========  ============  =========  ===========
set (384 images each)              rule   clipped  soft   r vs rule   MAD vs rule   r vs clip  MAD vs clip
=================================  =====  =======  =====  ==========  ============  =========  ===========
renders (own or another prompt)    0.639  0.639    0.608  0.994       0.037         0.994      0.037
base model samples, CFG 1          -0.100 0.184    0.184  0.470       0.418         0.640      0.167
base model samples, CFG 4.5        -0.359 0.158    0.162  0.317       0.642         0.495      0.172
=================================  =====  =======  =====  ==========  ============  =========  ===========

Per task on the base samples (CFG 1), r vs the clipped rule: counting 0.90, colors 0.81, single_object
0.57, two_object 0.47, position 0.44, color_attr 0.04; on renders every task has r ≥ 0.98. On model
samples the proxy is right in mean but unsure per image (its count accuracy on cluttered samples is
about 60%), so its scores are shrunk towards the mean: per-task standard deviations are 1.3–3.1× smaller
than the clipped rule's, most for color_attr and position, where it barely ranks the samples.
The gradient is useful, not only non-zero: 60 Adam steps (lr 0.01) of pixel-space ascent on the
proxy raise the base samples' rule partial score from −0.100 to 0.413 and their GenEval accuracy
from 0.273 to 0.398 (mean |Δpixel| 0.045), while the proxy itself goes 0.184 → 0.809: like any
learned reward it can be over-optimised, so evaluate with the rule judge.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from harness.checksums import ChecksumError, verify_checksum
from harness.geneval_rules import ScoreVariant
from harness.shapes_world.detect import MAX_COLOR_DISTANCE
from harness.shapes_world.world import BACKGROUND, COLORS, IMAGE_SIZE, SHAPES, validate_shapes_metadata
from harness.types import Prompt, RewardSpec, check_images
from harness.validation import check_at_least, check_non_negative, check_positive

CLASSIFIER_CHECKPOINT = Path(__file__).resolve().parents[1] / "benchmarks" / "shapes" / "assets" / "classifier"
ASSET_FILES = ("config.json", "model.safetensors", "model.safetensors.sha256")
PALETTE = torch.tensor([BACKGROUND, *COLORS.values()], dtype=torch.float32)  # as detect.py: 0 = background
COLORS_INDEX = {color: i for i, color in enumerate(COLORS)}
RETRAIN_HINT = "retrain it with 'diffrl pretrain-reward --out DIR' (or restore the committed asset with git)"


@dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    """Architecture of :class:`ShapesClassifier` (saved in ``config.json``)."""

    widths: tuple[int, int, int] = (16, 32, 64)  # 32×32, 16×16, 8×8 feature maps (2, 2 and 3 convolutions)
    palette_temperature: float = 8.0  # soft nearest-palette-colour input channels (0–255 RGB distance units)
    max_count: int = 8  # count bins 0..max_count; the last one is "at least max_count"
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)

    def __post_init__(self) -> None:
        widths = self.widths
        if not (
            isinstance(widths, tuple) and len(widths) == 3 and all(_is_int(w) and w % 4 == 0 and w > 0 for w in widths)
        ):
            raise ValueError(
                f"widths must be 3 positive integers divisible by 4 (GroupNorm's 4 groups), got {widths!r}"
            )
        check_positive(self, "palette_temperature")
        check_at_least(self, 1, "max_count")
        for name in ("shapes", "colors"):
            names = getattr(self, name)
            if not (isinstance(names, tuple) and names and all(isinstance(n, str) for n in names)):
                raise ValueError(f"{name} must be a non-empty tuple of names, got {names!r}")


@dataclass(frozen=True, kw_only=True)
class RelationCalibration:
    """Soft ``relative_position``: softplus sharpness (1/px) and the sigmoid temperature, fitted after training."""

    sharpness: float = 2.0
    temperature: float = 0.1  # 0: the exact rule (hard thresholds)

    def __post_init__(self) -> None:
        check_positive(self, "sharpness")
        check_non_negative(self, "temperature")


@dataclass(frozen=True)
class Beliefs:
    """What the rules need per image; S shapes, K+1 count bins, C colours."""

    count_loose: Tensor  # (B, S, K+1), detections with score > 0.3
    count_tight: Tensor  # (B, S, K+1), detections with score > 0.9 (the counting task)
    color: Tensor  # (B, S, C), colour of the detection given exactly one loose detection
    centre: Tensor  # (B, S, 2), box centre (x, y) in pixels, given exactly one loose detection
    extent: Tensor  # (B, S, 2), box width and height in pixels, given exactly one loose detection


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    # GroupNorm, not BatchNorm: an image's score must not depend on the rest of its batch, in any mode.
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(4, c_out), nn.GELU())


def palette_membership(images: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """The detector's first step, softened: per pixel, P(nearest palette colour is k and within
    ``MAX_COLOR_DISTANCE``) for background + each colour (B, 7, H, W), and P(unassigned) (B, 1, H, W)."""
    difference = images[:, None] * 255 - PALETTE.to(images)[None, :, :, None, None]  # (B, 7, 3, H, W)
    distance = torch.sqrt(difference.pow(2).sum(2) + 1e-6)  # the epsilon keeps the gradient finite at 0
    nearest = (-distance / temperature).softmax(1)
    within = torch.sigmoid((MAX_COLOR_DISTANCE - distance) / temperature)
    membership = nearest * within
    return membership, 1 - membership.sum(1, keepdim=True)


def count_distribution(p: Tensor, max_count: int) -> Tensor:
    """Poisson-binomial law of the number of successes among independent cells: (..., N) → (..., K+1).

    Pairwise products of the cells' generating polynomials ``(1 − p) + p·z``, truncated so that
    the last bin holds "at least K"; N must be a power of two (log2 N batched levels).
    """
    bins = max_count + 1
    poly = torch.stack([1 - p, p, *[torch.zeros_like(p)] * (bins - 2)], dim=-1)  # (..., N, K+1)
    i = torch.arange(bins)
    fold = F.one_hot((i[:, None] + i[None]).clamp(max=max_count), bins).to(p)  # (K+1, K+1, K+1)
    while poly.shape[-2] > 1:
        if poly.shape[-2] % 2:
            raise ValueError(f"count_distribution needs a power-of-two number of cells, got {p.shape[-1]}")
        poly = torch.einsum("...i,...j,ijk->...k", poly[..., 0::2, :], poly[..., 1::2, :], fold)
    return poly[..., 0, :]


class ShapesClassifier(nn.Module):
    """A CenterNet-style CNN on an 8×8 grid of 4-pixel cells: per cell and shape class, the logit that a
    detection's box centre lies in the cell (at the 0.3 and the 0.9 score thresholds), its centre offset
    and box extent; per cell, the colour of the detection there."""

    cell_centres: Tensor  # (2, 8, 8) pixel (x, y) of each cell's centre

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w1, w2, w3 = cfg.widths
        self.features = nn.Sequential(
            _conv(4 + len(PALETTE), w1), _conv(w1, w1),
            _conv(w1, w2, stride=2), _conv(w2, w2),
            _conv(w2, w3, stride=2), _conv(w3, w3), _conv(w3, w3),
        )  # fmt: skip
        self.head = nn.Conv2d(w3, 6 * len(cfg.shapes) + len(cfg.colors), 1)
        with torch.no_grad():  # prior p = 0.02 per cell (RetinaNet's focal-loss init), so that no cell starts at 0.5
            self.head.bias[: 2 * len(cfg.shapes)].fill_(-4.0)  # type: ignore[index]
        cell = IMAGE_SIZE // 8
        grid = (torch.arange(8, dtype=torch.float32) + 0.5) * cell
        self.register_buffer("cell_centres", torch.stack(torch.meshgrid(grid, grid, indexing="xy")), persistent=False)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Per-cell outputs for images (B, 3, 32, 32) in [0, 1], flattened over the 64 cells."""
        n = len(self.cfg.shapes)
        inputs = torch.cat([images * 2 - 1, *palette_membership(images, self.cfg.palette_temperature)], dim=1)
        out = self.head(self.features(inputs)).flatten(2)  # (B, 6S + C, 64)
        batch = out.shape[0]
        return {
            "loose": out[:, :n],  # (B, S, 64) logits
            "tight": out[:, n : 2 * n],  # (B, S, 64) logits
            "centre": out[:, 2 * n : 4 * n].view(batch, n, 2, -1) + self.cell_centres.flatten(1),  # (B, S, 2, 64) px
            "extent": F.softplus(out[:, 4 * n : 6 * n].view(batch, n, 2, -1) + 9.0),  # ≈ 9 px, the renderer's mean
            "color": out[:, 6 * n :],  # (B, C, 64) logits
        }

    def beliefs(self, images: Tensor) -> Beliefs:
        """Probabilities and soft geometry, differentiable in the images."""
        return self.to_beliefs(self.forward(images))

    def to_beliefs(self, cells: dict[str, Tensor]) -> Beliefs:
        """Counts from the per-cell probabilities; colour and geometry given exactly one detection.

        With independent cells, P(the one detection is in cell j | exactly one) ∝ p_j / (1 − p_j)
        = exp(logit_j), so the conditional weights are a softmax of the loose logits over cells.
        """
        weights = cells["loose"].softmax(-1)  # (B, S, 64)
        return Beliefs(
            count_loose=count_distribution(torch.sigmoid(cells["loose"]), self.cfg.max_count),
            count_tight=count_distribution(torch.sigmoid(cells["tight"]), self.cfg.max_count),
            color=torch.einsum("bsj,bcj->bsc", weights, cells["color"].softmax(1)),
            centre=torch.einsum("bsj,bsdj->bsd", weights, cells["centre"]),
            extent=torch.einsum("bsj,bsdj->bsd", weights, cells["extent"]),
        )


def soft_relation(
    centre_a: Tensor, extent_a: Tensor, centre_b: Tensor, extent_b: Tensor, relation: str, calib: RelationCalibration
) -> Tensor:
    """P(``relation`` ∈ relative_position(A, B)), GenEval's rule smoothed; ``temperature == 0`` gives the rule."""
    offset = centre_a - centre_b
    margin = 0.1 * (extent_a + extent_b)  # GenEval's threshold × the summed extents
    if calib.temperature == 0:
        shrunk = torch.sign(offset) * F.relu(offset.abs() - margin)
    else:
        shrunk = torch.sign(offset) * F.softplus(calib.sharpness * (offset.abs() - margin)) / calib.sharpness
    d = shrunk / torch.sqrt((offset**2).sum(-1, keepdim=True) + 1e-6)
    axis, sign = {"left of": (0, -1.0), "right of": (0, 1.0), "above": (1, -1.0), "below": (1, 1.0)}[relation]
    z = sign * d[..., axis] - 0.5
    return (z > 0).to(z.dtype) if calib.temperature == 0 else torch.sigmoid(z / calib.temperature)


def _count_term(p: Tensor, count: int) -> Tensor:
    """E[max(0, 1 − |count − n|/count)] under the count distribution ``p`` (deviation: clipped at 0)."""
    n = torch.arange(p.shape[-1], dtype=p.dtype, device=p.device)
    return (p * (1 - (n - count).abs() / count).clamp(min=0)).sum(-1)


def expected_partial_score(
    beliefs: Beliefs, index: int, metadata: Mapping[str, Any], variant: ScoreVariant, calib: RelationCalibration
) -> Tensor:
    """E[FlowGRPO partial-credit score] of image ``index`` (:func:`harness.geneval_rules.judge_partial`, clipped terms)."""
    tag, include = metadata["tag"], metadata["include"]
    counts = beliefs.count_tight if tag == "counting" else beliefs.count_loose
    cls = [SHAPES.index(clause["class"]) for clause in include]
    if tag == "position":  # include = [target B, subject A at [relation, 0]]; every count is 1
        p_b, p_a = counts[index, cls[0]], counts[index, cls[1]]
        both = p_b[1] * p_a[1]  # the two classes taken as independent
        holds = soft_relation(
            beliefs.centre[index, cls[1]], beliefs.extent[index, cls[1]],
            beliefs.centre[index, cls[0]], beliefs.extent[index, cls[0]], include[1]["position"][0], calib,
        )  # fmt: skip
        violated = 0.75 if variant == "flowgrpo" else 2 / 3  # flowgrpo: terms (1, 1, 0, 1.0); corrected: (1, 1, 0)
        return (_count_term(p_a, 1) + _count_term(p_b, 1)) / 3 - both * 2 / 3 + both * (holds + violated * (1 - holds))
    terms = []
    for clause, k in zip(include, cls, strict=True):
        terms.append(_count_term(counts[index, k], clause["count"]))
        if "color" in clause:  # the world's colour clauses have count 1: P(n = 1)·P(that one has the colour)
            terms.append(counts[index, k, 1] * beliefs.color[index, k, COLORS_INDEX[clause["color"]]])
    if variant == "corrected":
        for clause in metadata.get("exclude", []):
            terms.append(1 - counts[index, SHAPES.index(clause["class"]), clause["count"] :].sum())
    return torch.stack(terms).mean()


def save_classifier(model: ShapesClassifier, directory: Path, extra: Mapping[str, Any]) -> Path:
    """Write config.json (architecture + ``extra``), model.safetensors and its sha256."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps({"architecture": asdict(model.cfg), **extra}, indent=2) + "\n")
    checksum = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    (directory / "model.safetensors.sha256").write_text(f"{checksum}  model.safetensors\n")
    return directory


def load_classifier(directory: Path | None = None) -> tuple[ShapesClassifier, RelationCalibration, str]:
    """Load a classifier folder (default: the committed asset), sha256-verified; returns (model, calibration, sha256)."""
    directory = Path(directory) if directory is not None else CLASSIFIER_CHECKPOINT
    for name in ASSET_FILES:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: a shapes classifier folder holds "
                                    f"{', '.join(ASSET_FILES)}; {RETRAIN_HINT}")  # fmt: skip
    try:
        verify_checksum(directory)
    except ChecksumError as error:
        raise ChecksumError(f"{error}: the weights are corrupted or were replaced; {RETRAIN_HINT}") from None
    meta = json.loads((directory / "config.json").read_text())
    arch = meta["architecture"]
    cfg = ClassifierConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()}  # type: ignore[arg-type]
    )  # JSON lists back to tuples; an unknown key is a TypeError
    if cfg.shapes != SHAPES or cfg.colors != tuple(COLORS):
        raise ValueError(f"{directory}/config.json was trained for shapes {cfg.shapes} and colours {cfg.colors}, "
                         f"but the world has {SHAPES} and {tuple(COLORS)}; {RETRAIN_HINT}")  # fmt: skip
    model = ShapesClassifier(cfg)
    model.load_state_dict(load_file(directory / "model.safetensors"))
    model.eval().requires_grad_(False)
    sha = (directory / "model.safetensors.sha256").read_text().split()[0]
    return model, RelationCalibration(**meta.get("relation", {})), sha


class ShapesClassifierReward:
    """Soft GenEval partial credit on the shapes world from a learned classifier; differentiable in the pixels."""

    def __init__(self, path: str | Path | None = None, score_variant: ScoreVariant = "flowgrpo") -> None:
        if score_variant not in ("flowgrpo", "corrected"):
            raise ValueError(f"score_variant must be 'flowgrpo' or 'corrected', got {score_variant!r}")
        self.score_variant = score_variant
        self.model, self.calibration, sha = load_classifier(Path(path) if path is not None else None)
        self.spec = RewardSpec(
            name="shapes_classifier",
            version=f"1/{score_variant}/{sha[:12]}",
            description="learned proxy of shapes_geneval's partial-credit score (CNN + soft rules), in [0, 1]",
            value_range=(0.0, 1.0),
            differentiable=True,
        )

    def __call__(self, images: Tensor, prompts: Sequence[Prompt]) -> Tensor:
        check_images(self.spec.name, images)  # RewardError: not (B, 3, H, W) floats, NaN, outside [0, 1]
        expected = (3, IMAGE_SIZE, IMAGE_SIZE)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}"
            )
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        for prompt in prompts:
            validate_shapes_metadata(prompt.metadata)
        if not prompts:
            return images.new_zeros(0, dtype=torch.float32)
        if next(self.model.parameters()).device != images.device:
            self.model.to(images.device)
        beliefs = self.model.beliefs(images.float())
        scores = [
            expected_partial_score(beliefs, i, p.metadata, self.score_variant, self.calibration)
            for i, p in enumerate(prompts)
        ]
        return torch.stack(scores).float()
