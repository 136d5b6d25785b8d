"""Phrase grounding: how well a similarity heatmap picks out the annotated boxes (MS-CXR protocol)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.utils import MetricReduction

from monai_elvis.metrics.base import ReducedIterationMetric

__all__ = [
    "grounding_cnr", "pointing_game", "peak_side", "heatmap_iou", "heatmap_miou", "GroundingMetric", "MIOU_THRESHOLDS",
]  # fmt: skip

MIOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)


def _prepare(heatmap: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``heatmap [B, (1,) W, H]``, ``mask [B, (K,) W, H]`` -> ``h [B, P]`` (NaN set to 0), ``boxes [B, K, P]`` bool
    restricted to finite heatmap pixels, ``valid [B, P]`` (the finite pixels)."""
    if heatmap.shape[-2:] != mask.shape[-2:] or heatmap.shape[0] != mask.shape[0]:
        raise ValueError(f"heatmap {tuple(heatmap.shape)} and mask {tuple(mask.shape)} differ in B, W or H.")
    # plain tensors: MONAI's MetaTensor would copy its metadata through every operation below
    heatmap, mask = torch.as_tensor(heatmap).as_subclass(torch.Tensor), torch.as_tensor(mask).as_subclass(torch.Tensor)
    b = heatmap.shape[0]
    if heatmap.ndim == 4 and heatmap.shape[1] != 1 or heatmap.ndim not in (3, 4):
        raise ValueError(f"heatmap must be [B, 1, W, H] or [B, W, H], got {tuple(heatmap.shape)}.")
    if mask.ndim not in (3, 4):
        raise ValueError(f"mask must be [B, K, W, H] (one channel per box) or [B, W, H], got {tuple(mask.shape)}.")
    h = heatmap.reshape(b, -1).float()
    valid = torch.isfinite(h)
    boxes = mask.reshape(b, mask.shape[1] if mask.ndim == 4 else 1, -1).bool() & valid[:, None]
    return torch.where(valid, h, torch.zeros_like(h)), boxes, valid


def _scorable(boxes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, K]``: a box with pixels inside the valid area and valid pixels outside it can be scored."""
    n_in = boxes.sum(-1)
    return (n_in > 0) & (n_in < valid.sum(-1, keepdim=True))


def _check(ok: torch.Tensor) -> None:
    bad = (~ok).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"mask of batch item(s) {bad} is empty or covers the whole image (within finite heatmap pixels).")


def grounding_cnr(heatmap: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Contrast-to-noise ratio ``|mean_in - mean_out| / sqrt(var_in + var_out)`` of a heatmap inside vs outside
    each annotated box, averaged over the boxes of an item (the MS-CXR measure of Boecking et al., "Making the
    Most of Text Semantics to Improve Biomedical Vision-Language Processing", ECCV 2022).

    Shapes: ``heatmap [B, (1,) W, H]``, ``mask [B, K, W, H]`` (one channel per box; all-zero channels pad items
    with fewer boxes) or ``[B, W, H]`` (one region) -> ``[B]``. Population variances. Non-finite heatmap pixels
    (e.g. NaN padding) belong to neither side.
    """
    h, boxes, valid = _prepare(heatmap, mask)
    ok = _scorable(boxes, valid)
    _check(ok.any(1))
    inside = boxes.float()  # [B, K, P]
    outside = (valid[:, None] & ~boxes).float()
    n_in, n_out = inside.sum(-1).clamp(min=1), outside.sum(-1).clamp(min=1)
    hk = h[:, None]
    mean_in, mean_out = (hk * inside).sum(-1) / n_in, (hk * outside).sum(-1) / n_out
    var_in = (((hk - mean_in[..., None]) ** 2) * inside).sum(-1) / n_in
    var_out = (((hk - mean_out[..., None]) ** 2) * outside).sum(-1) / n_out
    cnr = (mean_in - mean_out).abs() / (var_in + var_out + eps).sqrt()  # [B, K]
    return (cnr * ok).sum(1) / ok.sum(1)


