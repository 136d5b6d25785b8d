"""Image <-> report retrieval recall@K."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.metrics import Cumulative

from monai_elvis.utils import check_batch, check_ndim, l2_normalize

__all__ = ["retrieval_ranks", "retrieval_recall", "RetrievalRecallMetric"]


def retrieval_ranks(image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank of each pair's match among the candidates, image-to-report and report-to-image: the number of
    *other* candidates scoring at least as high under cosine similarity (ties count against the match).

    Shapes: ``image [N, d]``, ``text [N, d]`` -> ``(rank_i2t [N], rank_t2i [N])``, 0 for a match ranked first.
    """
    check_ndim(image, "image", 2, "[N, d]")
    check_ndim(text, "text", 2, "[N, d]")
    n = check_batch([("image", image), ("text", text)])
    sim = l2_normalize(image.float()) @ l2_normalize(text.float()).T
    diag = sim.diagonal()
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    return ((sim >= diag[:, None]) & ~eye).sum(1), ((sim >= diag[None, :]) & ~eye).sum(0)


def retrieval_recall(image: torch.Tensor, text: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K of matching pairs ``(image_i, text_i)`` under cosine similarity, both directions.

    The rank of the match is the number of *other* candidates scoring at least as high (ties count against
    the match, so collapsed embeddings score at chance or below, never perfectly).

    Shapes: ``image [N, d]``, ``text [N, d]``. Returns ``{"i2t_R@1": ..., "t2i_R@1": ..., ...}`` in ``[0, 1]``.
    """
    rank_i2t, rank_t2i = retrieval_ranks(image, text)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float((rank_i2t < k).float().mean())
        out[f"t2i_R@{k}"] = float((rank_t2i < k).float().mean())
    return out


class RetrievalRecallMetric(Cumulative):
    """Accumulates image and report embeddings over an evaluation and reports recall@``k``.

    ``metric(image [B, d], text [B, d])`` adds a batch (also as ``metric(y_pred=..., y=...)``, so that
    :class:`monai.handlers.IgniteMetricHandler` can drive it); ``aggregate()`` returns a scalar tensor over
    everything added (gathered across processes under DDP): image-to-report (``direction="i2t"``),
    report-to-image (``"t2i"``) or their mean (``"mean"``); ``reset()`` clears it.
    """

    def __init__(self, k: int = 1, direction: str = "mean") -> None:
        super().__init__()
        if direction not in ("i2t", "t2i", "mean"):
            raise ValueError(f"direction must be 'i2t', 't2i' or 'mean', got {direction!r}.")
        self.k = k
        self.direction = direction

    def __call__(self, y_pred: torch.Tensor, y: torch.Tensor) -> None:
        self.extend(y_pred.detach().float(), y.detach().float())

    def chance(self) -> float:
        """``k / N``: the recall@``k`` of a random ranking of the ``N`` items accumulated."""
        buffers = self.get_buffer()
        n = len(buffers[0]) if isinstance(buffers, list) and len(buffers) else 0
        return min(1.0, self.k / n) if n else float("nan")

    def aggregate(self) -> torch.Tensor:
        buffers = self.get_buffer()
        if not isinstance(buffers, list) or not len(buffers[0]):
            raise ValueError("RetrievalRecallMetric has no embeddings: call it on batches before aggregate().")
        return self.item_values().mean()

    def item_values(self) -> torch.Tensor:
        """Per pair ``[N]``: 1 where its match ranks within the top ``k`` (``direction`` "i2t" or "t2i"), or the
        mean of both directions (0, 0.5 or 1; ``"mean"``). Their mean is :meth:`aggregate`."""
        buffers = self.get_buffer()
        if not isinstance(buffers, list) or not len(buffers[0]):
            raise ValueError("RetrievalRecallMetric has no embeddings: call it on batches first.")
        rank_i2t, rank_t2i = retrieval_ranks(buffers[0], buffers[1])
        hits = {"i2t": (rank_i2t < self.k).float(), "t2i": (rank_t2i < self.k).float()}
        if self.direction == "mean":
            return ((hits["i2t"] + hits["t2i"]) / 2).cpu()
        return hits[self.direction].cpu()
