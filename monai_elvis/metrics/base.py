"""A per-item metric reduced over everything accumulated."""

from __future__ import annotations

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

__all__ = ["ReducedIterationMetric"]


class ReducedIterationMetric(CumulativeIterationMetric):
    """Base of metrics that compute one value per batch item (``_compute_tensor`` -> ``[B, 1]``) and report
    their reduction (mean by default) over everything accumulated; errors clearly when nothing was."""

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN) -> None:
        super().__init__()
        self.reduction = reduction

    def aggregate(self, reduction: MetricReduction | str | None = None) -> torch.Tensor:
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{type(self).__name__} has no values: call it on batches before aggregate().")
        value, _ = do_metric_reduction(data, reduction or self.reduction)
        return value

    def item_values(self) -> torch.Tensor:
        """The value of every item accumulated, ``[N]`` (NaN where an item could not be scored): what the mean
        reduction averages, for resampling (e.g. a bootstrap interval) or paired comparisons."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{type(self).__name__} has no values: call it on batches first.")
        return data.detach().float().flatten().cpu()
