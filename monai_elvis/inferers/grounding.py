"""Phrase grounding: a similarity heatmap between a phrase and every region of an image."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import Inferer

from monai_elvis.keys import OutKeys
from monai_elvis.utils import l2_normalize

__all__ = ["PhraseGroundingInferer", "region_similarity_map"]


def region_similarity_map(out: dict[str, Any], size: tuple[int, int] | None = None,
                          normalize: bool = True) -> torch.Tensor:  # fmt: skip
    """Cosine similarity between each projected region ``v_i`` and the first sentence ``t_0`` (the phrase), as a
    ``[B, 1, h, w]`` map (bilinearly upsampled to ``size`` when given; min-max scaled per image to ``[0, 1]``
    when ``normalize``), from the output dict of :class:`~monai_elvis.networks.ElvisNet`."""
    regions = l2_normalize(out[OutKeys.IMAGE_LOCAL].float())  # [B, N, d]
    phrase = l2_normalize(out[OutKeys.TEXT_SENTENCE][:, 0].float())  # [B, d]
    sim = torch.einsum("bnd,bd->bn", regions, phrase)
    grid = out.get(OutKeys.IMAGE_GRID)
    if grid is None:
        side = int(round(sim.shape[1] ** 0.5))
        grid = (side, sim.shape[1] // side)
    heat = sim.view(sim.shape[0], 1, *grid)
    if size is not None:
        heat = F.interpolate(heat, size=tuple(size), mode="bilinear", align_corners=False)
    if normalize:
        flat = heat.flatten(1)
        lo, hi = flat.min(1, keepdim=True)[0], flat.max(1, keepdim=True)[0]
        heat = ((flat - lo) / (hi - lo).clamp(min=1e-8)).view_as(heat)
    return heat


class PhraseGroundingInferer(Inferer):
    """``inferer(image [B, 1, H, W], network, input_ids=..., attention_mask=..., sentence_index=...)`` returns the
    phrase-region similarity heatmap ``[B, 1, H, W]`` (see :func:`region_similarity_map`). The tokens are those of
    the phrase alone (one sentence); ``network`` is an :class:`~monai_elvis.networks.ElvisNet` (or DDP-wrapped)."""

    def __init__(self, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = network(inputs, *args, **kwargs)
        return region_similarity_map(out, tuple(inputs.shape[-2:]), self.normalize)
