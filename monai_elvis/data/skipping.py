"""A cache dataset that skips and counts bad samples instead of stopping a long run; its cache in memory or on disk."""

from __future__ import annotations

import logging
import enum
import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from typing import Any

from monai.data import CacheDataset, PersistentDataset

from monai_elvis.errors import UsageError

__all__ = ["SkippingCacheDataset", "BadSampleLimitError"]

logger = logging.getLogger(__name__)


def _root_cause(error: BaseException) -> BaseException:
    """The transform's own error, unwrapped from MONAI's ``RuntimeError("applying transform ...")``."""
    while isinstance(error, RuntimeError) and str(error).startswith("applying transform") and error.__cause__:
        error = error.__cause__
    return error


def _allow_monai_enums_in_cache_files() -> None:
    """Let ``torch.load(weights_only=True)`` read the MONAI enums a cached MetaTensor's metadata and applied
    operations hold (``TraceKeys``, ``SpaceKeys``, ...). Without them every cache file fails to load and
    :class:`~monai.data.PersistentDataset` deletes and recomputes it on each read (with a "corrupt cache file"
    warning), so the disk cache would never be used. Enums build no other objects when unpickled."""
    import torch
    from monai.utils import enums

    torch.serialization.add_safe_globals(
        [v for v in vars(enums).values() if isinstance(v, type) and issubclass(v, enum.Enum)]
    )


class _DiskCache(PersistentDataset):
    """MONAI's :class:`~monai.data.PersistentDataset` keeping the MetaTensors (as the in-memory cache does), with
    the deterministic transforms' settings in the cache files' names (pickle hash): a cache made for another image
    size or pipeline is not reused."""

    def __init__(self, data: Sequence, transform: Callable, cache_dir: str | os.PathLike) -> None:
        from monai.data.utils import pickle_hashing
        from monai.transforms import RandomizableTrait, Transform

        _allow_monai_enums_in_cache_files()
        super().__init__(data=data, transform=transform, cache_dir=cache_dir, track_meta=True)
        # not MONAI's hash_transform: it goes through Compose.flatten(), whose new Compose reseeds every random
        # transform of the pipeline (from the global seed), so that the augmentations would differ from the
        # in-memory cache's
        deterministic = []
        for t in self.transform.transforms:
            if isinstance(t, RandomizableTrait) or not isinstance(t, Transform):
                break
            deterministic.append(t)
        self.transform_hash = pickle_hashing(deterministic).decode("utf-8")


class BadSampleLimitError(UsageError, RuntimeError):
    """More bad samples than allowed were met; the message names the last one, its error and what to do."""


class SkippingCacheDataset(CacheDataset):
    """:class:`monai.data.CacheDataset` that turns a sample whose transforms fail (an unreadable image, an empty
    report, ...) into ``None`` — which :func:`monai_elvis.data.collate_reports` drops — and logs and counts it;
    past ``max_skips`` bad samples it raises :class:`BadSampleLimitError`.

    The cache is filled at run time (``runtime_cache=True`` by default), so that a bad file is met by
    ``__getitem__`` and not by the constructor. The count is shared by the DataLoader workers forked from the
    process that built the dataset.

    With ``cache_dir``, the cache is on disk instead: the output of the deterministic transforms (those before the
    first random one) is written there once per item, as MONAI's :class:`~monai.data.PersistentDataset` does, and
    read back on later epochs and runs; nothing is held in memory (``cache_rate`` is not used), so memory stays
    bounded whatever the size of the dataset. The files' names hash the item and the deterministic transforms'
    settings, so one folder can serve several pipelines and image sizes; delete it to free the disk. An empty
    string or ``None`` keeps the in-memory cache.

    Args:
        data, transform, cache_rate, num_workers, ...: as for :class:`~monai.data.CacheDataset`.
        max_skips: the most bad samples tolerated (0: the first one stops the run).
        name_key: the entry's key that names it in the log (its image path by default).
        cache_dir: a folder for the disk cache (created if missing); ``""`` or ``None``: in memory.
    """

    def __init__(self, data: Sequence, transform: Callable | None = None, max_skips: int = 10,
                 name_key: str = "image", runtime_cache: Any = True, cache_dir: str | os.PathLike | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        self.disk_cache: _DiskCache | None = None
        if cache_dir:
            if transform is None:
                raise ValueError("cache_dir needs a transform: the disk cache holds the output of its deterministic "
                                 "part.")  # fmt: skip
            kwargs["cache_rate"], kwargs["cache_num"] = 0.0, 0
        super().__init__(data=data, transform=transform, runtime_cache=runtime_cache, **kwargs)
        if cache_dir:
            self.disk_cache = _DiskCache(self.data, self.transform, cache_dir)
        self.max_skips = max_skips
        self.name_key = name_key
        self._skipped = mp.Value("i", 0)

    def set_data(self, data: Sequence) -> None:
        super().set_data(data)
        if self.disk_cache is not None:  # the cache files are named by their items: they stay valid
            self.disk_cache.data = self.data

    @property
    def skipped(self) -> int:
        """Bad samples met so far (over every worker)."""
        return int(self._skipped.value)

    def _transform(self, index: int):
        try:
            if self.disk_cache is not None:
                return self.disk_cache._transform(index)
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
