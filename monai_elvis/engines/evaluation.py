"""Evaluation helpers of pre-training: prompt embeddings, chance levels beside each figure, the learning curve."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_elvis.keys import Keys, OutKeys

__all__ = ["PromptEncoder", "ChanceLevelHandler", "ItemValuesWriter", "MetricsHistoryHandler", "learning_curve_table",
           "summarize_metrics", "LEARNING_FIGURES"]

# metric name -> (what it is, goal on the default phantom run); the figures the pre-training run summarises
LEARNING_FIGURES: dict[str, tuple[str, str]] = {
    "val_zero_shot_auc": ("zero-shot AUC, mean over finding kinds", ">= 0.85"),
    "val_grounding_pointing": ("grounding pointing game", ">= 0.6"),
    "val_grounding_cnr": ("grounding CNR", ">= 1.5"),
    "val_grounding_side": ("grounding peak on the finding's side", ">= 0.9"),
    "val_map_correlation": ("map correlation between different phrases", "<= 0.5"),
    "val_precision_at_10": ("class-aware retrieval precision@10", ""),
    "val_recall_at_10": ("exact-pair retrieval recall@10", ""),
    "val_locality": ("locality preservation", ""),
    "val_grounding_miou": ("grounding mIoU", ""),
}

logger = logging.getLogger(__name__)


class PromptEncoder:
    """Embeds phrases with a network's text half: ``encoder(["left pleural effusion", ...])`` returns
    ``{"global": [P, d], "sentence": [P, d]}``, the projected report-level and first-sentence embeddings
    (:data:`monai_elvis.metrics.zero_shot.TextEmbedder`).

    Each phrase is tokenised as a one-sentence report; the network runs in eval mode without gradients (its
    mode is restored afterwards), on the device of its parameters.

    Args:
        network: an :class:`~monai_elvis.networks.ElvisNet` (or DDP-wrapped).
        tokenizer: a tokenizer or its folder (as :class:`~monai_elvis.transforms.TokenizeReport` takes).
        max_length: token budget per phrase.
    """

    def __init__(self, network: nn.Module, tokenizer: Any, max_length: int = 64) -> None:
        self.network = network
        self._tokenizer, self.max_length = tokenizer, max_length
        self._tokenize = None

    def __call__(self, phrases: Sequence[str]) -> dict[str, torch.Tensor]:
        from monai_elvis.data import collate_reports
        from monai_elvis.transforms import TokenizeReport

        if self._tokenize is None:  # the tokenizer folder may be written after the config is parsed
            self._tokenize = TokenizeReport(self._tokenizer, self.max_length)
        if not phrases:
            raise ValueError("PromptEncoder needs at least one phrase.")
        net = getattr(self.network, "module", self.network)
        device = next(net.parameters()).device
        batch = collate_reports([self._tokenize(str(p)) for p in phrases])
        training = net.training
        net.eval()
        try:
            with torch.no_grad():
                out = net.encode_text(*(batch[k].to(device) for k in (Keys.INPUT_IDS, Keys.ATTENTION_MASK, Keys.SENTENCE_INDEX)))
        finally:
            net.train(training)
        return {"global": out[OutKeys.TEXT_GLOBAL].float(), "sentence": out[OutKeys.TEXT_SENTENCE][:, 0].float()}


class ChanceLevelHandler:
    """When an evaluator completes, puts the chance level of each named metric into ``engine.state.metrics`` as
    ``<name>_chance`` (so that :class:`~monai_elvis.engines.MetricsJSONHandler`, attached after it, writes both)
    and logs one line of ``name value (chance c)``.

    Args:
        levels: ``{metric name: chance}``, the chance a number or an object with a ``chance()`` method (a metric
            whose chance depends on the data, such as retrieval over ``N`` items).
        name: the logger's name.
    """

    def __init__(self, levels: Mapping[str, Any], name: str = "monai_elvis.evaluation") -> None:
        self.levels = dict(levels)
        self.logger = logging.getLogger(name)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        parts = []
        for key, level in self.levels.items():
            if key not in engine.state.metrics:
                continue
            chance = float(level.chance() if hasattr(level, "chance") else level)
            engine.state.metrics[f"{key}_chance"] = chance
            value = engine.state.metrics[key]
            value = float(value.mean()) if isinstance(value, torch.Tensor) and value.numel() > 1 else float(value)
            parts.append(f"{key} {value:.3f} (chance {chance:.3f})")
        if parts:
            self.logger.info("; ".join(parts))


def _listed(value: Any) -> Any:
    """A tensor (or a tuple of them) as nested JSON lists, NaN as ``None``."""
    if isinstance(value, (tuple, list)):
        return [_listed(v) for v in value]
    values = torch.as_tensor(value).detach().float().cpu()
    if values.ndim > 1:
        return [_listed(v) for v in values]
    return [None if math.isnan(x) else x for x in values.tolist()]


class ItemValuesWriter:
    """Write the value of every evaluated item for each metric (its ``item_values()``) to a JSON file when the
    evaluator completes, for paired comparisons of models and resampling (bootstrap intervals) of their figures.

    The file holds ``{"metrics": {name: values}}``: a list ``[N]`` per item (``None`` where an item could not be
    scored), or, for :class:`~monai_elvis.metrics.ZeroShotClassificationMetric`, ``[scores, labels]`` of shape
    ``[N, K]`` each. Items are in the evaluator's order (the data loader's, unshuffled). Each evaluator writes
    its own file (written atomically, replacing an earlier run's).

    Args:
        path: the JSON file.
        metrics: name -> a metric with ``item_values()``, or an :class:`~monai.handlers.IgniteMetricHandler`
            wrapping one (e.g. ``"@validate#additional_metrics#val_locality"`` in a bundle config).
    """

    def __init__(self, path: str | os.PathLike, metrics: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.metrics = {}
        for name, metric in metrics.items():
            metric = getattr(metric, "metric_fn", metric)
            if not callable(getattr(metric, "item_values", None)):
                raise TypeError(f"metric {name!r} ({type(metric).__name__}) has no item_values(): it cannot give "
                                "per-item values.")  # fmt: skip
            self.metrics[name] = metric

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine=None) -> None:
        values = {name: _listed(metric.item_values()) for name, metric in self.metrics.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps({"metrics": values}))
        os.replace(tmp, self.path)


class MetricsHistoryHandler:
    """Appends ``{"epoch", "metrics"}`` to a JSON-lines file each time an evaluator completes, so that a learning
    curve survives the run (``metrics.json`` keeps only the last evaluation). Records of the same epoch written
    by several evaluators are merged by :func:`learning_curve_table`.

    Args:
        path: the ``.jsonl`` file.
        trainer: whose epoch is recorded (default: the evaluator's, which MONAI's ``ValidationHandler`` sets to
            the trainer's).
    """

    def __init__(self, path: str | os.PathLike, trainer=None) -> None:
        self.path = Path(path)
        self.trainer = trainer

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        def value(v):
            if isinstance(v, torch.Tensor):
                v = v.detach().float()
                v = float(v.nanmean()) if v.numel() > 1 else float(v)
            return None if isinstance(v, float) and math.isnan(v) else v

        epoch = int(self.trainer.state.epoch) if self.trainer is not None else int(engine.state.epoch)
        record = {"epoch": epoch, "metrics": {k: value(v) for k, v in engine.state.metrics.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def learning_curve_table(history: str | os.PathLike, columns: Mapping[str, str], goals: Mapping[str, str] | None = None) -> str:
    """A Markdown table of the figures in ``columns`` (``{metric name: heading}``) per epoch, from a
    :class:`MetricsHistoryHandler` file; a chance row (from ``<name>_chance``) and, if given, a goal row."""
    merged: dict[int, dict] = {}
    for line in Path(history).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            merged.setdefault(int(rec["epoch"]), {}).update(rec["metrics"])
    if not merged:
        raise ValueError(f"{history} holds no evaluation.")

    def fmt(v) -> str:
        return "" if v is None else f"{v:.3f}" if isinstance(v, (int, float)) else str(v)

    head = "| epoch | " + " | ".join(columns.values()) + " |"
    rows = [head, "| ---: |" + " ---: |" * len(columns)]
    for epoch in sorted(merged):
        rows.append(f"| {epoch} | " + " | ".join(fmt(merged[epoch].get(k)) for k in columns) + " |")
    last = merged[max(merged)]
    rows.append("| chance | " + " | ".join(fmt(last.get(f"{k}_chance")) for k in columns) + " |")
    if goals:
        rows.append("| goal | " + " | ".join(goals.get(k, "") for k in columns) + " |")
    return "\n".join(rows)


def summarize_metrics(metrics_json: str | os.PathLike, figures: Mapping[str, tuple[str, str]] | None = None,
                      log: bool = True) -> str:  # fmt: skip
    """A plain-text table of the figures of a ``metrics.json`` (written by
    :class:`~monai_elvis.engines.MetricsJSONHandler`) beside their chance levels and goals; logged when ``log``.

    ``figures``: ``{metric name: (description, goal)}``, default :data:`LEARNING_FIGURES`. Figures the file
    lacks are left out."""
    record = json.loads(Path(metrics_json).read_text())
    metrics = record.get("metrics", {})
    rows = [("figure", "value", "chance", "goal")]
    for key, (what, goal) in (figures or LEARNING_FIGURES).items():
        if key not in metrics:
            continue
        value, chance = metrics[key], metrics.get(f"{key}_chance")
        if isinstance(value, dict):
            value = sum(v for v in value.values() if v is not None) / max(1, sum(v is not None for v in value.values()))
        rows.append((what, "n/a" if value is None else f"{value:.3f}", "" if chance is None else f"{chance:.3f}", goal))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    text = f"summary of {metrics_json} (epoch {record.get('epoch')}):\n" + "\n".join(lines)
    if log:
        logger.info(text)
    return text
