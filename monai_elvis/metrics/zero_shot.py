"""Evaluation with text prompts: zero-shot classification, class-aware retrieval and phrase sensitivity.

Each measure comes with its chance level (the ``chance()`` method of the metric classes, read by
:class:`~monai_elvis.engines.ChanceLevelHandler`), so that a log or a ``metrics.json`` says whether a figure means anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from monai.metrics import Cumulative, compute_roc_auc

from monai_elvis.utils import check_batch, check_ndim, l2_normalize

logger = logging.getLogger(__name__)

__all__ = [
    "TextEmbedder", "FINDING_PROMPTS", "SIDE_PHRASES", "zero_shot_scores", "zero_shot_auc", "class_precision_at_k",
    "class_precision_per_query", "class_precision_chance", "map_correlation", "ZeroShotClassificationMetric", "ClassAwareRetrievalMetric",
    "PhraseSensitivityMetric",
]  # fmt: skip

TextEmbedder = Callable[[Sequence[str]], Mapping[str, torch.Tensor]]
"""``embed(phrases) -> {"global": [P, d], "sentence": [P, d]}``: projected report-level and first-sentence
embeddings of each phrase (see :class:`monai_elvis.engines.PromptEncoder`)."""

_LOBES = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe")

# finding kind -> (positive prompts, negative prompts): one positive per place the phantom puts the finding (a
# class scores by its best-matching positive, so "left" and "right" prompts do not blur into each other)
FINDING_PROMPTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "nodule": (tuple(f"nodule in the {lobe}" for lobe in _LOBES), ("no pulmonary nodules or masses",)),
    "opacity": (tuple(f"consolidation in the {lobe}" for lobe in _LOBES), ("no focal consolidation",)),
    "effusion": (("right pleural effusion", "left pleural effusion"), ("no pleural effusion",)),
    "pneumothorax": (("right pneumothorax", "left pneumothorax"), ("no pneumothorax",)),
    "cardiomegaly": (("the heart is enlarged", "enlarged cardiac silhouette"), ("heart size is normal",)),
    "atelectasis": (tuple(f"atelectasis in the {lobe}" for lobe in _LOBES), ("no atelectasis",)),
}  # fmt: skip

# phrases for the phrase-sensitivity measure: (phrase, side named or "")
SIDE_PHRASES: tuple[tuple[str, str], ...] = (
    ("left pleural effusion", "left"), ("right pleural effusion", "right"),
    ("right upper lobe nodule", "right"), ("left upper lobe nodule", "left"),
    ("right pneumothorax", "right"), ("left pneumothorax", "left"),
    ("cardiomegaly", ""),
)  # fmt: skip


def zero_shot_scores(image: torch.Tensor, positive: torch.Tensor | Sequence[torch.Tensor],
                     negative: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """Per image and class, the cosine similarity to the class's best-matching positive prompt minus that to its
    best-matching negative prompt.

    Shapes: ``image [N, d]``; ``positive`` and ``negative`` either ``[K, d]`` (one prompt per class) or ``K``
    tensors ``[P_k, d]`` (several prompts per class) -> ``[N, K]``.
    """
    check_ndim(image, "image", 2, "[N, d]")
    img = l2_normalize(image.float())

    def best(prompts) -> torch.Tensor:
        groups = [p[None] for p in prompts] if isinstance(prompts, torch.Tensor) else list(prompts)
        return torch.stack([(img @ l2_normalize(g.float().to(img.device)).T).amax(1) for g in groups], dim=1)

    return best(positive) - best(negative)


def zero_shot_auc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ROC AUC per class (MONAI's :func:`~monai.metrics.compute_roc_auc`) of ``scores [N, K]`` against binary
    ``labels [N, K]`` -> ``[K]``; NaN for a class whose labels are all equal."""
    check_batch([("scores", scores), ("labels", labels)])
    out = torch.full((scores.shape[1],), float("nan"))
    for k in range(scores.shape[1]):
        y = labels[:, k].float()
        if 0 < y.sum() < len(y):
            out[k] = float(compute_roc_auc(scores[:, k].float().cpu(), y.cpu()))
    return out


def _same_set(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, None, :].bool() == labels[None, :, :].bool()).all(-1)


