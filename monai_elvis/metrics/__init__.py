"""Metrics: retrieval recall@K, locality preservation and phrase grounding (CNR, pointing game, IoU, mIoU)."""

from monai_elvis.metrics.grounding import (
    MIOU_THRESHOLDS,
    GroundingMetric,
    grounding_cnr,
    heatmap_iou,
    heatmap_miou,
    pointing_game,
)
from monai_elvis.metrics.locality import LocalityPreservationMetric, locality_preservation
from monai_elvis.metrics.retrieval import RetrievalRecallMetric, retrieval_recall

__all__ = [
    "GroundingMetric", "grounding_cnr", "heatmap_iou", "heatmap_miou", "pointing_game", "MIOU_THRESHOLDS",
    "LocalityPreservationMetric", "locality_preservation",
    "RetrievalRecallMetric", "retrieval_recall",
]  # fmt: skip
