"""Multi-label binary cross-entropy for classification transfer, with labels that can be left out."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MultiLabelBCEWithLogitsLoss"]


class MultiLabelBCEWithLogitsLoss(nn.Module):
    """Binary cross-entropy on logits over independent classes, averaged over the entries whose target is not
    ``ignore_value`` (CheXpert's uncertain labels under the ``"ignore"`` policy). Without such entries it equals
    ``torch.nn.BCEWithLogitsLoss()``.

    Args:
        ignore_value: the target value to leave out; ``None``: none is.
        pos_weight: optional ``[K]`` weight of the positive term per class, as ``BCEWithLogitsLoss``'s.

    Shapes:
        ``input`` logits ``[B, K]``, ``target`` ``[B, K]`` in ``{0, 1}`` (or ``ignore_value``) -> a scalar. A batch
        whose targets are all ignored gives 0 (with a gradient), not NaN.
    """

    def __init__(self, ignore_value: float | None = -1.0, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.ignore_value = ignore_value
        self.register_buffer("pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight).float())

    def extra_repr(self) -> str:
        return f"ignore_value={self.ignore_value}"

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(input.dtype).reshape(input.shape) if target.numel() == input.numel() else target
        if input.shape != target.shape:
            raise ValueError(f"input {tuple(input.shape)} and target {tuple(target.shape)} must have the same shape.")
        keep = torch.ones_like(target, dtype=torch.bool) if self.ignore_value is None else target != self.ignore_value
        loss = nn.functional.binary_cross_entropy_with_logits(
            input, torch.where(keep, target, torch.zeros_like(target)), pos_weight=self.pos_weight, reduction="none"
        )
        return (loss * keep).sum() / keep.sum().clamp_min(1)
