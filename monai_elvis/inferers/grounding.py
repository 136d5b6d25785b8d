"""Phrase grounding: a similarity heatmap between a phrase and every region of an image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d
from monai.utils import StrEnum

from monai_elvis.keys import Keys, OutKeys
from monai_elvis.utils import check_option, l2_normalize

__all__ = ["PhraseGroundingInferer", "RegionPlacement", "region_similarity_map", "upsample_region_map", "TEXT_META_KEYS"]

TEXT_META_KEYS = (Keys.INPUT_IDS, Keys.ATTENTION_MASK, Keys.SENTENCE_INDEX)


class RegionPlacement(StrEnum):
    """Where :func:`upsample_region_map` puts the value of each region of the grid on the image.

    - ``"receptive_field"``: region ``i`` at pixel ``i * stride``, the centre of its receptive field in a CNN whose
      convolutions are padded by half their kernel (a ``k x k``, stride-``s`` convolution padded by ``k // 2``
      centres its output ``i`` on input ``s * i``; so do MONAI's ResNets and :class:`CXRImageEncoder`).
    - ``"cell"``: each region a cell of ``size / g`` pixels, its value at the cell's centre (as for the patches of a
      vision transformer). On a padded CNN this shifts the map by ``(stride - 1) / 2`` pixels along each axis,
      half a region.
    """

    RECEPTIVE_FIELD = "receptive_field"
    CELL = "cell"


def upsample_region_map(heat: torch.Tensor, size: Sequence[int], stride: float | None = None) -> torch.Tensor:
    """Bilinear upsampling of a region map ``[B, C, g1, g2]`` to ``size`` pixels: ``[B, C, *size]``.

    With ``stride`` (the encoder's output stride), region ``i`` is placed at pixel ``i * stride``
    (:attr:`RegionPlacement.RECEPTIVE_FIELD`), and pixels past the last region take its value; ``None`` treats
    each region as a cell with its value at the cell's centre (:attr:`RegionPlacement.CELL`,
    ``F.interpolate(..., align_corners=False)``).
    """
    if stride is None:
        return F.interpolate(heat, size=tuple(size), mode="bilinear", align_corners=False)
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}.")
    heat = heat.float()  # pixel positions in float32: bfloat16 cannot count past 256
    axes = []
    for n, s in zip(heat.shape[-2:], size):
        pos = torch.arange(int(s), device=heat.device, dtype=torch.float32) / float(stride)  # grid coordinate of each pixel
        axes.append(pos * (2.0 / (n - 1)) - 1.0 if n > 1 else torch.zeros_like(pos))
    g1, g2 = torch.meshgrid(axes[0], axes[1], indexing="ij")
    grid = torch.stack([g2, g1], dim=-1).expand(heat.shape[0], -1, -1, -1)  # grid_sample's (last axis, first axis)
    return F.grid_sample(heat, grid, mode="bilinear", padding_mode="border", align_corners=True)


def smooth_map(heat: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of ``[B, C, H, W]`` maps, ``sigma`` pixels, with the borders replicated: MONAI's
    ``GaussianFilter`` pads with zeros, which for a ``sigma`` of a sizeable share of the image lowers the map
    towards its borders (a flat map becomes a dome) and so biases its peak towards the centre."""
    kernel = gaussian_1d(torch.tensor(float(sigma)), truncated=4.0, approx="erf", normalize=True).to(heat.device)
    return separable_filtering(heat.float(), [kernel, kernel], mode="replicate")


