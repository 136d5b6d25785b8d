"""Metrics: hand-computed values and properties."""

from __future__ import annotations

import math

import pytest
import torch

from monai_elvis.losses import LocalAlignmentLoss
from monai_elvis.metrics import (
    GroundingMetric,
    LocalityPreservationMetric,
    RetrievalRecallMetric,
    grounding_cnr,
    heatmap_iou,
    heatmap_miou,
    locality_preservation,
    pointing_game,
    retrieval_recall,
)


def test_retrieval_recall_hand_computed():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.1], [1.0, 0.0], [1.0, 1.0]])
    # sim rows: image0 -> [.995, 1, .77] (match second), image1 -> [.0995, 0, .707] (third), image2 -> [.77, .707, 1]
    r = retrieval_recall(image, text, ks=(1, 2))
    assert r["i2t_R@1"] == pytest.approx(1 / 3) and r["i2t_R@2"] == pytest.approx(2 / 3)
    # columns: text0 -> [.995, .0995, .77] (first), text1 -> [1, 0, .707] (third), text2 -> [.707, .707, 1]
    assert r["t2i_R@1"] == pytest.approx(2 / 3) and r["t2i_R@2"] == pytest.approx(2 / 3)


def test_retrieval_ties_count_against_the_match_and_metric_accumulates():
    same = torch.ones(4, 3)
    assert retrieval_recall(same, same, ks=(1,))["i2t_R@1"] == 0.0
    metric = RetrievalRecallMetric(k=1)
    x = torch.randn(6, 8)
    metric(x[:4], x[:4])
    metric(y_pred=x[4:], y=x[4:])
    assert metric.aggregate().item() == 1.0
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.1], [1.0, 0.0], [1.0, 1.0]])
    both = RetrievalRecallMetric(k=1)
    both(image, text)
    assert both.aggregate().item() == pytest.approx((1 / 3 + 2 / 3) / 2)
    i2t = RetrievalRecallMetric(k=1, direction="i2t")
    i2t(image, text)
    assert i2t.aggregate().item() == pytest.approx(1 / 3)
    metric.reset()
    with pytest.raises(ValueError, match="no embeddings"):
        metric.aggregate()


def test_locality_preservation_values():
    torch.manual_seed(0)
    pre = torch.randn(3, 9, 16)
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    assert torch.allclose(locality_preservation(pre, pre @ q), torch.ones(3), atol=1e-5)  # rotation keeps it
    # one_hot-like collapse: projected regions made mutually orthogonal -> no similarity structure left
    post = torch.eye(9)[None].repeat(3, 1, 1) + 0.01 * torch.randn(3, 9, 9)
    assert locality_preservation(pre, post).abs().max() < 0.5
    # hand example: N=3, pre pair similarities (0, 0, 1/sqrt2) ; post the reverse order
    pre = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    post = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    # pairs (0,1), (0,2), (1,2): pre [0, .707, .707], post [.707, .707, 0] -> r = -0.5
    assert locality_preservation(pre, post).item() == pytest.approx(-0.5, abs=1e-6)
    m = LocalityPreservationMetric()
    m(y_pred=pre, y=pre)
    m(y_pred=pre, y=post)
    assert m.aggregate().item() == pytest.approx(0.25, abs=1e-6)


def test_elvis_target_preserves_locality_better_than_one_hot_after_training_a_projection():
    """The paper's Figure 1 claim on a toy: train a linear projection with each local loss and compare."""
    torch.manual_seed(0)
    b, side, c, d = 8, 4, 16, 16
    # smooth region features: neighbours alike
    base = torch.randn(b, c, 2, 2)
    h = torch.nn.functional.interpolate(base, size=(side, side), mode="bilinear", align_corners=True)
    h = h.flatten(2).transpose(1, 2) + 0.05 * torch.randn(b, side * side, c)
    scores = {}
    for target in ("one_hot", "intra_modal"):
        torch.manual_seed(1)
        proj = torch.nn.Sequential(torch.nn.Linear(c, 64), torch.nn.ReLU(), torch.nn.Linear(64, d))
        opt = torch.optim.Adam(proj.parameters(), lr=1e-2)
        loss_fn = LocalAlignmentLoss(target, temperature=0.1, target_temperature=0.1, region_weight=1.0,
                                     sentence_weight=0.0)  # fmt: skip
        text = torch.randn(b, 2, d)
        for _ in range(150):
            v = proj(h)
            loss = loss_fn(v, v, text, text, image_local_pre=h, text_local_pre=text)
            opt.zero_grad()
            loss.backward()
            opt.step()
        scores[target] = locality_preservation(h, proj(h)).mean().item()
    assert scores["intra_modal"] > scores["one_hot"] + 0.2, scores


