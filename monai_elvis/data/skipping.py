"""A cache dataset that skips and counts bad samples instead of stopping a long run."""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Callable, Sequence
from typing import Any

from monai.data import CacheDataset

from monai_elvis.errors import UsageError

__all__ = ["SkippingCacheDataset", "BadSampleLimitError"]

logger = logging.getLogger(__name__)


def _root_cause(error: BaseException) -> BaseException:
    """The transform's own error, unwrapped from MONAI's ``RuntimeError("applying transform ...")``."""
    while isinstance(error, RuntimeError) and str(error).startswith("applying transform") and error.__cause__:
        error = error.__cause__
    return error


class BadSampleLimitError(UsageError, RuntimeError):
    """More bad samples than allowed were met; the message names the last one, its error and what to do."""


class SkippingCacheDataset(CacheDataset):
    """:class:`monai.data.CacheDataset` that turns a sample whose transforms fail (an unreadable image, an empty
    report, ...) into ``None`` — which :func:`monai_elvis.data.collate_reports` drops — and logs and counts it;
    past ``max_skips`` bad samples it raises :class:`BadSampleLimitError`.

    The cache is filled at run time (``runtime_cache=True`` by default), so that a bad file is met by
    ``__getitem__`` and not by the constructor. The count is shared by the DataLoader workers forked from the
    process that built the dataset.

    Args:
        data, transform, cache_rate, num_workers, ...: as for :class:`~monai.data.CacheDataset`.
        max_skips: the most bad samples tolerated (0: the first one stops the run).
        name_key: the entry's key that names it in the log (its image path by default).
    """

    def __init__(self, data: Sequence, transform: Callable | None = None, max_skips: int = 10,
                 name_key: str = "image", runtime_cache: Any = True, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(data=data, transform=transform, runtime_cache=runtime_cache, **kwargs)
        self.max_skips = max_skips
        self.name_key = name_key
        self._skipped = mp.Value("i", 0)

    @property
    def skipped(self) -> int:
        """Bad samples met so far (over every worker)."""
        return int(self._skipped.value)

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except Exception as error:  # any failure of loading or transforming one sample
            e = _root_cause(error)
            item = self.data[index]
            name = item.get(self.name_key, index) if isinstance(item, dict) else index
            with self._skipped.get_lock():
                self._skipped.value += 1
                count = self._skipped.value
            if count > self.max_skips:
                raise BadSampleLimitError(
                    f"{count} bad samples, more than max_skips={self.max_skips}; the last, {name}: "
                    f"{type(e).__name__}: {e}. Repair or remove the files named in the warnings above (or their "
                    "datalist entries), or allow more with --max_bad_samples N."
                ) from error
            logger.warning("skipped bad sample %s (%d of at most %d): %s: %s", name, count, self.max_skips,
                           type(e).__name__, e)  # fmt: skip
            return None
