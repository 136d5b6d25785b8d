"""Transforms (array and dictionary forms): loading, reports, labels and standard pipelines."""

from monai_elvis.transforms.io import LABEL_COLOURS, CXRLoadError, LoadCXR, LoadCXRd, PaletteLabelWriter
from monai_elvis.transforms.labels import (
    ClassNamesToMultiHot,
    ClassNamesToMultiHotd,
    LabelsFromKeysd,
    UncertainLabels,
    UncertainLabelsd,
    BoxesToMask,
    BoxesToMaskd,
    LoadLabelMap,
    LoadLabelMapd,
    MaskToBoxes,
    MaskToBoxesd,
    RLEToMask,
    RLEToMaskd,
)
from monai_elvis.transforms.presets import cxr_augmentation, cxr_spatial_intensity
from monai_elvis.transforms.report import (
    ExtractReportSections,
    ExtractReportSectionsd,
    RandDropSentences,
    RandDropSentencesd,
    RandShuffleSentences,
    RandShuffleSentencesd,
    ReportError,
    RequirePhrased,
    SplitSentences,
    SplitSentencesd,
    TextToMetad,
    TokenizeReport,
    TokenizeReportd,
    load_tokenizer,
    parse_iu_xray_xml,
    parse_report_sections,
    train_wordpiece_tokenizer,
)

__all__ = [
    "CXRLoadError", "LoadCXR", "LoadCXRd", "LABEL_COLOURS", "PaletteLabelWriter",
    "ClassNamesToMultiHot", "ClassNamesToMultiHotd", "LabelsFromKeysd", "UncertainLabels", "UncertainLabelsd",
    "BoxesToMask", "BoxesToMaskd", "LoadLabelMap", "LoadLabelMapd", "MaskToBoxes", "MaskToBoxesd", "RLEToMask", "RLEToMaskd",
    "cxr_augmentation", "cxr_spatial_intensity",
    "ExtractReportSections", "ExtractReportSectionsd", "RandDropSentences", "RandDropSentencesd",
    "RandShuffleSentences", "RandShuffleSentencesd", "ReportError", "RequirePhrased", "SplitSentences", "SplitSentencesd", "TextToMetad",
    "TokenizeReport", "TokenizeReportd", "load_tokenizer", "parse_iu_xray_xml", "parse_report_sections",
    "train_wordpiece_tokenizer",
]  # fmt: skip