def pointing_game(heatmap: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 where the heatmap's maximum (over finite pixels) lies inside any box, else 0. -> ``[B]``."""
    h, boxes, valid = _prepare(heatmap, mask)
    _check(_scorable(boxes, valid).any(1))
    peak = torch.where(valid, h, torch.full_like(h, -torch.inf)).argmax(1, keepdim=True)
    return boxes.any(1).gather(1, peak)[:, 0].float()


def peak_side(heatmap: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 where the heatmap's maximum lies in the same half of the image (left or right of the vertical midline)
    as the boxes, 0 where it lies in the other half, NaN where the boxes are not all in one half (a finding
    across the midline, such as cardiomegaly, has no side). -> ``[B]``; chance 0.5.

    The maps are in MONAI's ``(x, y)`` order (``[B, (K,) W, H]``, as :class:`~monai_elvis.transforms.LoadCXR`
    gives images): left and right of the vertical midline are the two halves of the *first* spatial axis."""
    h, boxes, valid = _prepare(heatmap, mask)
    _check(_scorable(boxes, valid).any(1))
    width, height = heatmap.shape[-2], heatmap.shape[-1]
    xs = torch.arange(h.shape[1], device=h.device) // height  # the x of each pixel of the flattened (x, y) map
    right = xs >= (width + 1) // 2  # the middle column of an odd width belongs to neither half
    left = xs < width // 2
    region = boxes.any(1)
    in_left, in_right = (region & left).any(1), (region & right).any(1)
    across = (region & ~left & ~right).any(1) | (in_left & in_right)
    peak = torch.where(valid, h, torch.full_like(h, -torch.inf)).argmax(1, keepdim=True)
    hit = torch.where(in_right, right.expand_as(h).gather(1, peak)[:, 0], left.expand_as(h).gather(1, peak)[:, 0])
    return torch.where(across, torch.full_like(h[:, 0], float("nan")), hit.float())


def heatmap_iou(heatmap: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """IoU between ``heatmap >= threshold`` and the union of the boxes, over finite pixels. -> ``[B]``."""
    h, boxes, valid = _prepare(heatmap, mask)
    _check(_scorable(boxes, valid).any(1))
    region = boxes.any(1)
    pred = (h >= threshold) & valid
    return (pred & region).sum(1).float() / (pred | region).sum(1).clamp(min=1).float()


def heatmap_miou(heatmap: torch.Tensor, mask: torch.Tensor, thresholds: Sequence[float] = MIOU_THRESHOLDS) -> torch.Tensor:
    """Mean of :func:`heatmap_iou` over ``thresholds`` (0.1 to 0.5 by default, for maps scaled to ``[0, 1]``)."""
    return torch.stack([heatmap_iou(heatmap, mask, t) for t in thresholds]).mean(0)


class GroundingMetric(ReducedIterationMetric):
    """Grounding quality accumulated over batches: ``metric(y_pred=heatmap, y=mask)``, then ``aggregate()``.

    ``y_pred`` ``[B, 1, W, H]``; ``y`` ``[B, K, W, H]`` (one channel per box) or ``[B, 1, W, H]``; or lists of
    per-item ``[1, W, H]`` / ``[K, W, H]`` tensors of different sizes (as MONAI's decollated engines give).

    Args:
        metric_name: ``"cnr"``, ``"pointing"``, ``"side"`` (:func:`peak_side`), ``"iou"`` or ``"miou"``. An item
            with no box that can be scored (every box lost in resizing, or covering the image) counts as NaN,
            which the mean reduction leaves out (so does an item without a side for ``"side"``). Non-finite
            heatmap pixels are ignored.
        threshold: of ``"iou"``.
        thresholds: of ``"miou"``.
        reduction: MONAI metric reduction (mean by default).
    """

    _FUNCS = {"cnr": grounding_cnr, "pointing": pointing_game, "side": peak_side, "iou": heatmap_iou,
              "miou": heatmap_miou}  # fmt: skip

    def __init__(self, metric_name: str = "cnr", threshold: float = 0.5, thresholds: Sequence[float] = MIOU_THRESHOLDS,
                 reduction: MetricReduction | str = MetricReduction.MEAN) -> None:  # fmt: skip
        super().__init__(reduction)
        if metric_name not in self._FUNCS:
            raise ValueError(f"metric_name must be one of {sorted(self._FUNCS)}, got {metric_name!r}.")
        self.metric_name = metric_name
        self.threshold = threshold
        self.thresholds = tuple(thresholds)
        self._area: list[torch.Tensor] = []

    def reset(self) -> None:
        super().reset()
        self._area = []

    def chance(self) -> float:
        """The expected value for a map unrelated to the boxes: for ``"pointing"`` the mean share of the image the
        boxes cover (where a uniformly random peak lands), for ``"side"`` 0.5, else 0 (``"cnr"``: no contrast;
        ``"iou"``, ``"miou"``: a lower bound)."""
        if self.metric_name == "pointing":
            return float(torch.cat(self._area).mean()) if self._area else float("nan")
        return 0.5 if self.metric_name == "side" else 0.0

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if y is None:
            raise ValueError("GroundingMetric needs y (the ground-truth box masks).")
        y_pred, y = y_pred.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)
        _, boxes, valid = _prepare(y_pred, y)
        ok = _scorable(boxes, valid).any(1)
        self._area.append((boxes.any(1).sum(1).float() / valid.sum(1).clamp(min=1))[ok].cpu())
        out = torch.full((y_pred.shape[0], 1), float("nan"), device=y_pred.device)
        if ok.any():
            extra = {"iou": (self.threshold,), "miou": (self.thresholds,)}.get(self.metric_name, ())
            out[ok, 0] = self._FUNCS[self.metric_name](y_pred[ok], y[ok], *extra).to(out.dtype)
        return out
