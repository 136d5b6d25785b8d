"""A U-Net whose encoder is the ELVIS image encoder, for fine-tuning segmentation on pre-trained weights."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from monai.networks.nets.flexible_unet import SegmentationHead, UNetDecoder
from torch import nn

from monai_elvis.networks.image_encoder import CXRImageEncoder

__all__ = ["ElvisUNet"]


def _out_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return int(convs[-1].out_channels)


class ElvisUNet(nn.Module):
    """U-Net with the ResNet of :class:`~monai_elvis.networks.CXRImageEncoder` as encoder and MONAI's
    FlexibleUNet decoder and segmentation head.

    The encoder gives five feature maps at strides 2, 4, 8, 16 and 32 (the stem and the four ResNet stages);
    the decoder (:class:`monai.networks.nets.flexible_unet.UNetDecoder`) upsamples them back to the input size
    with skip connections, as :class:`~monai.networks.nets.FlexibleUNet` does. The encoder is not registered
    in FlexibleUNet's backbone registry: that registry is global and fixes every constructor argument per
    name, while this encoder takes ``widen_factor`` and pre-trained weights at construction.

    Args:
        in_channels: image channels (1 for radiographs).
        out_channels: output channels (classes, background included, for a softmax output).
        arch: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``, as in pre-training.
        widen_factor: as in pre-training (the checkpoint must match).
        pretrained_ckpt: optional local checkpoint for the encoder: the ``model.pt`` of the pre-training bundle
            (an :class:`~monai_elvis.networks.ElvisNet` state dict, read with ``state_dict_prefix``), or the
            weights of a bare encoder or MONAI ResNet. ``None``: random initialisation.
        state_dict_prefix: prefix of the encoder's keys in ``pretrained_ckpt`` (``"image_encoder."`` for an
            ElvisNet state dict). When the prefix matches no key, the file is read as a bare encoder.
        freeze_encoder: keep the encoder fixed: no gradients, and its batch-norm statistics stay in eval mode.
        decoder_channels: the five decoder stages' widths.
        norm, act, dropout, upsample, interp_mode: passed to MONAI's decoder.

    Shapes:
        ``[B, in_channels, H, W]`` -> logits ``[B, out_channels, H, W]``. Any ``H, W``: the input is
        padded (replicate, bottom and right) to a multiple of 32 and the output cropped back.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        arch: str = "resnet50",
        widen_factor: float = 1.0,
        pretrained_ckpt: str | os.PathLike | None = None,
        state_dict_prefix: str = "image_encoder.",
        freeze_encoder: bool = False,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        norm: str | tuple = ("batch", {"eps": 1e-3, "momentum": 0.1}),
        act: str | tuple = ("relu", {"inplace": True}),
        dropout: float = 0.0,
        upsample: str = "nontrainable",
        interp_mode: str = "nearest",
    ) -> None:
        super().__init__()
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels must have 5 values, got {list(decoder_channels)}.")
        if out_channels < 1:
            raise ValueError(f"out_channels must be positive, got {out_channels}.")
        image_encoder = CXRImageEncoder(arch, in_channels, widen_factor)
        if pretrained_ckpt is not None:
            self._load_encoder(image_encoder, pretrained_ckpt, state_dict_prefix)
        self.encoder = image_encoder.backbone  # a MONAI ResNet (scriptable); state keys "encoder.conv1.weight", ...
        net = self.encoder
        encoder_channels = [in_channels, _out_channels(net.conv1)] + [
            _out_channels(layer) for layer in (net.layer1, net.layer2, net.layer3, net.layer4)
        ]
        self.decoder = UNetDecoder(
            spatial_dims=2,
            encoder_channels=encoder_channels,
            decoder_channels=list(decoder_channels),
            act=act,
            norm=norm,
            dropout=dropout,
            bias=False,
            upsample=upsample,
            pre_conv="default",
            interp_mode=interp_mode,
            align_corners=None,
            is_pad=True,
        )
        self.head = SegmentationHead(2, decoder_channels[-1], out_channels, kernel_size=3)
        self.in_channels = in_channels
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            for p in self.encoder.parameters():
                p.requires_grad_(False)
            self.encoder.eval()

    @staticmethod
    def _load_encoder(encoder: CXRImageEncoder, path: str | os.PathLike, prefix: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pre-trained checkpoint not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict):
            for key in ("state_dict", "model", "network"):  # a plain state dict, or a training checkpoint
                if key in state and isinstance(state[key], dict):
                    state = state[key]
                    break
        has_prefix = bool(prefix) and any(str(k).startswith(prefix) for k in state)
        try:
            encoder.load_state_dict_from(state, prefix if has_prefix else "")
        except ValueError as e:
            raise ValueError(f"pre-trained checkpoint {path}: {e}") from e

    def train(self, mode: bool = True) -> ElvisUNet:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # frozen: batch-norm statistics are not updated either
        return self

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The input and the five encoder feature maps (strides 1, 2, 4, 8, 16, 32), as the decoder takes them."""
        net = self.encoder
        features = [x]
        y = net.act(net.bn1(net.conv1(x)))
        features.append(y)
        if not net.no_max_pool:
            y = net.maxpool(y)
        y = net.layer1(y)
        features.append(y)
        y = net.layer2(y)
        features.append(y)
        y = net.layer3(y)
        features.append(y)
        y = net.layer4(y)
        features.append(y)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"image must have shape [B, {self.in_channels}, H, W], got shape {x.shape}.")
        h, w = x.shape[-2], x.shape[-1]
        ph, pw = (32 - h % 32) % 32, (32 - w % 32) % 32
        if ph or pw:  # the decoder needs sizes divisible by the encoder's stride: pad, then crop the output
            x = torch.nn.functional.pad(x, [0, pw, 0, ph], mode="replicate")
        out = self.head(self.decoder(self.encode(x), 4))
        return out[..., :h, :w]
