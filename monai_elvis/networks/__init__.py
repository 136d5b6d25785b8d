"""Networks of monai-elvis: encoders, projection heads, cross-modal attention and :class:`ElvisNet`, the segmentation
:class:`ElvisUNet` and the classification :class:`ElvisClassifier`."""

from monai_elvis.networks.classification import ElvisClassifier
from monai_elvis.networks.elvis_net import ElvisNet
from monai_elvis.networks.heads import AttentionPooling, CrossModalAttention, ProjectionHead
from monai_elvis.networks.image_encoder import RESNET_ARCHS, CXRImageEncoder
from monai_elvis.networks.segmentation import ElvisUNet
from monai_elvis.networks.text_encoder import TINY_BERT_CONFIG, ReportTextEncoder, pool_sentences, pool_words

__all__ = [
    "CXRImageEncoder",
    "RESNET_ARCHS",
    "ReportTextEncoder",
    "TINY_BERT_CONFIG",
    "pool_sentences",
    "pool_words",
    "ProjectionHead",
    "CrossModalAttention",
    "AttentionPooling",
    "ElvisNet",
    "ElvisUNet",
    "ElvisClassifier",
]
