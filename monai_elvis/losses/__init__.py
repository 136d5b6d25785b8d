"""Pre-training objectives: global contrast, local alignment (one_hot | spatial | intra_modal), GLoRIA, ElvisLoss."""

from monai_elvis.losses.elvis_loss import ElvisLoss
from monai_elvis.losses.global_contrastive import GlobalContrastiveLoss
from monai_elvis.losses.gloria import GloriaLocalLoss, gloria_pair_similarity
from monai_elvis.losses.local_alignment import LocalAlignmentLoss, intra_modal_target, spatial_target

__all__ = [
    "ElvisLoss",
    "GlobalContrastiveLoss",
    "GloriaLocalLoss",
    "gloria_pair_similarity",
    "LocalAlignmentLoss",
    "intra_modal_target",
    "spatial_target",
]
