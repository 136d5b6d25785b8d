"""Metrics: retrieval recall@K and class-aware precision@K, locality preservation, phrase grounding (CNR, pointing
game, side of the peak, IoU, mIoU), zero-shot classification and phrase sensitivity, multi-label AUROC."""

from monai_elvis.metrics.classification import MultiLabelROCAUCMetric
from monai_elvis.metrics.grounding import (
    MIOU_THRESHOLDS,
    GroundingMetric,
    grounding_cnr,
    heatmap_iou,
    heatmap_miou,
    peak_side,
    pointing_game,
)
from monai_elvis.metrics.locality import LocalityPreservationMetric, locality_preservation
from monai_elvis.metrics.retrieval import RetrievalRecallMetric, retrieval_ranks, retrieval_recall
from monai_elvis.metrics.zero_shot import (
    FINDING_PROMPTS,
    SIDE_PHRASES,
    ClassAwareRetrievalMetric,
    PhraseSensitivityMetric,
    ZeroShotClassificationMetric,
    class_precision_at_k,
    class_precision_chance,
    class_precision_per_query,
    map_correlation,
    zero_shot_auc,
    zero_shot_scores,
)

__all__ = [
    "GroundingMetric", "grounding_cnr", "heatmap_iou", "heatmap_miou", "pointing_game", "peak_side", "MIOU_THRESHOLDS",
    "FINDING_PROMPTS", "SIDE_PHRASES", "ClassAwareRetrievalMetric", "PhraseSensitivityMetric",
    "ZeroShotClassificationMetric", "class_precision_at_k", "class_precision_chance", "class_precision_per_query",
    "map_correlation",
    "zero_shot_auc", "zero_shot_scores",
    "LocalityPreservationMetric", "locality_preservation",
    "RetrievalRecallMetric", "retrieval_ranks", "retrieval_recall",
    "MultiLabelROCAUCMetric",
]  # fmt: skip
