"""Data layer: datalist builders, the prepare step (images shrunk once for training at scale), the text collate, a
bad-sample-skipping dataset (in memory or on disk) and the public data sources."""

from monai_elvis.data.builders import (
    BUILDERS,
    BuildSummary,
    DatasetFormatError,
    CHEXPERT_COMPETITION,
    build_chexpert,
    build_iu_xray,
    build_mimic_cxr,
    build_ms_cxr,
    build_rsna,
    build_siim,
    datalist_split,
    list_images,
    load_grounding_datalist,
    read_csv_rows,
    split_items,
    subsample_training,
)
from monai_elvis.data.collate import TEXT_PAD_VALUES, collate_reports
from monai_elvis.data.prepare import PrepareSummary, PrepareWorkerError, prepare_datalist, prepared_datalist
from monai_elvis.data.skipping import BadSampleLimitError, SkippingCacheDataset

__all__ = [
    "BUILDERS",
    "BuildSummary",
    "DatasetFormatError",
    "build_chexpert",
    "CHEXPERT_COMPETITION",
    "build_iu_xray",
    "build_mimic_cxr",
    "build_ms_cxr",
    "build_rsna",
    "build_siim",
    "datalist_split",
    "list_images",
    "load_grounding_datalist",
    "read_csv_rows",
    "split_items",
    "subsample_training",
    "prepare_datalist",
    "prepared_datalist",
    "PrepareSummary",
    "PrepareWorkerError",
    "collate_reports",
    "TEXT_PAD_VALUES",
    "BadSampleLimitError",
    "SkippingCacheDataset",
]
