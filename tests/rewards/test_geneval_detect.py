"""GenEval detectors: boxes from masks, Mask2Former post-processing by hand, label mapping, the tiny
random ``hf`` model end to end, and the ``mmdet`` backend's conversion and wiring on made-up outputs."""

from __future__ import annotations

import importlib.util
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from harness.types import RewardError
from rewards.geneval_detect import make_detector, masks_to_boxes, mmdet_backend
from rewards.geneval_detect.base import group_by_class
from rewards.geneval_detect.hf_backend import HFMask2FormerDetector, check_label_map, mask2former_instances
from rewards.geneval_detect.mmdet_backend import (
    MMDetMask2FormerDetector,
    mmdet2_result_to_detections,
    mmdet3_result_to_detections,
)
from tests.conftest import SHARED_DATA
from tests.rewards.geneval_fakes import coco_id2label, save_tiny_mask2former


@pytest.fixture
def class_names(shared_data):
    return (shared_data / "geneval" / "object_names.txt").read_text().splitlines()


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --- boxes, thresholds, labels ---------------------------------------------------------------------


def test_masks_to_boxes_is_tight_with_exclusive_max_and_zero_for_empty():
    masks = torch.zeros((2, 6, 8), dtype=torch.bool)
    masks[0, 2:5, 3:7] = True  # rows 2..4, cols 3..6
    masks[0, 4, 1] = True  # a stray pixel widens the box to col 1
    assert masks_to_boxes(masks).tolist() == [[1.0, 2.0, 7.0, 5.0], [0.0, 0.0, 0.0, 0.0]]


def test_grouping_keeps_scores_strictly_above_min_score_and_maps_labels_by_index(class_names):
    boxes = [[0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3]]
    found = group_by_class([0, 2, 2], boxes, [0.3, 0.31, 0.9], None, class_names, min_score=0.3, backend="t")
    assert list(found) == ["car"] and [i.score for i in found["car"]] == [0.31, 0.9]
    with pytest.raises(RewardError, match="label 80"):
        group_by_class([80], boxes[:1], [0.5], None, class_names, 0.0, "t")
    with pytest.raises(RewardError, match="non-finite"):
        group_by_class([0], boxes[:1], [float("nan")], None, class_names, 0.0, "t")


def test_label_map_accepts_coco_names_and_rejects_wrong_order(class_names):
    id2label = coco_id2label(class_names)
    assert id2label[64] == "mouse" and class_names[64] == "computer mouse"
    check_label_map(id2label, class_names)
    check_label_map({str(k): v for k, v in id2label.items()}, class_names)  # JSON configs have string keys
    swapped = {**id2label, 0: "bicycle", 1: "person"}
    with pytest.raises(RewardError, match="0: 'bicycle' \\(expected 'person'\\); 1: 'person'"):
        check_label_map(swapped, class_names)
    with pytest.raises(RewardError, match="has 81 labels"):
        check_label_map({**id2label, 80: "background"}, class_names)


# --- Mask2Former post-processing on fixed logits ---------------------------------------------------


def class_logits(*probabilities):
    """Logits whose softmax is exactly the given per-query probabilities (last = no object)."""
    return torch.tensor(probabilities, dtype=torch.float64).log().float()


def test_mask2former_scores_are_class_prob_times_mask_score_top_k_over_query_class_pairs():
    logits = class_logits([0.6, 0.1, 0.1, 0.2], [0.05, 0.7, 0.05, 0.2])  # 2 queries, 3 classes
    masks = torch.full((2, 4, 4), -3.0)
    masks[0, 1:3, 0:2] = 2.0
    masks[1, 0, 3] = 1.0
    pred = mask2former_instances(logits, masks, (4, 4), (4, 4), (4, 4), max_per_image=2)
    assert pred.labels.tolist() == [1, 0]  # (query 1, class 1) 0.7 beats (query 0, class 0) 0.6
    assert pred.scores.tolist() == pytest.approx([0.7 * sigmoid(1.0), 0.6 * sigmoid(2.0)], rel=1e-5)
    assert pred.boxes.tolist() == [[3, 0, 4, 1], [0, 1, 2, 3]]
    assert pred.masks.dtype == torch.bool and pred.masks.shape == (2, 4, 4)
    # No threshold is applied here: all (query, class) pairs up to max_per_image come back.
    assert len(mask2former_instances(logits, masks, (4, 4), (4, 4), (4, 4), max_per_image=100).scores) == 6


