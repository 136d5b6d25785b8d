"""Paired bootstrap intervals of the difference between two objectives, over seeds and test items.

The study keeps the value of every test item of every model (``<work_dir>/items/*.json``). Two objectives are
compared on the same test items with the same seeds, so their difference is paired: each resample draws seeds
(with replacement) and test items (with replacement, the same items for both objectives and every seed), and
recomputes the statistic of each objective on them: the mean for per-item measures, the mean over classes of the
ROC AUC for zero-shot classification. The 2.5th and 97.5th percentiles of the resampled differences bound the 95%
interval; one that excludes 0 says the difference is unlikely to come from the seeds or the test items drawn.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

__all__ = ["Difference", "load_items", "paired_bootstrap", "mean_auc"]


@dataclass(frozen=True)
class Difference:
    """``a - b`` of a statistic (mean over seeds), with its 95% bootstrap interval ``[low, high]``."""

    value: float
    low: float
    high: float
    seeds: int
    items: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (False when it could not be computed)."""
        return bool(self.low > 0 or self.high < 0)

    def __str__(self) -> str:
        if math.isnan(self.value) or math.isnan(self.low):
            return "n/a"
        return f"{self.value:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def load_items(work_dir: str | Path) -> dict[str, dict]:
    """``<work_dir>/items/<run>.json`` by run name (e.g. ``easy_elvis_s0_e8``, ``seg_elvis_s0_frozen_0.1``)."""
    folder = Path(work_dir) / "items"
    return {f.stem: json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def mean_auc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean over classes of the ROC AUC (ties counted half), for a batch of resamples.

    Shapes: ``scores [B, N, K]``, ``labels [B, N, K]`` (binary) -> ``[B]``; a class with one label value in a
    resample is left out of its mean (NaN when every class is).
    """
    ranks = rankdata(scores, axis=1)  # [B, N, K], ties averaged
    pos = labels.sum(1)  # [B, K]
    neg = labels.shape[1] - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * labels).sum(1) - pos * (pos + 1) / 2) / (pos * neg)
    auc[(pos == 0) | (neg == 0)] = np.nan
    out = np.full(len(auc), np.nan)
    some = ~np.isnan(auc).all(1)
    out[some] = np.nanmean(auc[some], axis=1)
    return out


def _check(a: Sequence, b: Sequence) -> int:
    if not a or len(a) != len(b):
        raise ValueError(f"paired_bootstrap needs the same number (>= 1) of seeds on both sides, got {len(a)} and {len(b)}.")
    sizes = {len(x[0]) if isinstance(x, tuple) else len(x) for x in [*a, *b]}
    if len(sizes) != 1:
        raise ValueError(f"every seed of both sides must have the same test items; got item counts {sorted(sizes)}.")
    return sizes.pop()


def paired_bootstrap(a: Sequence, b: Sequence, statistic: str = "mean", resamples: int = 2000,
                     seed: int = 0) -> Difference:  # fmt: skip
    """The difference ``statistic(a) - statistic(b)``, mean over seeds, and its 95% paired bootstrap interval.

    Args:
        a, b: one entry per seed (seed ``i`` of ``a`` paired with seed ``i`` of ``b``): an array ``[N]`` of
            per-item values (NaN: not scored) for ``statistic="mean"``, or a tuple ``(scores [N, K],
            labels [N, K])`` for ``"auc"`` (mean ROC AUC over classes).
        resamples: bootstrap resamples.
        seed: of the resampling.
    """
    if statistic not in ("mean", "auc"):
        raise ValueError(f"statistic must be 'mean' or 'auc', got {statistic!r}.")
    with warnings.catch_warnings():  # items or resamples with nothing scored give NaN, said by the result
        warnings.simplefilter("ignore", RuntimeWarning)
        return _paired_bootstrap(a, b, statistic, resamples, seed)


def _paired_bootstrap(a: Sequence, b: Sequence, statistic: str, resamples: int, seed: int) -> Difference:
    n = _check(a, b)
    s = len(a)
    rng = np.random.default_rng(seed)
    items = rng.integers(0, n, size=(resamples, n))
    seeds = rng.integers(0, s, size=(resamples, s))
    if statistic == "mean":
        diff = np.array([np.asarray(x, float) - np.asarray(y, float) for x, y in zip(a, b)])  # [S, N]
        point = float(np.mean([np.nanmean(d) for d in diff]))
        drawn = diff[:, items]  # [S, B, N]
        scored = (~np.isnan(drawn)).sum(2)
        per_seed = np.where(scored > 0, np.nansum(drawn, axis=2) / np.maximum(scored, 1), np.nan)  # [S, B]
    else:
        def stat(x: tuple) -> np.ndarray:
            scores, labels = np.asarray(x[0], float), np.asarray(x[1], float)
            return mean_auc(scores[items], labels[items])  # [B]

        def full(x: tuple) -> float:
            return float(mean_auc(np.asarray(x[0], float)[None], np.asarray(x[1], float)[None])[0])

        point = float(np.mean([full(x) - full(y) for x, y in zip(a, b)]))
        per_seed = np.stack([stat(x) - stat(y) for x, y in zip(a, b)])  # [S, B]
    boot = np.nanmean(per_seed[seeds.T, np.arange(resamples)], axis=0)  # [B]: the drawn seeds' mean
    if np.isnan(boot).all():
        return Difference(point, math.nan, math.nan, s, n)
    low, high = np.nanpercentile(boot, [2.5, 97.5])
    return Difference(point, float(low), float(high), s, n)
