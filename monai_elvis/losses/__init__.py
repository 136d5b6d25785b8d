"""Pre-training objectives: global contrast, local alignment (one_hot | spatial | intra_modal, LoVT), GLoRIA, ElvisLoss;
multi-label BCE for classification transfer."""

from monai_elvis.losses.classification import MultiLabelBCEWithLogitsLoss
from monai_elvis.losses.distributed import distributed_world, gather_across_ranks
from monai_elvis.losses.elvis_loss import ElvisLoss
from monai_elvis.losses.global_contrastive import GlobalContrastiveLoss
from monai_elvis.losses.gloria import GloriaForm, GloriaLocalLoss, WordUnit, gloria_pair_similarity
from monai_elvis.losses.local_alignment import (
    AlignmentDirections,
    LocalAlignmentLoss,
    LocalTarget,
    TargetSource,
    UnitWeights,
    intra_modal_target,
    spatial_target,
)

__all__ = [
    "distributed_world",
    "gather_across_ranks",
    "ElvisLoss",
    "GlobalContrastiveLoss",
    "GloriaForm",
    "GloriaLocalLoss",
    "WordUnit",
    "gloria_pair_similarity",
    "AlignmentDirections",
    "LocalAlignmentLoss",
    "LocalTarget",
    "TargetSource",
    "UnitWeights",
    "intra_modal_target",
    "spatial_target",
    "MultiLabelBCEWithLogitsLoss",
]