def test_mask2former_masks_are_cropped_to_the_valid_region_then_resized_before_binarising():
    logits = class_logits([0.9, 0.05, 0.05], [0.9, 0.05, 0.05])
    masks = torch.full((2, 4, 6), -3.0)  # padded input 4×6, the image fills the left 4×4
    masks[0, 1:3, 0:2] = 2.0
    masks[1, :, 4:] = 5.0  # only in the padding
    pred = mask2former_instances(logits, masks, (4, 6), (4, 4), (8, 8), max_per_image=2)
    by_query = {
        round(s, 6): (b, m) for s, b, m in zip(pred.scores.tolist(), pred.boxes.tolist(), pred.masks, strict=True)
    }
    assert pred.masks.shape == (2, 8, 8)
    # Bilinear 4→8 (align_corners=False): along rows [-3, 2, 2, -3] is > 0 on rows 2..5, along cols [2, 2, -3, -3]
    # on cols 0..3; at the corners (2, 3) and (5, 3) the 2-D blend is 0.5625·2 − 0.4375·3 < 0.
    (box, mask), (empty_box, empty_mask) = by_query[max(by_query)], by_query[min(by_query)]
    expected = torch.zeros((8, 8), dtype=torch.bool)
    expected[2:6, 0:4] = True
    expected[2, 3] = expected[5, 3] = False
    assert box == [0, 2, 4, 6] and torch.equal(mask, expected)
    assert min(by_query) == 0.0 and empty_box == [0, 0, 0, 0] and not empty_mask.any()


def test_mask2former_upsamples_low_resolution_mask_logits_to_the_padded_input():
    logits = class_logits([0.8, 0.1, 0.1])
    masks = torch.full((1, 2, 2), -4.0)
    masks[0, 0, 0] = 4.0
    pred = mask2former_instances(logits, masks, (8, 8), (8, 8), (8, 8), max_per_image=1)
    # 2→8 bilinear of [4, -4]: positive on the first 4 of 8 samples.
    assert pred.boxes.tolist() == [[0, 0, 4, 4]]


# --- the hf backend end to end on a tiny random model ----------------------------------------------


@pytest.fixture(scope="module")
def tiny_m2f(tmp_path_factory):
    names = SHARED_DATA / "geneval" / "object_names.txt"
    if not names.is_file():
        pytest.skip(f"reference data not found at {names}")
    return save_tiny_mask2former(tmp_path_factory.mktemp("m2f"), names.read_text().splitlines())


def test_hf_backend_loads_a_saved_model_offline_and_returns_per_class_instances(tiny_m2f, class_names):
    detector = HFMask2FormerDetector(class_names, tiny_m2f, batch_size=2, shortest_edge=64, longest_edge=96)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in [(40, 60, 3), (48, 48, 3), (30, 50, 3)]]
    found = detector.detect(images, min_score=-1.0)
    assert len(found) == 3
    for image, per_class in zip(images, found, strict=True):
        assert set(per_class) <= set(class_names)
        instances = [inst for insts in per_class.values() for inst in insts]
        assert len(instances) == 100  # top 100 of 10 queries × 80 classes, mmdet's max_per_image
        for inst in instances:
            assert inst.mask.dtype == bool and inst.mask.shape == image.shape[:2]
            assert 0.0 <= inst.score <= 1.0
            expected = masks_to_boxes(torch.from_numpy(inst.mask)[None])[0].tolist()
            assert list(inst.box) == expected
    kept = detector.detect(images[:1], min_score=0.3)[0]
    assert all(inst.score > 0.3 for insts in kept.values() for inst in insts)


def test_hf_backend_overrides_the_saved_input_size_with_mmdets(tiny_m2f, class_names):
    assert HFMask2FormerDetector(class_names, tiny_m2f).size == {"shortest_edge": 800, "longest_edge": 1333}
    detector = HFMask2FormerDetector(class_names, tiny_m2f, shortest_edge=64, longest_edge=96)
    inputs = detector.preprocess([np.zeros((40, 60, 3), dtype=np.uint8)])  # saved processor says 384
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 64, 96)
    inputs = detector.preprocess([np.zeros((40, 50, 3), dtype=np.uint8)])  # 64×80, padded to a multiple of 32
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 64, 96) and inputs["pixel_mask"][0].sum() == 64 * 80


def test_hf_rgb_as_bgr_feeds_the_channel_swapped_image(tiny_m2f, class_names):
    image = np.random.default_rng(1).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    kwargs = dict(shortest_edge=64, longest_edge=64)  # 1×1 at stride 32 would break the GroupNorm
    quirk = HFMask2FormerDetector(class_names, tiny_m2f, rgb_as_bgr=True, **kwargs).detect([image], -1.0)[0]
    plain = HFMask2FormerDetector(class_names, tiny_m2f, **kwargs)
    swapped, same = plain.detect([np.ascontiguousarray(image[:, :, ::-1])], -1.0)[0], plain.detect([image], -1.0)[0]

    def scores(found):
        return sorted(inst.score for insts in found.values() for inst in insts)

    assert scores(quirk) == scores(swapped) and scores(quirk) != scores(same)