def class_precision_at_k(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Image-to-report precision@K that respects duplicates: the share of the ``k`` reports ranked nearest each
    image (cosine similarity; its own report included) whose set of classes equals the image's.

    Shapes: ``image [N, d]``, ``text [N, d]``, ``labels [N, K]`` (multi-hot classes of each pair) -> scalar.
    """
    return class_precision_per_query(image, text, labels, k).mean()


def class_precision_per_query(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, k: int = 10) -> torch.Tensor:
    """:func:`class_precision_at_k` of each image as the query, ``[N]`` (their mean is the precision@K)."""
    check_ndim(image, "image", 2, "[N, d]")
    n = check_batch([("image", image), ("text", text), ("labels", labels)])
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}.")
    sim = l2_normalize(image.float()) @ l2_normalize(text.float()).T
    top = sim.topk(k, dim=1).indices  # [N, k]
    return _same_set(labels).gather(1, top).float().mean(1)


def class_precision_chance(labels: torch.Tensor) -> torch.Tensor:
    """Expected :func:`class_precision_at_k` of a random ranking: the mean share of reports with the same class
    set as each image (its own included). Shapes: ``labels [N, K]`` -> scalar."""
    return _same_set(labels).float().mean()


def map_correlation(maps: torch.Tensor) -> torch.Tensor:
    """Mean Pearson correlation between the maps of different phrases on the same image.

    Shapes: ``maps [B, P, N]`` (``P >= 2`` phrases, ``N`` regions) -> ``[B]``. 1 when the map ignores the phrase.
    """
    check_ndim(maps, "maps", 3, "[B, P, N]")
    p = maps.shape[1]
    if p < 2:
        raise ValueError(f"map_correlation needs at least 2 phrases, got maps {tuple(maps.shape)}.")
    x = maps.float() - maps.float().mean(-1, keepdim=True)
    x = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    corr = torch.bmm(x, x.transpose(1, 2))  # [B, P, P]
    iu = torch.triu_indices(p, p, offset=1)
    return corr[:, iu[0], iu[1]].mean(1)


def _buffers(metric: Cumulative) -> list:
    """The metric's accumulated tensors as a list (MONAI returns a lone buffer as a tensor, not a list)."""
    buffers = metric.get_buffer()
    return [buffers] if isinstance(buffers, torch.Tensor) else list(buffers or [])


def _has_data(metric: Cumulative) -> bool:
    buffers = _buffers(metric)
    return len(buffers) > 0 and buffers[0] is not None and len(buffers[0]) > 0


def _accumulated(metric: Cumulative) -> list[torch.Tensor]:
    if not _has_data(metric):
        raise ValueError(f"{type(metric).__name__} has nothing to aggregate: call it on batches first.")
    return _buffers(metric)


def _warn_no_labels(name: str) -> None:
    logger.warning("%s: no batch had class labels ('class_label'), so it reports NaN; give the datalist entries a "
                   "'findings' list of class names to measure it.", name)  # fmt: skip


class _PromptMetric(Cumulative):
    """Accumulates per-batch tensors; embeds its prompts with ``embed`` when aggregated (with the network as it
    is then)."""

    def __init__(self, embed: TextEmbedder) -> None:
        super().__init__()
        self.embed = embed

    def _data(self) -> list[torch.Tensor]:
        return _accumulated(self)


class ZeroShotClassificationMetric(_PromptMetric):
    """Zero-shot classification AUC: ``metric(y_pred=image_global [B, d], y=labels [B, K])`` per batch, then
    ``aggregate()`` returns the AUC per class ``[K]`` (``reduction="none"``) or their mean (``"mean"``, default).

    Each class is scored by :func:`zero_shot_scores`: the image's similarity to the best-matching of the class's
    positive prompts minus that to its negative prompt (GLoRIA's and BioViL's prompt protocol, with a
    negative prompt per class as the phantom's reports state absent findings, and the best positive rather than
    the mean, since the positives name places an image shows one of). Chance: 0.5.

    Args:
        embed: a :data:`TextEmbedder` (the network's projected global text embedding is used).
        prompts: ``{class: (positive prompts, negative prompts)}`` in the order of the label columns
            (default :data:`FINDING_PROMPTS`).
    """

    def chance(self) -> float:
        """0.5: the AUC of scores unrelated to the labels."""
        return 0.5

    def __init__(self, embed: TextEmbedder, prompts: Mapping[str, tuple[Sequence[str], Sequence[str]]] | None = None,
                 reduction: str = "mean") -> None:  # fmt: skip
        super().__init__(embed)
        self.prompts = dict(prompts or FINDING_PROMPTS)
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")
        self.reduction = reduction

    def __call__(self, y_pred: torch.Tensor, y: torch.Tensor | None) -> None:
        if y is None:  # a dataset without class labels: aggregate() gives NaN
            return
        if y.ndim != 2 or y.shape[1] != len(self.prompts):
            raise ValueError(f"y must be multi-hot labels [B, {len(self.prompts)}] for classes {list(self.prompts)}, "
                             f"got {None if y is None else tuple(y.shape)}.")  # fmt: skip
        self.extend(y_pred.detach().float(), y.detach().float())

    def class_embeddings(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(positives, negatives)``: per class, the embeddings ``[P_k, d]`` of its prompts."""
        pos = [self.embed(list(p))["global"].float() for p, _ in self.prompts.values()]
        neg = [self.embed(list(n))["global"].float() for _, n in self.prompts.values()]
        return pos, neg

    def aggregate(self) -> torch.Tensor:
        if not _has_data(self):
            _warn_no_labels(type(self).__name__)
            return torch.full((len(self.prompts),) if self.reduction == "none" else (), float("nan"))
        scores, labels = self.item_values()
        auc = zero_shot_auc(scores, labels)
        return auc if self.reduction == "none" else auc.nanmean()

    def item_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [N, K], labels [N, K])`` of every image accumulated (:func:`zero_shot_scores`), from which
        the AUC of any resample of the images can be recomputed."""
        image, labels = self._data()
        pos, neg = self.class_embeddings()
        return zero_shot_scores(image, pos, neg).cpu(), labels.cpu()


class ClassAwareRetrievalMetric(Cumulative):
    """Precision@K of image-to-report retrieval counting every report with the same class set as a hit
    (:func:`class_precision_at_k`): ``metric(image [B, d], text [B, d], labels [B, K])`` or, for MONAI's
    :class:`~monai.handlers.IgniteMetricHandler`, ``metric(y_pred=(image, text), y=labels)``.

    ``aggregate()`` returns the precision; :meth:`chance` the expected precision of a random ranking of the
    same data (:func:`class_precision_chance`)."""

    def __init__(self, k: int = 10) -> None:
        super().__init__()
        self.k = k

    def __call__(self, y_pred, y: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> None:
        if isinstance(y_pred, (tuple, list)):
            (image, text), labels = y_pred, y
        else:
            image, text = y_pred, y
        if labels is None:  # a dataset without class labels: aggregate() gives NaN
            return
        self.extend(image.detach().float(), text.detach().float(), labels.detach().float())

    def _data(self) -> list[torch.Tensor]:
        return _accumulated(self)

    def aggregate(self) -> torch.Tensor:
        if not _has_data(self):
            _warn_no_labels(type(self).__name__)
            return torch.tensor(float("nan"))
        return self.item_values().mean()

    def item_values(self) -> torch.Tensor:
        """The precision@K of each image as the query, ``[N]``; NaN-free, their mean is :meth:`aggregate`."""
        image, text, labels = self._data()
        return class_precision_per_query(image, text, labels, min(self.k, len(image))).cpu()

    def chance(self) -> float:
        return float(class_precision_chance(self._data()[2])) if _has_data(self) else float("nan")


class PhraseSensitivityMetric(_PromptMetric):
    """Do grounding maps depend on the phrase? ``metric(y_pred=image_local [B, N, d])`` per batch (projected
    regions), then ``aggregate()``: the mean :func:`map_correlation` over images of the region-similarity maps of
    ``phrases`` (1: the map ignores the phrase; lower is better).

    Whether a side-specific phrase peaks on its side is measured on the grounding rows, where the finding is
    present (:func:`~monai_elvis.metrics.peak_side`).

    Args:
        embed: a :data:`TextEmbedder` (the projected first-sentence embedding is used, as the grounding
            inferer does).
        phrases: ``(phrase, side)`` pairs, side ``"left"``, ``"right"`` or ``""`` (default :data:`SIDE_PHRASES`).
        text_feature: the phrase embedding, ``"sentence"`` or ``"global"``, as the grounding inferer uses.
    """

    def chance(self) -> float:
        """1.0: the correlation of maps that ignore the phrase."""
        return 1.0

    def __init__(self, embed: TextEmbedder, phrases: Sequence[tuple[str, str]] = SIDE_PHRASES,
                 text_feature: str = "sentence") -> None:  # fmt: skip
        super().__init__(embed)
        self.phrases = [(str(p), str(s)) for p, s in phrases]
        if len(self.phrases) < 2:
            raise ValueError("PhraseSensitivityMetric needs at least 2 phrases.")
        if text_feature not in ("sentence", "global"):
            raise ValueError(f"text_feature must be 'sentence' or 'global', got {text_feature!r}.")
        self.text_feature = text_feature
        bad = [s for _, s in self.phrases if s not in ("left", "right", "")]
        if bad:
            raise ValueError(f"phrase sides must be 'left', 'right' or '', got {bad}.")

    def __call__(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> None:
        check_ndim(y_pred, "y_pred", 3, "[B, N, d]")
        self.extend(y_pred.detach().float())

    def maps(self) -> torch.Tensor:
        """``[B, P, N]`` cosine similarity of every accumulated image's regions to every phrase."""
        (regions,) = self._data()
        text = l2_normalize(self.embed([p for p, _ in self.phrases])[self.text_feature].float()).to(regions.device)
        return torch.einsum("bnd,pd->bpn", l2_normalize(regions), text)

    def aggregate(self) -> torch.Tensor:
        return self.item_values().mean()

    def item_values(self) -> torch.Tensor:
        """The :func:`map_correlation` of each image accumulated, ``[N]``."""
        return map_correlation(self.maps()).cpu()
