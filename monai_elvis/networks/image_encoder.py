"""Chest X-ray image encoder on MONAI's ResNet."""

from __future__ import annotations

import os

import torch
from monai.networks.nets import ResNet
from torch import nn

__all__ = ["CXRImageEncoder", "RESNET_ARCHS"]

# name -> (block type, layers per stage)
RESNET_ARCHS: dict[str, tuple[str, list[int]]] = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
}


def _dilate(stage: nn.Module, dilation: int) -> None:
    """Turn a ResNet stage's stride-2 downsampling into dilation: stride 1 everywhere, 3x3 convolutions dilated."""
    for m in stage.modules():
        if isinstance(m, nn.Conv2d):
            m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                m.dilation, m.padding = (dilation, dilation), (dilation, dilation)


class CXRImageEncoder(nn.Module):
    """2D ResNet (MONAI's :class:`~monai.networks.nets.ResNet`) returning local region features and a global feature.

    The stem is the ImageNet layout (7x7 convolution with stride 2, then 3x3 max pooling), so a
    ``H x W`` input gives a ``H/32 x W/32`` grid of regions from the last stage, or a finer grid with
    ``output_stride`` 16 or 8: the last stage (or the last two) then keeps its input's resolution and dilates its
    3x3 convolutions instead (as DeepLab does, and BioViL for its 15x15 patch grids). The weights are the same
    in every case, so a state dict moves between encoders of different output strides.

    Args:
        arch: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        in_channels: 1 (grayscale radiograph) or 3.
        widen_factor: scales every stage's width (``0.125`` gives a tiny network for tests and CPU runs).
        pretrained_path: optional local file holding a state dict of this encoder's ``backbone`` (for example
            ``backbone.conv1.weight``...) or of a bare MONAI ResNet (``conv1.weight``...); a classifier head
            (``fc.*``) in it is ignored. Loaded with ``torch.load(..., weights_only=True)``.
        state_dict_prefix: a prefix to strip from the keys of ``pretrained_path`` first, e.g.
            ``"image_encoder."`` for a checkpoint of :class:`~monai_elvis.networks.ElvisNet`.
        output_stride: 32 (default), 16 or 8: the input pixels per region of the grid.
        global_pool: how the global feature pools the regions: ``"avg"`` (default) or ``"max"`` (per channel). With
            max pooling a feature counts only where it is present, so an image-level alignment learns from
            the regions that show a finding rather than from the absence of normal features elsewhere.

    Shapes:
        input ``[B, in_channels, S1, S2]`` -> ``(local [B, N, C], global [B, C])`` with ``N = g1 * g2`` the region
        grid flattened in the input's axis order (``g1 = ceil(S1 / output_stride)``; for images in MONAI's
        ``(x, y)`` order, as :class:`~monai_elvis.transforms.LoadCXR` gives them, ``x`` is the slow index),
        ``C`` = :attr:`out_channels`. The grid size of the last call is in
        :attr:`last_grid_size`; it is also returned by :meth:`forward_with_grid`.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        in_channels: int = 1,
        widen_factor: float = 1.0,
        pretrained_path: str | os.PathLike | None = None,
        state_dict_prefix: str = "",
        output_stride: int = 32,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if arch not in RESNET_ARCHS:
            raise ValueError(f"arch must be one of {sorted(RESNET_ARCHS)}, got {arch!r}.")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}.")
        block, layers = RESNET_ARCHS[arch]
        self.in_channels = in_channels
        expansion = 4 if block == "bottleneck" else 1
        self.backbone = ResNet(
            block=block,
            layers=layers,
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            widen_factor=widen_factor,
            feed_forward=False,
        )
        if global_pool not in ("avg", "max"):
            raise ValueError(f"global_pool must be 'avg' or 'max', got {global_pool!r}.")
        self.global_pool = global_pool
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}.")
        self.output_stride = output_stride
        dilated = {32: [], 16: [self.backbone.layer4], 8: [self.backbone.layer3, self.backbone.layer4]}[output_stride]
        for i, stage in enumerate(dilated):
            _dilate(stage, 2 ** (i + 1))
        self.out_channels = int(512 * widen_factor) * expansion
        self.last_grid_size: tuple[int, int] | None = None
        if pretrained_path is not None:
            self.load_pretrained(pretrained_path, state_dict_prefix)

    def load_pretrained(self, path: str | os.PathLike, prefix: str = "") -> None:
        """Load backbone weights from a local state dict file (see the class docstring)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image encoder weights not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        try:
            self.load_state_dict_from(state, prefix)
        except ValueError as e:
            raise ValueError(f"weights in {path} do not fit: {e}") from e

    def load_state_dict_from(self, state: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Load backbone weights from an in-memory state dict: keys under ``prefix`` (stripped), then an optional
        ``backbone.``; a classifier head (``fc.*``) is ignored. Every backbone weight must be present."""
        if prefix:
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        state = {k[len("backbone.") :] if k.startswith("backbone.") else k: v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            missing, unexpected = self.backbone.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"this {type(self).__name__} has other shapes: {str(e)[:400]}") from e
        if missing or unexpected:
            raise ValueError(
                f"they do not fit this {type(self).__name__}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
            )

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map ``[B, C, h, w]``."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"image must have shape [B, {self.in_channels}, H, W], got shape {tuple(x.shape)}.")
        net = self.backbone
        x = net.act(net.bn1(net.conv1(x)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))

    def forward_with_grid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Like :meth:`forward`, also returning the region grid size ``(h, w)``."""
        fmap = self.feature_map(x)
        h, w = fmap.shape[-2:]
        local = fmap.flatten(2).transpose(1, 2)  # [B, N, C]
        self.last_grid_size = (int(h), int(w))
        global_ = local.amax(dim=1) if self.global_pool == "max" else local.mean(dim=1)
        return local, global_, self.last_grid_size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local, global_, _ = self.forward_with_grid(x)
        return local, global_
