"""Phrase grounding: a similarity heatmap between a phrase and every region of an image."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.networks.layers import GaussianFilter

from monai_elvis.keys import Keys, OutKeys
from monai_elvis.utils import l2_normalize

__all__ = ["PhraseGroundingInferer", "region_similarity_map", "TEXT_META_KEYS"]

TEXT_META_KEYS = (Keys.INPUT_IDS, Keys.ATTENTION_MASK, Keys.SENTENCE_INDEX)


def region_similarity_map(out: dict[str, Any], size: tuple[int, int] | None = None, normalize: bool = True,
                          sigma: float = 0.0, text_feature: str = "sentence", similarity: str = "cosine") -> torch.Tensor:  # fmt: skip
    """Cosine similarity between each projected region ``v_i`` and the phrase, as a ``[B, 1, h, w]`` map from the
    output dict of :class:`~monai_elvis.networks.ElvisNet`. The phrase is its first sentence's projected feature
    ``t_0`` (``text_feature="sentence"``) or its projected global feature ``t`` (``"global"``: the text
    encoder's [CLS], the feature the global alignment trains). ``similarity="dot"`` leaves the regions unnormalised
    (``<v_i, t / |t|>``): a region's share of the image-phrase score when the global feature pools the regions, as
    in class activation maps; ``"cosine"`` normalises each region.

    It is bilinearly upsampled to ``size`` when given, then smoothed by a Gaussian of standard deviation ``sigma``
    pixels (of that size; 0: none), then min-max scaled per image to ``[0, 1]`` when ``normalize``.
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
        heat = F.interpolate(heat, size=tuple(size), mode="bilinear", align_corners=False)
    if sigma > 0:
        heat = GaussianFilter(2, sigma).to(heat.device)(heat)
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
    """

    def __init__(self, normalize: bool = True, sigma: float = 0.0, text_feature: str = "sentence",
                 similarity: str = "cosine") -> None:  # fmt: skip
        super().__init__()
        self.normalize = normalize
        self.sigma = float(sigma)
        self.text_feature = text_feature
        self.similarity = similarity

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not args and not kwargs:
            kwargs = self._text_from_meta(inputs)
        out = network(inputs, *args, **kwargs)
        return region_similarity_map(out, tuple(inputs.shape[-2:]), self.normalize, self.sigma, self.text_feature,
                                     self.similarity)

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
