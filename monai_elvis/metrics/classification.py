"""AUROC of multi-label classification: per class as one tensor, mean over the classes that can be scored, and
labels that can be left out."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.metrics import ROCAUCMetric, compute_roc_auc
from monai.utils import Average

__all__ = ["MultiLabelROCAUCMetric"]


class MultiLabelROCAUCMetric(ROCAUCMetric):
    """MONAI's :class:`~monai.metrics.ROCAUCMetric` (same buffers, same per-class AUC by
    :func:`~monai.metrics.compute_roc_auc`) for multi-label outputs ``[B, K]``, with three differences:

    - ``average="none"`` returns a tensor ``[K]`` (``ROCAUCMetric`` returns a list, of which MONAI's
      ``IgniteMetricHandler`` keeps only the first value);
    - ``average="macro"`` is the mean over the classes whose labels hold both 0 and 1 (``ROCAUCMetric``'s mean is
      NaN as soon as one class is absent from the evaluated set, as in a small test split); NaN when none does;
    - with ``ignore_value``, each class's AUC is computed over the samples whose label for that class is not
      ``ignore_value`` (CheXpert's uncertain labels under the ``"ignore"`` policy).

    Args:
        average: ``"macro"`` or ``"none"`` (per class; NaN for a class without both labels).
        ignore_value: the label value to leave out; ``None``: every label counts (values other than 0 and 1
            make that class NaN, as in ``ROCAUCMetric``).

    A single class (a binary task, ``[B, 1]``) gives a scalar for either average.
    """

    def __init__(self, average: Average | str = Average.MACRO, ignore_value: float | None = None) -> None:
        super().__init__(average=average)
        if Average(average) not in (Average.MACRO, Average.NONE):
            raise ValueError(f"average must be 'macro' or 'none', got {average!r}.")
        self.ignore_value = ignore_value

    def per_class(self) -> torch.Tensor:
        """The AUC of each class ``[K]`` over the buffers (NaN for a class that cannot be scored)."""
        y_pred, y = self.get_buffer()
        if not isinstance(y_pred, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise ValueError("y_pred and y must be PyTorch Tensor.")
        y_pred, y = y_pred.reshape(len(y_pred), -1), y.reshape(len(y), -1)
        if y_pred.shape != y.shape:
            raise ValueError(f"predictions {tuple(y_pred.shape)} and labels {tuple(y.shape)} differ in shape.")
        aucs = []
        for k in range(y.shape[1]):
            keep = y[:, k] == y[:, k] if self.ignore_value is None else y[:, k] != self.ignore_value
            labels = y[keep, k]
            binary = bool(((labels == 0) | (labels == 1)).all())
            scorable = labels.numel() > 0 and binary and labels.unique().numel() == 2
            aucs.append(compute_roc_auc(y_pred[keep, k], labels) if scorable else float("nan"))
        return torch.tensor(aucs, dtype=torch.float64)

    def aggregate(self, average: Average | str | None = None) -> torch.Tensor:  # type: ignore[override]
        average = Average(average or self.average)
        aucs = self.per_class()
        if average == Average.NONE:
            return aucs if len(aucs) > 1 else aucs[0]
        scored = aucs[~aucs.isnan()]
        if len(scored) < len(aucs):
            warnings.warn(f"AUROC: {len(aucs) - len(scored)} of {len(aucs)} classes lack positives or negatives and "
                          "are left out of the mean.", stacklevel=2)  # fmt: skip
        return scored.mean() if len(scored) else torch.tensor(float("nan"), dtype=torch.float64)