def region_similarity_map(out: dict[str, Any], size: tuple[int, int] | None = None, normalize: bool = True,
                          sigma: float = 0.0, text_feature: str = "sentence", similarity: str = "cosine",
                          placement: RegionPlacement | str = RegionPlacement.RECEPTIVE_FIELD) -> torch.Tensor:  # fmt: skip
    """Cosine similarity between each projected region ``v_i`` and the phrase, as a ``[B, 1, h, w]`` map from the
    output dict of :class:`~monai_elvis.networks.ElvisNet`. The phrase is its first sentence's projected feature
    ``t_0`` (``text_feature="sentence"``) or its projected global feature ``t`` (``"global"``: the text
    encoder's [CLS], the feature the global alignment trains). ``similarity="dot"`` leaves the regions unnormalised
    (``<v_i, t / |t|>``): a region's share of the image-phrase score when the global feature pools the regions, as
    in class activation maps; ``"cosine"`` normalises each region.

    It is bilinearly upsampled to ``size`` (the network input's size, in whose pixels the stride counts) when
    given (:func:`upsample_region_map`; with ``placement "receptive_field"`` each region sits at the centre of its
    receptive field, from the output's ``OutKeys.IMAGE_STRIDE``; without one, or with ``"cell"``, regions are
    cells), then smoothed by a Gaussian of standard deviation ``sigma`` pixels (:func:`smooth_map`, borders
    replicated; 0: none), then min-max scaled per image to ``[0, 1]`` when ``normalize``.
    """
    if similarity not in ("cosine", "dot"):
        raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}.")
    regions = out[OutKeys.IMAGE_LOCAL].float()  # [B, N, d]
    regions = l2_normalize(regions) if similarity == "cosine" else regions
    if text_feature not in ("sentence", "global"):
        raise ValueError(f"text_feature must be 'sentence' or 'global', got {text_feature!r}.")
    text = out[OutKeys.TEXT_SENTENCE][:, 0] if text_feature == "sentence" else out[OutKeys.TEXT_GLOBAL]
    phrase = l2_normalize(text.float())  # [B, d]
    sim = torch.einsum("bnd,bd->bn", regions, phrase)
    grid = out.get(OutKeys.IMAGE_GRID)
    if grid is None:
        side = int(round(sim.shape[1] ** 0.5))
        grid = (side, sim.shape[1] // side)
    heat = sim.view(sim.shape[0], 1, *grid)
    if size is not None:
        placement = check_option(placement, RegionPlacement, "placement")
        stride = out.get(OutKeys.IMAGE_STRIDE) if placement == RegionPlacement.RECEPTIVE_FIELD else None
        heat = upsample_region_map(heat, tuple(size), stride)
    if sigma > 0:
        heat = smooth_map(heat, sigma)
    if normalize:
        flat = heat.flatten(1)
        lo, hi = flat.min(1, keepdim=True)[0], flat.max(1, keepdim=True)[0]
        heat = ((flat - lo) / (hi - lo).clamp(min=1e-8)).view_as(heat)
    return heat


class PhraseGroundingInferer(Inferer):
    """``inferer(image [B, 1, H, W], network, input_ids=..., attention_mask=..., sentence_index=...)`` returns the
    phrase-region similarity heatmap ``[B, 1, H, W]`` in ``[0, 1]`` (see :func:`region_similarity_map`).

    The tokens are those of the phrase alone (one sentence); ``network`` is an
    :class:`~monai_elvis.networks.ElvisNet` (or DDP-wrapped). When no token arguments are given, they are read
    from ``image.meta`` (put there by :class:`~monai_elvis.transforms.TextToMetad`): this is how a caller that
    passes only the image, such as MONAI Label's bundle infer task, still grounds the request's phrase.

    Args:
        normalize: min-max scale each map to ``[0, 1]``.
        sigma: Gaussian smoothing of the upsampled map, in pixels of the network input (0: none).
        text_feature: the phrase's ``"sentence"`` or ``"global"`` feature (see :func:`region_similarity_map`).
        similarity: ``"cosine"`` or ``"dot"`` (see :func:`region_similarity_map`).
        placement: where each region's value goes on the image (:class:`RegionPlacement`): at the centre of its
            receptive field (the default; needs the network's ``OutKeys.IMAGE_STRIDE``) or as a cell.
    """

    def __init__(self, normalize: bool = True, sigma: float = 0.0, text_feature: str = "sentence",
                 similarity: str = "cosine",
                 placement: RegionPlacement | str = RegionPlacement.RECEPTIVE_FIELD) -> None:  # fmt: skip
        super().__init__()
        self.placement = check_option(placement, RegionPlacement, "placement")
        self.normalize = normalize
        self.sigma = float(sigma)
        self.text_feature = text_feature
        self.similarity = similarity

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not args and not kwargs:
            kwargs = self._text_from_meta(inputs)
        out = network(inputs, *args, **kwargs)
        return region_similarity_map(out, tuple(inputs.shape[-2:]), self.normalize, self.sigma, self.text_feature,
                                     self.similarity, self.placement)

    @staticmethod
    def _text_from_meta(inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        meta = inputs.meta if isinstance(inputs, MetaTensor) else {}
        missing = [k for k in TEXT_META_KEYS if k not in meta]
        if missing:
            raise ValueError(
                f"no phrase tokens: pass {list(TEXT_META_KEYS)} to the inferer, or put them in the image's metadata "
                f"with monai_elvis.transforms.TextToMetad (missing {missing})."
            )
        text = {}
        for k in TEXT_META_KEYS:
            v = torch.as_tensor(meta[k], device=inputs.device).long()
            text[k] = v.expand(inputs.shape[0], -1) if v.ndim == 1 else v
        return text