def test_hf_backend_rejects_a_checkpoint_with_another_label_order(tmp_path, class_names):
    id2label = {**coco_id2label(class_names), 2: "motorcycle", 3: "car"}
    path = save_tiny_mask2former(tmp_path, class_names, id2label)
    detector = make_detector("hf", class_names, detector_path=path)
    with pytest.raises(RewardError, match="2: 'motorcycle' \\(expected 'car'\\)"):
        detector.detect([np.zeros((64, 64, 3), dtype=np.uint8)])


def test_detector_factory_validates_its_arguments(class_names):
    with pytest.raises(ValueError, match="unknown GenEval detector backend 'yolo'"):
        make_detector("yolo", class_names)
    with pytest.raises(ValueError, match="'mmdet' backend only"):
        make_detector("hf", class_names, detector_config="x.py")
    detector = make_detector("hf", class_names)
    assert detector.model_path == "facebook/mask2former-swin-small-coco-instance"
    with pytest.raises(ValueError, match="RGB uint8"):
        detector.detect([np.zeros((8, 8, 3), dtype=np.float32)])


# --- the mmdet backend: post-processing and wiring on made-up outputs ------------------------------


def mmdet_style_result(class_names, size=(6, 8)):
    """(bbox_results, segm_results): 80 per-class arrays; car (2) has two objects, dog (16) one."""
    bboxes = [np.zeros((0, 5), dtype=np.float32) for _ in class_names]
    segms = [[] for _ in class_names]
    bboxes[2] = np.array([[1, 1, 4, 3, 0.95], [0, 0, 2, 2, 0.2]], dtype=np.float32)
    bboxes[16] = np.array([[2, 0, 8, 6, 0.5]], dtype=np.float32)
    for c in (2, 16):
        for x1, y1, x2, y2, _ in bboxes[c]:
            mask = np.zeros(size, dtype=bool)
            mask[int(y1) : int(y2), int(x1) : int(x2)] = True
            segms[c].append(mask)
    return bboxes, segms


def test_mmdet2_per_class_results_become_named_instances(class_names):
    result = mmdet_style_result(class_names)
    found = mmdet2_result_to_detections(result, class_names, min_score=0.3)
    assert sorted(found) == ["car", "dog"] and len(found["car"]) == 1
    car = found["car"][0]
    assert car.box == (1.0, 1.0, 4.0, 3.0) and car.score == pytest.approx(0.95)
    assert car.mask.dtype == bool and car.mask.sum() == 6 and car.mask[1:3, 1:4].all()
    assert len(mmdet2_result_to_detections(result, class_names)["car"]) == 2  # default min_score 0
    bbox_only = mmdet2_result_to_detections(result[0], class_names)
    assert bbox_only["dog"][0].mask is None
    with_mask_scores = mmdet2_result_to_detections((result[0], (result[1], None)), class_names)
    assert with_mask_scores["dog"][0].mask.shape == (6, 8)


def test_mmdet2_malformed_results_raise(class_names):
    bboxes, segms = mmdet_style_result(class_names)
    with pytest.raises(RewardError, match="79 per-class results, expected 80"):
        mmdet2_result_to_detections((bboxes[:79], segms[:79]), class_names)
    segms[2] = segms[2][:1]
    with pytest.raises(RewardError, match="2 boxes but 1 masks for class 'car'"):
        mmdet2_result_to_detections((bboxes, segms), class_names)


def test_mmdet3_pred_instances_are_regrouped_per_class(class_names):
    masks = torch.zeros((2, 4, 4), dtype=torch.bool)
    masks[1, :2, :2] = True
    sample = SimpleNamespace(
        pred_instances=SimpleNamespace(
            bboxes=torch.tensor([[0.0, 0, 4, 4], [0, 0, 2, 2]]),
            scores=torch.tensor([0.8, 0.4]),
            labels=torch.tensor([16, 16]),
            masks=masks,
        )
    )
    found = mmdet2_result_to_detections(sample, class_names)
    assert [i.score for i in found["dog"]] == pytest.approx([0.8, 0.4]) and found["dog"][1].mask.sum() == 4
    assert mmdet3_result_to_detections(sample.pred_instances, class_names, min_score=0.5)["dog"][0].box == (0, 0, 4, 4)


@pytest.mark.skipif(importlib.util.find_spec("mmdet") is not None, reason="mmdet is installed here")
def test_mmdet_backend_without_the_extra_names_it(class_names):
    with pytest.raises(
        RewardError, match=r"'mmdet' extra: `make mmdet`.*--no-build-isolation mmcv==1\.7\.2 mmdet==2\.28\.2"
    ):
        MMDetMask2FormerDetector(class_names, "ckpt.pth")
    with pytest.raises(RewardError, match=r"needs mmdet 2\.x and mmcv 1\.x; install them with the 'mmdet' extra"):
        mmdet_backend.import_mmdet()


