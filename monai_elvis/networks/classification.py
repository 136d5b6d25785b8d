"""A classifier on the ELVIS image encoder: a linear head on the pooled last-stage features (linear probe or
fine-tuning)."""

from __future__ import annotations

import os

import torch
from torch import nn

from monai_elvis.networks.image_encoder import CXRImageEncoder
from monai_elvis.networks.segmentation import ElvisUNet

__all__ = ["ElvisClassifier"]


class ElvisClassifier(nn.Module):
    """The ResNet of :class:`~monai_elvis.networks.CXRImageEncoder`, pooled, then one linear layer: logits of
    ``num_classes`` independent (multi-label) classes.

    With ``freeze_encoder`` this is a linear probe: the encoder gets no gradients and its batch-norm statistics
    stay as loaded (it is kept in eval mode even while the module trains), so only the head learns. Without it
    the whole network is fine-tuned.

    Args:
        in_channels: image channels (1 for radiographs).
        num_classes: outputs (1 for a binary task such as RSNA pneumonia).
        arch: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``, as in pre-training.
        widen_factor: as in pre-training (the checkpoint must match).
        output_stride: 32, 16 or 8, as :class:`CXRImageEncoder` (the weights do not depend on it; the pre-training
            bundle uses 16).
        global_pool: ``"avg"`` or ``"max"``: how the last stage's regions are pooled into the feature the head
            reads (the pre-training bundle's global image feature is ``"max"``).
        pretrained_ckpt: optional local checkpoint for the encoder: the pre-training bundle's ``model.pt`` (an
            :class:`~monai_elvis.networks.ElvisNet` state dict, read with ``state_dict_prefix``), or the weights of
            a bare encoder or MONAI ResNet. ``None``: random initialisation.
        state_dict_prefix: prefix of the encoder's keys in ``pretrained_ckpt`` (``"image_encoder."`` for an
            ElvisNet state dict). When the prefix matches no key, the file is read as a bare encoder.
        freeze_encoder: linear probe (see above).
        dropout: dropout before the head (0: none).

    Shapes:
        ``[B, in_channels, H, W]`` -> logits ``[B, num_classes]``; :meth:`features` gives the pooled ``[B, C]``.
        The module is scriptable (``torch.jit.script``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        arch: str = "resnet50",
        widen_factor: float = 1.0,
        output_stride: int = 32,
        global_pool: str = "avg",
        pretrained_ckpt: str | os.PathLike | None = None,
        state_dict_prefix: str = "image_encoder.",
        freeze_encoder: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}.")
        if global_pool not in ("avg", "max"):
            raise ValueError(f"global_pool must be 'avg' or 'max', got {global_pool!r}.")
        image_encoder = CXRImageEncoder(arch, in_channels, widen_factor, output_stride=output_stride)
        if pretrained_ckpt is not None:
            ElvisUNet._load_encoder(image_encoder, pretrained_ckpt, state_dict_prefix)
        self.encoder = image_encoder.backbone  # a MONAI ResNet, dilated for the output stride; keys "encoder.*"
        self.in_channels = in_channels
        self.num_channels = image_encoder.out_channels
        self.max_pool = global_pool == "max"
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.num_channels, num_classes)
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            for p in self.encoder.parameters():
                p.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> ElvisClassifier:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # frozen: batch-norm statistics are not updated either
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled last-stage feature ``[B, C]`` the head reads."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"image must have shape [B, {self.in_channels}, H, W], got shape {x.shape}.")
        net = self.encoder
        y = net.act(net.bn1(net.conv1(x)))
        if not net.no_max_pool:
            y = net.maxpool(y)
        y = net.layer4(net.layer3(net.layer2(net.layer1(y)))).flatten(2)
        return y.amax(dim=2) if self.max_pool else y.mean(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))
