"""Data layer: datalist builders, the text collate, a bad-sample-skipping dataset and the public data sources."""

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
    "collate_reports",
    "TEXT_PAD_VALUES",
    "BadSampleLimitError",
    "SkippingCacheDataset",
]