def test_mmdet_backend_feeds_bgr_batches_and_converts_results(tmp_path, class_names, monkeypatch):
    seen: dict[str, list] = {"inputs": [], "init": []}

    class FakeConfig:
        @staticmethod
        def fromfile(path):
            seen["config"] = path
            return SimpleNamespace(model=SimpleNamespace(backbone=SimpleNamespace(init_cfg={"type": "Pretrained"})))

    def init_detector(config, checkpoint, device):
        seen["init"].append((config.model.backbone.init_cfg, checkpoint, device))
        return SimpleNamespace(CLASSES=tuple(class_names))

    def inference_detector(model, images):
        seen["inputs"].append([im.copy() for im in images])
        return [mmdet_style_result(class_names) for _ in images]

    monkeypatch.setattr(mmdet_backend, "package_version", lambda *_: "2.28.2")
    monkeypatch.setattr(mmdet_backend, "import_mmdet", lambda: (FakeConfig, init_detector, inference_detector))
    (tmp_path / mmdet_backend.MMDET_CHECKPOINT).write_bytes(b"weights")
    (tmp_path / "cfg.py").write_text("")
    image = np.zeros((6, 8, 3), dtype=np.uint8)
    image[..., 0] = 255  # pure red

    detector = MMDetMask2FormerDetector(class_names, tmp_path, tmp_path / "cfg.py", batch_size=2)
    assert detector.version == f"mmdet-2.28.2:{mmdet_backend.MMDET_CHECKPOINT}"
    found = detector.detect([image] * 3, min_score=0.3)
    assert [len(batch) for batch in seen["inputs"]] == [2, 1]
    assert seen["inputs"][0][0][0, 0].tolist() == [0, 0, 255]  # handed to mmdet as BGR
    assert seen["init"] == [(None, str(tmp_path / mmdet_backend.MMDET_CHECKPOINT), "cpu")]
    assert len(found) == 3 and sorted(found[0]) == ["car", "dog"]

    quirk = MMDetMask2FormerDetector(
        class_names, tmp_path / mmdet_backend.MMDET_CHECKPOINT, tmp_path / "cfg.py", rgb_as_bgr=True
    )
    quirk.detect([image])
    assert seen["inputs"][-1][0][0, 0].tolist() == [255, 0, 0]  # FlowGRPO's quirk: RGB handed over as is

    with pytest.raises(RewardError, match="needs detector_path"):
        MMDetMask2FormerDetector(class_names, None)
    missing = MMDetMask2FormerDetector(class_names, tmp_path / "nope.pth", tmp_path / "cfg.py")
    with pytest.raises(RewardError, match="nope.pth does not exist"):
        missing.detect([image])


@pytest.mark.slow
def test_mmdet_backend_runs_geneval_config_with_a_random_checkpoint(tmp_path, class_names):
    """Real mmdet 2.x (extra ``mmdet``): the shipped GenEval config, a random-weight checkpoint, one image."""
    pytest.importorskip("mmdet", reason="needs the 'mmdet' extra")
    config_cls, init_detector, inference_detector = mmdet_backend.import_mmdet()
    config = config_cls.fromfile(str(mmdet_backend.default_config()))
    config.model.backbone.init_cfg = None
    torch.manual_seed(0)
    model = init_detector(config, None, device="cpu")
    checkpoint = tmp_path / mmdet_backend.MMDET_CHECKPOINT
    coco = tuple(coco_id2label(class_names).values())
    torch.save({"state_dict": model.state_dict(), "meta": {"CLASSES": coco}}, checkpoint)
    image = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)

    detector = make_detector("mmdet", class_names, detector_path=tmp_path)
    found = detector.detect([image], min_score=-1.0)[0]
    instances = [inst for insts in found.values() for inst in insts]
    assert len(instances) == 100  # max_per_image of the config
    for inst in instances:
        assert inst.mask.shape == (48, 64) and inst.mask.dtype == bool and 0.0 <= inst.score <= 1.0
        if inst.mask.any():
            assert list(inst.box) == masks_to_boxes(torch.from_numpy(inst.mask)[None])[0].tolist()
    # The same weights straight through mmdet, on the BGR array as GenEval's file loading gives it.
    raw = mmdet2_result_to_detections(inference_detector(detector._model, image[:, :, ::-1].copy()), class_names, -1)
    assert {c: [i.score for i in v] for c, v in raw.items()} == {c: [i.score for i in v] for c, v in found.items()}