def test_grounding_metrics_hand_computed():
    heat = torch.zeros(1, 1, 4, 4)
    heat[0, 0, :2, :2] = torch.tensor([[1.0, 3.0], [1.0, 3.0]])  # inside: mean 2, var 1
    heat[0, 0, 3, 3] = 12.0  # outside: 12 values 0 and one 12 -> mean 1, var 11
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, :2, :2] = True
    assert grounding_cnr(heat, mask).item() == pytest.approx(1 / math.sqrt(12), abs=1e-6)
    assert pointing_game(heat, mask).item() == 0.0
    assert pointing_game(heat.clamp(max=3), mask).item() == 1.0
    # heat >= 2: two pixels inside (the 3s) and one outside (the 12); union with the 4 mask pixels is 5
    assert heatmap_iou(heat, mask, threshold=2).item() == pytest.approx(2 / 5)
    m = GroundingMetric("cnr")
    m(y_pred=heat, y=mask)
    m(y_pred=heat * 2, y=mask)  # CNR is scale invariant
    assert m.aggregate().item() == pytest.approx(1 / math.sqrt(12), abs=1e-6)
    with pytest.raises(ValueError, match="empty or covers"):
        grounding_cnr(heat, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="metric_name"):
        GroundingMetric("auc")


def test_grounding_cnr_per_box_averaged_nan_padding_and_miou():
    heat = torch.zeros(1, 1, 4, 4)
    heat[0, 0, :2, :2] = torch.tensor([[1.0, 3.0], [1.0, 3.0]])
    heat[0, 0, 3, 3] = 12.0
    box1 = torch.zeros(4, 4, dtype=torch.bool)
    box1[:2, :2] = True  # CNR 1/sqrt(12) (see above)
    box2 = torch.zeros(4, 4, dtype=torch.bool)
    box2[3, 3] = True  # inside: 12, var 0; outside: 15 pixels, sum 8, mean 8/15, var = 16/15 - (8/15)^2
    mean_out = 8 / 15
    var_out = (2 * 1 + 2 * 9) / 15 - mean_out**2
    cnr2 = (12 - mean_out) / math.sqrt(var_out)
    masks = torch.stack([box1, box2, torch.zeros(4, 4, dtype=torch.bool)])[None]  # a third, empty channel: padding
    assert grounding_cnr(heat, masks).item() == pytest.approx((1 / math.sqrt(12) + cnr2) / 2, rel=1e-5)
    assert pointing_game(heat, masks).item() == 1.0  # the peak (12) is inside box 2
    # a map equal to the box indicator: mean_in 1, mean_out 0, no variance -> CNR = 1 / sqrt(eps)
    indicator = box1.float()[None, None]
    assert grounding_cnr(indicator, box1[None, None], eps=1e-4).item() == pytest.approx(100.0, rel=1e-4)
    # NaN padding (a padded border) is ignored: the same map with a NaN column scores the same
    padded = torch.full((1, 1, 4, 5), float("nan"))
    padded[..., :4] = heat
    pmask = torch.zeros(1, 3, 4, 5, dtype=torch.bool)
    pmask[..., :4] = masks
    assert grounding_cnr(padded, pmask).item() == pytest.approx(grounding_cnr(heat, masks).item(), rel=1e-6)
    assert pointing_game(padded, pmask).item() == 1.0
    # mIoU over thresholds 0.1..0.5 of a [0, 1] map: 0.75 inside box1 everywhere, 0.3 on one outside pixel
    m01 = torch.zeros(1, 1, 4, 4)
    m01[0, 0, :2, :2] = 0.75
    m01[0, 0, 2, 2] = 0.3
    # thresholds 0.1, 0.2, 0.3: 5 predicted pixels, 4 right -> 4/5; 0.4, 0.5: exactly the box -> 1
    assert heatmap_miou(m01, box1[None, None]).item() == pytest.approx((3 * 0.8 + 2 * 1.0) / 5)
    metric = GroundingMetric("miou")
    metric(y_pred=[m01[0], m01[0, :, :3, :3]], y=[box1[None], torch.zeros(1, 3, 3, dtype=torch.bool)])  # decollated
    assert metric.get_buffer()[1].isnan().item()  # no box to score: NaN, left out of the mean
    assert metric.aggregate().item() == pytest.approx(0.88)
