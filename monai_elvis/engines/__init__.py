"""Pieces that run ELVIS pre-training on MONAI's ignite engines (``monai.engines.SupervisedTrainer`` and
``SupervisedEvaluator``): batch preparation, the loss adapter, handlers (including the grounding writer and per-category report),
resumable runs that check their settings and resume mid-epoch, the loss parameters' synchronisation of a
distributed run, and preparation helpers."""

from monai_elvis.engines.classification import ProbabilityWriter
from monai_elvis.engines.distributed import LossParametersSyncHandler, average_gradients, broadcast_parameters
from monai_elvis.engines.evaluation import (
    LEARNING_FIGURES,
    ChanceLevelHandler,
    ItemValuesWriter,
    MetricsHistoryHandler,
    PromptEncoder,
    learning_curve_table,
    summarize_metrics,
)
from monai_elvis.engines.grounding import GroundingReportHandler, GroundingWriter, heat_colormap, phrase_slug
from monai_elvis.engines.resume import (
    SETTINGS_FILE,
    DataPosition,
    FinalModelSaver,
    ResumableSampler,
    ResumeSettingsError,
    attach_resume,
    data_fingerprint,
    describe_settings,
    latest_checkpoint,
    settings_differences,
)
from monai_elvis.engines.vlp import (
    ClampParametersHandler,
    GradientClipHandler,
    MetricsJSONHandler,
    ObjectiveLoss,
    ensure_tokenizer,
    from_pred,
    prepare_grounding_batch,
    prepare_vlp_batch,
    save_text_model,
)

__all__ = [
    "ClampParametersHandler", "GradientClipHandler", "MetricsJSONHandler", "attach_resume", "data_fingerprint", "ObjectiveLoss", "ensure_tokenizer", "from_pred",
    "FinalModelSaver", "latest_checkpoint", "prepare_grounding_batch", "prepare_vlp_batch", "save_text_model",
    "GroundingReportHandler", "GroundingWriter", "heat_colormap", "phrase_slug",
    "ChanceLevelHandler", "ItemValuesWriter", "MetricsHistoryHandler", "PromptEncoder", "learning_curve_table", "summarize_metrics",
    "LEARNING_FIGURES",
    "ResumeSettingsError", "SETTINGS_FILE", "describe_settings", "settings_differences",
    "ProbabilityWriter",
    "DataPosition", "ResumableSampler", "LossParametersSyncHandler", "average_gradients", "broadcast_parameters",
]  # fmt: skip
