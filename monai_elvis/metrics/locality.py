"""Locality preservation: does projection keep the similarity structure between the regions of an image?"""

from __future__ import annotations

import torch
from monai.utils import MetricReduction

from monai_elvis.metrics.base import ReducedIterationMetric

from monai_elvis.utils import check_batch, check_ndim, l2_normalize

__all__ = ["locality_preservation", "LocalityPreservationMetric"]


def locality_preservation(pre: torch.Tensor, post: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation, per image, between its region-to-region cosine similarities before and after projection.

    The measure behind the ELVIS paper's Figure 1 claim: it stays high when the projection keeps the locality
    of the encoder's features and drops when it makes neighbouring regions dissimilar. Only pairs of
    different regions count (the diagonal is always 1).

    Shapes: ``pre [B, N, C]`` (e.g. ``h_i``), ``post [B, N, d]`` (``v_i``) -> ``[B]``.
    """
    check_ndim(pre, "pre", 3, "[B, N, C]")
    check_ndim(post, "post", 3, "[B, N, d]")
    check_batch([("pre", pre), ("post", post)])
    if pre.shape[1] != post.shape[1] or pre.shape[1] < 3:
        raise ValueError(f"pre {tuple(pre.shape)} and post {tuple(post.shape)} need the same N >= 3 regions.")
    n = pre.shape[1]
    iu = torch.triu_indices(n, n, offset=1, device=pre.device)

    def pairs(x: torch.Tensor) -> torch.Tensor:
        h = l2_normalize(x.float())
        return torch.bmm(h, h.transpose(1, 2))[:, iu[0], iu[1]]  # [B, N(N-1)/2]

    a, b = pairs(pre), pairs(post)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=eps)


class LocalityPreservationMetric(ReducedIterationMetric):
    """:func:`locality_preservation` accumulated over batches: ``metric(y_pred=pre, y=post)``, then
    ``aggregate()`` (mean over images by default)."""

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN) -> None:
        super().__init__(reduction)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if y is None:
            raise ValueError("LocalityPreservationMetric needs y_pred (pre-projection) and y (projected) features.")
        return locality_preservation(y_pred, y)[:, None]
