"""The measures that say whether pre-training learnt: zero-shot AUC, class-aware retrieval, phrase sensitivity,
the side of a grounding peak, chance levels, the learning-curve table and the phantom probe's scoring."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from monai_elvis.benchmarks.phantom_probe import median_contrast, phantom_labels, random_affine, side_accuracy
from monai_elvis.engines import ChanceLevelHandler, MetricsHistoryHandler, learning_curve_table
from monai_elvis.metrics import (
    ClassAwareRetrievalMetric,
    GroundingMetric,
    PhraseSensitivityMetric,
    RetrievalRecallMetric,
    ZeroShotClassificationMetric,
    class_precision_at_k,
    class_precision_chance,
    map_correlation,
    peak_side,
    zero_shot_auc,
    zero_shot_scores,
)
from monai_elvis.transforms import ClassNamesToMultiHot, ClassNamesToMultiHotd


def test_zero_shot_auc_of_a_known_ranking():
    # class 0: positives scored 0.9, 0.4; negatives 0.5, 0.1 -> 3 of 4 pairs ordered right: AUC 0.75
    scores = torch.tensor([[0.9, 0.0], [0.4, 1.0], [0.5, 2.0], [0.1, 3.0]])
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]])
    auc = zero_shot_auc(scores, labels)
    assert auc[0].item() == pytest.approx(0.75)
    assert auc[1].item() == pytest.approx(1.0)  # both positives above both negatives
    assert math.isnan(zero_shot_auc(scores, torch.ones(4, 2))[0].item())  # one class only: undefined


def test_zero_shot_scores_are_positive_minus_negative_similarity():
    image = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    positive = torch.tensor([[1.0, 0.0]])
    negative = torch.tensor([[0.0, 1.0]])
    assert torch.allclose(zero_shot_scores(image, positive, negative), torch.tensor([[1.0], [-1.0]]))


def test_zero_shot_metric_embeds_prompts_and_scores_per_class():
    eye = torch.eye(4).tolist()
    vectors = {"effusion": eye[0], "no effusion": eye[1], "nodule": eye[2], "no nodule": eye[3]}

    def embed(phrases):
        v = torch.tensor([vectors[p] for p in phrases])
        return {"global": v, "sentence": v}

    prompts = {"effusion": (["effusion"], ["no effusion"]), "nodule": (["nodule"], ["no nodule"])}
    metric = ZeroShotClassificationMetric(embed, prompts, reduction="none")
    # each image says yes or no to each class: effusion only, nodule only, both, neither
    image = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0], [1, 0, 1, 0], [0, 1, 0, 1]])
    labels = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]])
    metric(image[:2], labels[:2])
    metric(image[2:], labels[2:])
    assert torch.allclose(metric.aggregate(), torch.tensor([1.0, 1.0]))
    metric.reset()
    metric(image, 1 - labels)  # every label flipped: the scores now rank them exactly backwards
    assert torch.allclose(metric.aggregate(), torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="multi-hot labels"):
        metric(image, labels[:, :1])


def test_metrics_without_class_labels_report_nan():
    metric = ZeroShotClassificationMetric(lambda p: {"global": torch.ones(len(p), 2)})
    metric(torch.ones(2, 2), None)
    assert math.isnan(metric.aggregate().item())
    retrieval = ClassAwareRetrievalMetric(k=1)
    retrieval((torch.ones(2, 2), torch.ones(2, 2)), None)
    assert math.isnan(retrieval.aggregate().item()) and math.isnan(retrieval.chance())


def test_class_aware_precision_counts_duplicate_reports():
    # pairs 0 and 1 have the same classes; 2 and 3 differ from everything
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [1, 1]])
    image = torch.eye(4)
    # image 0 ranks report 1 first, then 0: both share its classes -> 2/2; image 1 ranks report 2 then 3 -> 0/2;
    # images 2 and 3 rank themselves first and a mismatch second -> 1/2 each
    text = torch.tensor([[0.5, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.9, 0.0, 1.0]])
    text[3, 2] = 0.5  # image 2: itself (1.0), then report 3 (0.5)
    text[2, 3] = 0.4  # image 3: itself (1.0 / norm), then report 2
    p = class_precision_at_k(image, text, labels, k=2)
    sim = torch.nn.functional.normalize(image, dim=1) @ torch.nn.functional.normalize(text, dim=1).T
    same = (labels[:, None] == labels[None]).all(-1)
    expected = same.gather(1, sim.topk(2, dim=1).indices).float().mean()
    assert p.item() == pytest.approx(expected.item())
    assert p.item() == pytest.approx((2 + 0 + 1 + 1) / 8)
    # chance: each item shares its set with itself and pair 0-1 with each other -> (2 + 2 + 1 + 1) / 16
    assert class_precision_chance(labels).item() == pytest.approx(6 / 16)
    metric = ClassAwareRetrievalMetric(k=2)
    metric((image, text), labels)
    assert metric.aggregate().item() == pytest.approx(0.5) and metric.chance() == pytest.approx(6 / 16)
    with pytest.raises(ValueError, match="k must be"):
        class_precision_at_k(image, text, labels, k=5)


def test_retrieval_recall_chance_is_k_over_n():
    metric = RetrievalRecallMetric(k=10)
    metric(torch.randn(40, 4), torch.randn(40, 4))
    assert metric.chance() == pytest.approx(0.25)


def test_map_correlation_of_phrase_blind_and_phrase_specific_maps():
    base = torch.tensor([0.0, 1.0, 2.0, 3.0])
    blind = torch.stack([base, 2 * base + 1, base - 5])[None]  # the same map up to scale and offset
    assert map_correlation(blind).item() == pytest.approx(1.0, abs=1e-6)
    opposite = torch.stack([base, -base])[None]
    assert map_correlation(opposite).item() == pytest.approx(-1.0, abs=1e-6)
    # two orthogonal centred maps and one equal to the first: pairs (1, 0, 1) -> mean 1/3... computed by hand
    a, b = torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.tensor([1.0, 1.0, -1.0, -1.0])
    assert map_correlation(torch.stack([a, b, a])[None]).item() == pytest.approx(1 / 3, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        map_correlation(base[None, None])


def test_phrase_sensitivity_metric_uses_the_phrase_embeddings():
    # regions along x; phrase "a" points along x, phrase "b" along -x: perfectly anti-correlated maps
    def embed(phrases):
        v = torch.tensor([[1.0, 0.0] if p == "a" else [-1.0, 0.0] for p in phrases])
        return {"global": v, "sentence": v}

    metric = PhraseSensitivityMetric(embed, [("a", "left"), ("b", "right")])
    regions = torch.tensor([[[1.0, 0.1], [-1.0, 0.1], [0.5, 1.0], [0.0, 1.0]]])
    metric(regions)
    assert metric.aggregate().item() == pytest.approx(-1.0, abs=1e-6)
    with pytest.raises(ValueError, match="sides"):
        PhraseSensitivityMetric(embed, [("a", "up"), ("b", "")])


def test_peak_side_on_synthetic_maps():
    # maps in MONAI's (x, y) order: 6 wide (first axis), 4 high; the vertical midline splits the first axis
    heat = torch.zeros(4, 1, 6, 4)
    mask = torch.zeros(4, 1, 6, 4)
    heat[0, 0, 5, 1] = 1.0  # peak on the image's right half (x = 5)
    mask[0, 0, 4:6, 0:2] = 1  # box on the right half -> hit
    heat[1, 0, 0, 2] = 1.0  # peak on the left half (x = 0)
    mask[1, 0, 3:5, 1:3] = 1  # box on the right half -> miss
    heat[2, 0, 0, 0] = 1.0
    mask[2, 0, 2:4, 1:3] = 1  # box across the midline (x = 2, 3) -> no side
    heat[3, 0, 1, 3] = 1.0  # peak low on the left (x = 1, y = 3): in the same half as a box in the top left rows
    mask[3, 0, 0:3, 0:1] = 1  # x 0..2, y 0: left half, top row; with (H, W) order it would span the midline
    side = peak_side(heat, mask)
    assert side[0].item() == 1.0 and side[1].item() == 0.0 and math.isnan(side[2].item()) and side[3].item() == 1.0
    # the same maps seen as (H, W) arrays: the sides are those of the other axis, so the answers change
    assert not torch.equal(torch.nan_to_num(peak_side(heat.transpose(-1, -2), mask.transpose(-1, -2)), -1.0),
                           torch.nan_to_num(side, -1.0))  # fmt: skip
    metric = GroundingMetric("side")
    metric(heat[:3], mask[:3])
    assert metric.aggregate().item() == pytest.approx(0.5)  # the NaN item is left out
    assert metric.chance() == 0.5
    odd = torch.zeros(1, 1, 5, 2)
    odd_mask = torch.zeros(1, 1, 5, 2)
    odd[0, 0, 2, 0] = 1.0  # the middle column of an odd width belongs to neither half: a miss
    odd_mask[0, 0, 0:2, :] = 1
    assert peak_side(odd, odd_mask).item() == 0.0


def test_pointing_chance_is_the_share_the_boxes_cover():
    heat = torch.rand(2, 1, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, :2, :2] = 1  # 4 of 16 pixels
    mask[1, 0, :, :2] = 1  # 8 of 16
    metric = GroundingMetric("pointing")
    metric(heat, mask)
    assert metric.chance() == pytest.approx((0.25 + 0.5) / 2)
    metric.reset()
    assert math.isnan(metric.chance())


class _Engine:
    class state:
        metrics: dict = {}
        epoch = 3


def test_chance_levels_and_history_reach_the_files(tmp_path, caplog):
    engine = _Engine()
    engine.state.metrics = {"val_recall_at_10": 0.4, "val_zero_shot_auc": torch.tensor([0.9, 0.7])}
    recall = RetrievalRecallMetric(k=10)
    recall(torch.randn(20, 3), torch.randn(20, 3))
    with caplog.at_level("INFO"):
        ChanceLevelHandler({"val_recall_at_10": recall, "val_zero_shot_auc": 0.5, "absent": 0.1})(engine)
    assert engine.state.metrics["val_recall_at_10_chance"] == pytest.approx(0.5)
    assert engine.state.metrics["val_zero_shot_auc_chance"] == 0.5 and "absent_chance" not in engine.state.metrics
    assert "val_zero_shot_auc 0.800 (chance 0.500)" in caplog.text
    history = tmp_path / "h.jsonl"
    MetricsHistoryHandler(history)(engine)
    engine.state.epoch = 4
    engine.state.metrics = {"val_recall_at_10": 0.6, "val_recall_at_10_chance": 0.5}
    MetricsHistoryHandler(history)(engine)
    rec = [json.loads(line) for line in history.read_text().splitlines()]
    assert rec[0]["epoch"] == 3 and rec[0]["metrics"]["val_zero_shot_auc"] == pytest.approx(0.8)
    table = learning_curve_table(history, {"val_recall_at_10": "R@10"}, {"val_recall_at_10": ">= 0.5"})
    assert table.splitlines() == ["| epoch | R@10 |", "| ---: | ---: |", "| 3 | 0.400 |", "| 4 | 0.600 |",
                                  "| chance | 0.500 |", "| goal | >= 0.5 |"]  # fmt: skip


def test_class_names_to_multi_hot():
    to_hot = ClassNamesToMultiHot(["a", "b", "c"])
    assert to_hot(["c", "a"]).tolist() == [1.0, 0.0, 1.0]
    assert to_hot([]).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"unknown classes \['d'\]"):
        to_hot(["d"])
    d = ClassNamesToMultiHotd("findings", ["a", "b"], "class_label")({"findings": ["b"]})
    assert d["class_label"].tolist() == [0.0, 1.0] and d["findings"] == ["b"]
    with pytest.raises(ValueError, match="findings"):
        ClassNamesToMultiHotd("findings", ["a"])({"findings": ["z"]})


def test_probe_labels_and_side_accuracy(tmp_path):
    studies = {"studies": [
        {"id": "s0", "findings": [{"kind": "effusion", "side": "left"}, {"kind": "cardiomegaly", "side": ""}]},
        {"id": "s1", "findings": [{"kind": "effusion", "side": "right"}, {"kind": "nodule", "side": "right"}]},
        {"id": "s2", "findings": []},
    ]}  # fmt: skip
    (tmp_path / "phantom.json").write_text(json.dumps(studies))
    labels = phantom_labels(tmp_path / "phantom.json")
    presence, side = labels["s0"]
    assert presence.tolist() == [0, 0, 1, 0, 1, 0]  # FINDING_TYPES order: nodule, opacity, effusion, ...
    assert side[2] == 0.0 and np.isnan(side[4]) and np.isnan(side[0])
    assert labels["s1"][1][0] == 1.0 and labels["s2"][0].sum() == 0
    sides = torch.stack([torch.from_numpy(labels[k][1]) for k in ("s0", "s1", "s2")])
    logits = torch.zeros(3, 6)
    logits[0, 2], logits[1, 2], logits[1, 0] = -1.0, 2.0, -3.0  # effusion both right; the nodule wrong
    acc = side_accuracy(logits, sides)
    assert acc[2].item() == 1.0 and acc[0].item() == 0.0 and math.isnan(acc[4].item())


def test_median_contrast_of_a_written_phantom_by_hand(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image = np.zeros((32, 32), np.uint16)
    image[::2] = 100  # the surroundings alternate 0 / 100 by row: mean 50, std 50
    image[10:14, 10:14] = 300  # the lesion: (300 - 50) / 50 = 5
    mask = np.zeros((32, 32), np.uint8)
    mask[10:14, 10:14] = 255
    Image.fromarray(image).save(tmp_path / "images" / "a.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "a_0.png")
    finding = {"kind": "nodule", "mask": "masks/a_0.png"}
    studies = [{"id": "a", "split": "test", "files": {"image": "images/a.png"}, "findings": [finding]},
               {"id": "b", "split": "training", "files": {"image": "missing.png"}, "findings": [finding]}]  # fmt: skip
    (tmp_path / "phantom.json").write_text(json.dumps({"studies": studies}))
    contrast = median_contrast(tmp_path)
    assert contrast["nodule"] == 5.0 and math.isnan(contrast["effusion"])  # the training study is not read


def test_probe_augmentation_is_an_affine_map_within_its_ranges():
    x = torch.zeros(3, 1, 33, 33)
    x[:, :, 16, 16] = 1.0  # a dot in the centre
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(random_affine(x, g, 0.0, 0.0, 0.0), x, atol=1e-6)  # no range: the identity
    shifted = random_affine(x, torch.Generator().manual_seed(1), rotate_degrees=0.0, scale=0.0, translate=0.1)
    peaks = [divmod(int(i), 33) for i in shifted.flatten(1).argmax(1)]
    assert all(abs(r - 16) <= 4 and abs(c - 16) <= 4 for r, c in peaks) and len(set(peaks)) > 1  # moved, < 10%
    again = random_affine(x, torch.Generator().manual_seed(1), rotate_degrees=0.0, scale=0.0, translate=0.1)
    assert torch.equal(shifted, again)  # the generator decides


def test_zero_shot_scores_take_the_best_prompt_of_each_class():
    image = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    positives = [torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])]  # "left" and "right" prompts of one class
    negatives = [torch.tensor([[0.0, 0.0, 1.0]])]
    # each image matches one of the two positives exactly: 1 - 0 for both, where a mean prompt would give 0.71
    assert torch.allclose(zero_shot_scores(image, positives, negatives), torch.tensor([[1.0], [1.0]]))


def test_grounding_figure_from_a_pretrained_bundle(pretrained_bundle, phantom, tmp_path):
    from pathlib import Path

    from monai_elvis.engines.__main__ import main
    from monai_elvis.engines.figures import grounding_maps

    config = Path(__file__).resolve().parents[1] / "bundles" / "elvis_grounding" / "configs" / "inference.json"
    image = str(phantom / json.loads((phantom / "datalist.json").read_text())["test"][0]["image"])
    images, maps = grounding_maps([config], [image, image], ["left pleural effusion", "cardiomegaly"],
                                  ckpt_dir=str(pretrained_bundle / "models"))  # fmt: skip
    assert images.shape == (2, 128, 128) and maps.shape == (2, 2, 128, 128)
    assert np.allclose(maps[0], maps[1])  # the same image twice: the same maps
    assert maps.min() >= 0 and maps.max() <= 1
    out = tmp_path / "fig.png"
    assert main(["grounding-figure", "--ckpt-dir", str(pretrained_bundle / "models"), "--images", image,
                 "--phrases", "left pleural effusion", "cardiomegaly", "--out", str(out)]) == 0  # fmt: skip
    assert out.stat().st_size > 1000
    assert main(["grounding-figure", "--ckpt-dir", str(tmp_path / "none"), "--images", image, "--phrases", "a",
                 "--out", str(out)]) == 2  # fmt: skip


def test_item_values_are_what_the_figures_average_and_reach_a_file(tmp_path):
    from monai_elvis.engines import ItemValuesWriter
    from monai_elvis.metrics import LocalityPreservationMetric

    # the hand-computed retrieval example of test_metrics: pair 0 misses image->report at k=1 but hits
    # report->image; pair 1 misses both; pair 2 hits both -> per pair 0.5, 0, 1 (mean 0.5 = (1/3 + 2/3) / 2)
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.1], [1.0, 0.0], [1.0, 1.0]])
    recall = RetrievalRecallMetric(k=1)
    recall(image, text)
    assert recall.item_values().tolist() == [0.5, 0.0, 1.0]
    assert recall.aggregate().item() == pytest.approx(0.5)
    i2t = RetrievalRecallMetric(k=1, direction="i2t")
    i2t(image, text)
    assert i2t.item_values().tolist() == [0.0, 0.0, 1.0]
    # class-aware precision per query (the example of test_class_aware_precision_counts_duplicate_reports)
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [1, 1]])
    text4 = torch.tensor([[0.5, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.4], [0.0, 0.9, 0.5, 1.0]])
    precision = ClassAwareRetrievalMetric(k=2)
    precision((torch.eye(4), text4), labels)
    assert precision.item_values().tolist() == [1.0, 0.0, 0.5, 0.5]
    # zero-shot: scores and labels, from which the AUC of any resample follows
    vectors = {"effusion": [1.0, 0.0], "no effusion": [0.0, 1.0]}
    zero_shot = ZeroShotClassificationMetric(lambda p: {"global": torch.tensor([vectors[x] for x in p])},
                                             {"effusion": (["effusion"], ["no effusion"])})  # fmt: skip
    zero_shot(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([[1], [0], [1]]))
    scores, zs_labels = zero_shot.item_values()
    assert scores[:, 0].tolist() == pytest.approx([1.0, -1.0, 0.0]) and zs_labels[:, 0].tolist() == [1, 0, 1]
    locality = LocalityPreservationMetric()
    pre = torch.randn(2, 5, 4)
    locality(pre, pre)  # unchanged features: 1 per image
    pointing = GroundingMetric("pointing")
    box = torch.zeros(2, 1, 4, 4)
    box[:, 0, :2, :2] = 1
    heat = torch.zeros(2, 1, 4, 4)
    heat[0, 0, 0, 0], heat[1, 0, 3, 3] = 1.0, 1.0
    pointing(heat, box)
    writer = ItemValuesWriter(tmp_path / "items.json", {"recall": recall, "precision": precision,
                                                         "zero_shot": zero_shot, "locality": locality,
                                                         "pointing": pointing})  # fmt: skip
    writer()
    written = json.loads((tmp_path / "items.json").read_text())["metrics"]
    assert written["recall"] == [0.5, 0.0, 1.0] and written["precision"] == [1.0, 0.0, 0.5, 0.5]
    assert written["locality"] == pytest.approx([1.0, 1.0]) and written["pointing"] == [1.0, 0.0]
    assert np.allclose(written["zero_shot"][0], [[1.0], [-1.0], [0.0]], atol=1e-6)
    assert written["zero_shot"][1] == [[1.0], [0.0], [1.0]]
    with pytest.raises(TypeError, match="item_values"):
        ItemValuesWriter(tmp_path / "x.json", {"bad": object()})
