"""Image-report pairs per second through the full pre-training preprocessing, on one worker, per stage, from
full-size files and from prepared ones (``python -m monai_elvis.data prepare``)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose
from PIL import Image

from monai_elvis.data.builders import build_iu_xray
from monai_elvis.data.sources import TORCHXRAYVISION, fetch_wheel_member
from monai_elvis.keys import Keys
from monai_elvis.transforms import (
    LoadCXRd,
    RandDropSentencesd,
    RandShuffleSentencesd,
    SplitSentencesd,
    TokenizeReportd,
    cxr_augmentation,
    cxr_spatial_intensity,
    train_wordpiece_tokenizer,
)

__all__ = ["pretraining_transforms", "run_transform_benchmark", "FORMATS", "STAGES"]


def pretraining_transforms(tokenizer, size: int = 224, max_length: int = 128) -> Compose:
    """The pre-training preprocessing measured here: load, resize/pad to ``size``, augment, split, tokenise."""
    return Compose([
        LoadCXRd(Keys.IMAGE),
        *cxr_spatial_intensity(size),
        *cxr_augmentation(size),
        SplitSentencesd(Keys.REPORT),
        RandShuffleSentencesd(Keys.REPORT, prob=0.5),
        RandDropSentencesd(Keys.REPORT, prob=0.5, drop_prob=0.2),
        TokenizeReportd(Keys.REPORT, tokenizer=tokenizer, max_length=max_length),
    ])  # fmt: skip


FORMATS = ("dicom", "png16", "jpeg8", "prepared_png8", "prepared_png16", "prepared_png8_disk_cache")
STAGES = ("decode", "spatial", "augmentation", "tokenisation")


def _stages(tokenizer, size: int, max_length: int = 128) -> dict[str, Compose]:
    """:func:`pretraining_transforms` cut into the four timed stages (same transforms, same order)."""
    return {
        "decode": Compose([LoadCXRd(Keys.IMAGE)]),
        "spatial": Compose(cxr_spatial_intensity(size)),
        "augmentation": Compose(cxr_augmentation(size)),
        "tokenisation": Compose([
            SplitSentencesd(Keys.REPORT),
            RandShuffleSentencesd(Keys.REPORT, prob=0.5),
            RandDropSentencesd(Keys.REPORT, prob=0.5, drop_prob=0.2),
            TokenizeReportd(Keys.REPORT, tokenizer=tokenizer, max_length=max_length),
        ]),
    }  # fmt: skip


def run_transform_benchmark(
    n: int = 40,
    size: int = 224,
    tokenizer: str | None = None,
    progress: Callable[[str], None] | None = None,
    prepared_size: int = 512,
    clock: str = "wall",
) -> list[dict]:
    """Time the pre-training preprocessing, one process and one thread (one DataLoader worker), per stage.

    Sources: the real DICOM ``RG1_UNCR.dcm`` (1955x1841, 15 bit, MONOCHROME1) and a 16-bit PNG and an 8-bit JPEG of
    it (the MIMIC-CXR-JPG format), at full size; and the same image as the prepare step writes it
    (:func:`monai_elvis.data.prepare.prepare_image`, longest side ``prepared_size``), as an 8- and a 16-bit PNG,
    and the 8-bit one read through the disk cache (:class:`~monai_elvis.data.SkippingCacheDataset` with
    ``cache_dir``: decode and spatial stages replaced by reading their cached output). Reports: the IU X-ray reports.

    One record per format: ``{"format", "source", "pairs", "size", "pairs_per_s", "ms_per_pair", "decode_ms",
    "spatial_ms", "augmentation_ms", "tokenisation_ms"}``; the stage times are means per pair and add up to
    ``ms_per_pair``. For the disk-cache row ``decode_ms`` is the cache read and ``spatial_ms`` is 0.
    ``clock="cpu"`` times the process's CPU time instead of the elapsed time: steadier on a loaded machine, and
    without the time spent waiting for the disk.
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}.")
    timer = time.perf_counter if clock == "wall" else time.process_time
    from pydicom.data import get_testdata_file

    from monai_elvis.data.prepare import prepare_image
    from monai_elvis.data.skipping import _DiskCache

    torch.set_num_threads(1)
    say = progress or (lambda _msg: None)
    reports_tgz = fetch_wheel_member(TORCHXRAYVISION, "torchxrayvision/data/NLMCXR_reports.tgz")
    datalist, _ = build_iu_xray(reports_tgz)
    reports = [e[Keys.REPORT] for e in datalist["training"]]
    dicom = Path(get_testdata_file("RG1_UNCR.dcm"))
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer is None:
            say("training a WordPiece tokenizer on the IU X-ray reports")
            train_wordpiece_tokenizer(reports, Path(tmp) / "tok", vocab_size=4096)
            tokenizer = str(Path(tmp) / "tok")
        png = Path(tmp) / "rg1.png"
        image = LoadCXRd(Keys.IMAGE)({Keys.IMAGE: dicom})[Keys.IMAGE][0].numpy().T  # (x, y) -> as stored
        Image.fromarray((image * 65535).astype(np.uint16)).save(png)
        jpeg = Path(tmp) / "rg1.jpg"  # the MIMIC-CXR-JPG format: 8-bit JPEG
        Image.fromarray((image * 255).astype(np.uint8)).save(jpeg, quality=95)
        prepared = {bits: Path(tmp) / f"rg1_{prepared_size}_{bits}bit.png" for bits in (8, 16)}
        for bits, path in prepared.items():
            prepare_image(dicom, path, size=prepared_size, bits=bits)
        full = f"full size {image.shape[0]}x{image.shape[1]}"
        small = "x".join(str(s) for s in Image.open(prepared[8]).size[::-1])
        sources = {"dicom": (dicom, full), "png16": (png, full), "jpeg8": (jpeg, full),
                   "prepared_png8": (prepared[8], f"prepared {small}"),
                   "prepared_png16": (prepared[16], f"prepared {small}"),
                   "prepared_png8_disk_cache": (prepared[8], f"prepared {small}, disk cache")}  # fmt: skip
        stages = _stages(tokenizer, size)
        for stage in stages.values():
            stage.set_random_state(0)
        for fmt in FORMATS:
            path, source = sources[fmt]
            cache = None
            if fmt.endswith("disk_cache"):  # one cache file, written by the warm-up and read by every timed pair
                cache = _DiskCache([{Keys.IMAGE: str(path)}], Compose([*stages["decode"].transforms,
                                   *stages["spatial"].transforms]), Path(tmp) / "cache")  # fmt: skip
            times = dict.fromkeys(STAGES, 0.0)
            for i in range(-1, n):  # -1: warm-up, not timed
                item = {Keys.IMAGE: str(path), Keys.REPORT: reports[max(i, 0) % len(reports)]}
                for name, stage in stages.items():
                    if cache is not None and name == "spatial":  # done before the cache
                        continue
                    start = timer()
                    if cache is not None and name == "decode":
                        item = {**cache._cachecheck({Keys.IMAGE: str(path)}), Keys.REPORT: item[Keys.REPORT]}
                    else:
                        item = stage(item)
                    if i >= 0:
                        times[name] += timer() - start
            assert item[Keys.IMAGE].shape == (1, size, size)
            elapsed = sum(times.values())
            records.append({"format": fmt, "source": source, "pairs": n, "size": size,
                            "pairs_per_s": round(n / elapsed, 2), "ms_per_pair": round(1000 * elapsed / n, 2),
                            **{f"{k}_ms": round(1000 * v / n, 2) for k, v in times.items()}})  # fmt: skip
            say(f"{fmt} ({source}): {records[-1]['pairs_per_s']} pairs/s")
    return records
