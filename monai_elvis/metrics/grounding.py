"""Phrase grounding: how well a similarity heatmap picks out the annotated region."""

from __future__ import annotations

import torch
from monai.utils import MetricReduction

from monai_elvis.metrics.base import ReducedIterationMetric

__all__ = ["grounding_cnr", "pointing_game", "heatmap_iou", "GroundingMetric"]


def _flat(heatmap: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if heatmap.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"heatmap {tuple(heatmap.shape)} and mask {tuple(mask.shape)} differ in H, W.")
    b = heatmap.shape[0]
    h, m = heatmap.reshape(b, -1).float(), mask.reshape(b, -1).bool()
    if h.shape != m.shape:
        raise ValueError(f"heatmap {tuple(heatmap.shape)} and mask {tuple(mask.shape)} must be [B, (1,) H, W].")
    empty = (~m.any(1) | m.all(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mask of batch item(s) {empty} is empty or covers the whole image.")
    return h, m


def grounding_cnr(heatmap: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Contrast-to-noise ratio ``|mean_in - mean_out| / sqrt(var_in + var_out)`` of a heatmap inside vs outside
    the annotated region (the MS-CXR measure of Boecking et al., "Making the Most of Text Semantics to
    Improve Biomedical Vision-Language Processing", ECCV 2022).

    Shapes: ``heatmap [B, (1,) H, W]``, ``mask [B, (1,) H, W]`` -> ``[B]``. Variances are population variances.
    """
    h, m = _flat(heatmap, mask)
    mf = m.float()
    n_in, n_out = mf.sum(1), (1 - mf).sum(1)
    mean_in = (h * mf).sum(1) / n_in
    mean_out = (h * (1 - mf)).sum(1) / n_out
    var_in = (((h - mean_in[:, None]) ** 2) * mf).sum(1) / n_in
    var_out = (((h - mean_out[:, None]) ** 2) * (1 - mf)).sum(1) / n_out
    return (mean_in - mean_out).abs() / (var_in + var_out + eps).sqrt()


def pointing_game(heatmap: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 where the heatmap's maximum lies inside the mask, else 0. ``[B, (1,) H, W]`` -> ``[B]``."""
    h, m = _flat(heatmap, mask)
    return m.gather(1, h.argmax(1, keepdim=True))[:, 0].float()


def heatmap_iou(heatmap: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """IoU between ``heatmap >= threshold`` and the mask. ``[B, (1,) H, W]`` -> ``[B]``."""
    h, m = _flat(heatmap, mask)
    p = h >= threshold
    return (p & m).sum(1).float() / (p | m).sum(1).clamp(min=1).float()


class GroundingMetric(ReducedIterationMetric):
    """Grounding quality accumulated over batches: ``metric(y_pred=heatmap, y=mask)``, then ``aggregate()``.

    Args:
        metric_name: ``"cnr"``, ``"pointing"`` or ``"iou"``. An item whose mask is empty or covers the whole
            image (a box lost in resizing) counts as NaN, which the mean reduction leaves out.
        threshold: of ``"iou"``.
        reduction: MONAI metric reduction (mean by default).
    """

    _FUNCS = {"cnr": grounding_cnr, "pointing": pointing_game, "iou": heatmap_iou}

    def __init__(self, metric_name: str = "cnr", threshold: float = 0.5,
                 reduction: MetricReduction | str = MetricReduction.MEAN) -> None:  # fmt: skip
        super().__init__(reduction)
        if metric_name not in self._FUNCS:
            raise ValueError(f"metric_name must be one of {sorted(self._FUNCS)}, got {metric_name!r}.")
        self.metric_name = metric_name
        self.threshold = threshold

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if y is None:
            raise ValueError("GroundingMetric needs y (the ground-truth mask).")
        b = y_pred.shape[0]
        m = y.reshape(b, -1).bool()
        valid = m.any(1) & ~m.all(1)  # a box lost (or filling the image) after resizing cannot be scored
        out = torch.full((b, 1), float("nan"), device=y_pred.device)
        if valid.any():
            fn = self._FUNCS[self.metric_name]
            args = (self.threshold,) if self.metric_name == "iou" else ()
            out[valid, 0] = fn(y_pred[valid], y[valid], *args).to(out.dtype)
        return out
