"""Image-report pairs per second through the full pre-training preprocessing, on one worker."""

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

__all__ = ["pretraining_transforms", "run_transform_benchmark"]


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


def run_transform_benchmark(
    n: int = 40, size: int = 224, tokenizer: str | None = None, progress: Callable[[str], None] | None = None
) -> list[dict]:
    """Time the pipeline on the real DICOM ``RG1_UNCR.dcm`` (1955x1841, 15 bit), on a 16-bit PNG and an 8-bit
    JPEG of it, with the IU X-ray reports; one record per format: ``{"format", "pairs", "size", "pairs_per_s", "ms_per_pair"}``."""
    from pydicom.data import get_testdata_file

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
        image = LoadCXRd(Keys.IMAGE)({Keys.IMAGE: dicom})[Keys.IMAGE][0].numpy()
        Image.fromarray((image * 65535).astype(np.uint16)).save(png)
        jpeg = Path(tmp) / "rg1.jpg"  # the MIMIC-CXR-JPG format: 8-bit JPEG
        Image.fromarray((image * 255).astype(np.uint8)).save(jpeg, quality=95)
        pipeline = pretraining_transforms(tokenizer, size)
        pipeline.set_random_state(0)
        for fmt, path in (("dicom", dicom), ("png16", png), ("jpeg8", jpeg)):
            pipeline({Keys.IMAGE: path, Keys.REPORT: reports[0]})  # warm-up
            start = time.perf_counter()
            for i in range(n):
                out = pipeline({Keys.IMAGE: path, Keys.REPORT: reports[i % len(reports)]})
            elapsed = time.perf_counter() - start
            assert out[Keys.IMAGE].shape == (1, size, size)
            records.append({"format": fmt, "pairs": n, "size": size, "pairs_per_s": round(n / elapsed, 2),
                            "ms_per_pair": round(1000 * elapsed / n, 2)})  # fmt: skip
            say(f"{fmt}: {records[-1]['pairs_per_s']} pairs/s")
    return records
