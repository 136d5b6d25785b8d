"""Vision-language pre-training on MONAI engines."""

from __future__ import annotations

import json
import math
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys
from torch import nn

from monai_elvis.keys import Keys
from monai_elvis.losses import ElvisLoss

__all__ = [
    "prepare_vlp_batch", "prepare_grounding_batch", "ObjectiveLoss", "GradientClipHandler", "ClampParametersHandler",
    "MetricsJSONHandler", "from_pred", "ensure_tokenizer", "save_text_model",
]  # fmt: skip

logger = logging.getLogger(__name__)
TEXT_KEYS = (Keys.INPUT_IDS, Keys.ATTENTION_MASK, Keys.SENTENCE_INDEX)


def prepare_grounding_batch(batchdata: Mapping[str, Any], device: str | torch.device | None = None,
                            non_blocking: bool = False, **kwargs: Any):  # fmt: skip
    """Like :func:`prepare_vlp_batch` for phrase-grounding batches, with the box mask ``label`` as the target."""
    image, _, args, text = prepare_vlp_batch(batchdata, device, non_blocking, **kwargs)
    if Keys.LABEL not in batchdata:
        raise KeyError(f"a grounding batch needs '{Keys.LABEL}' (the box mask); it has {sorted(batchdata)}.")
    label = torch.as_tensor(batchdata[Keys.LABEL]).to(device=device, non_blocking=non_blocking)
    return image, label, args, text


def prepare_vlp_batch(batchdata: Mapping[str, Any], device: str | torch.device | None = None,
                      non_blocking: bool = False, **kwargs: Any):  # fmt: skip
    """``prepare_batch`` for MONAI engines: ``(image, target, (), {input_ids, attention_mask, sentence_index})``,
    so that the inferer calls ``network(image, input_ids=..., attention_mask=..., sentence_index=...)``; a batch
    with ``word_index`` (``TokenizeReportd(word_index=True)``) passes it too.

    ``target`` is the batch's multi-hot ``class_label`` ``[B, K]`` when it has one (for zero-shot and
    class-aware evaluation, see :class:`~monai_elvis.transforms.ClassNamesToMultiHotd`), else ``None``."""
    missing = [k for k in (Keys.IMAGE, *TEXT_KEYS) if k not in batchdata]
    if missing:
        raise KeyError(f"an image-report batch needs {missing}; it has {sorted(batchdata)}.")
    image = torch.as_tensor(batchdata[Keys.IMAGE]).to(device=device, non_blocking=non_blocking, **kwargs)
    keys = TEXT_KEYS + ((Keys.WORD_INDEX,) if Keys.WORD_INDEX in batchdata else ())
    text = {k: torch.as_tensor(batchdata[k]).to(device=device, non_blocking=non_blocking) for k in keys}
    target = batchdata.get(Keys.CLASS_LABEL)
    if target is not None:
        target = torch.as_tensor(target).to(device=device, non_blocking=non_blocking)
    return image, target, (), text


class ObjectiveLoss(nn.Module):
    """Adapts :class:`~monai_elvis.losses.ElvisLoss` to MONAI trainers, which call ``loss_function(pred, label)``
    and expect a tensor: returns the total and keeps the last call's named terms (as floats) in :attr:`terms`."""

    def __init__(self, objective: ElvisLoss) -> None:
        super().__init__()
        self.objective = objective
        self.terms: dict[str, float] = {}

    def forward(self, pred: Mapping[str, torch.Tensor], target: Any = None) -> torch.Tensor:
        terms = self.objective(pred)
        self.terms = {k: float(v.detach()) for k, v in terms.items()}
        if not torch.isfinite(terms["loss"]):
            raise FloatingPointError(f"the pre-training loss is not finite: {self.terms}")
        return terms["loss"]


class GradientClipHandler:
    """Clip the gradient norm of ``engine.network`` once per optimizer step, just before it.

    With gradient accumulation (``engine.accumulation_steps > 1``) the gradients are clipped only after the
    last backward pass of each accumulation window (as MONAI's trainer decides when to step), and under AMP with
    a gradient scaler they are unscaled once, first.

    Args:
        max_norm: the largest total norm; ``None`` or ``<= 0`` disables clipping.
    """

    def __init__(self, max_norm: float | None = 1.0) -> None:
        self.max_norm = max_norm

    def attach(self, engine) -> None:
        if self.max_norm and self.max_norm > 0:
            engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    @staticmethod
    def steps_now(engine) -> bool:
        """Whether the optimizer steps after this iteration's backward pass."""
        acc = int(getattr(engine, "accumulation_steps", 1) or 1)
        if acc <= 1:
            return True
        epoch_length = engine.state.epoch_length
        it = engine.state.iteration - 1
        if epoch_length is None:
            return (it + 1) % acc == 0
        local = it % epoch_length
        return (local + 1) % acc == 0 or local + 1 == epoch_length

    def __call__(self, engine) -> None:
        if not self.steps_now(engine):
            return
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)


class ClampParametersHandler:
    """Keep bounded parameters in range after each optimizer step, as CLIP clamps its logit scale.

    Calls ``clamp_parameters_()`` of every sub-module of ``engine.loss_function`` and ``engine.network`` that has
    one (for example the learnable temperature of :class:`~monai_elvis.losses.GlobalContrastiveLoss`), on
    ``IterationEvents.MODEL_COMPLETED``, which MONAI's trainer fires after the optimizer step; with gradient
    accumulation only on the iterations that step. Clamping the value (not the forward pass) keeps the gradient
    alive at the bound.
    """

    def attach(self, engine) -> None:
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self)

    def __call__(self, engine) -> None:
        if not GradientClipHandler.steps_now(engine):
            return
        for root in (getattr(engine, "loss_function", None), getattr(engine, "network", None)):
            if not isinstance(root, nn.Module):
                continue
            for module in root.modules():
                clamp = getattr(module, "clamp_parameters_", None)
                if callable(clamp):
                    clamp()


class MetricsJSONHandler:
    """Write ``engine.state.metrics`` (and the epoch) to a JSON file, atomically, when ``engine`` completes;
    the metrics of several evaluators of the same epoch (retrieval, grounding) are merged into one file.

    Args:
        path: the JSON file.
        trainer: when given, its epoch is recorded (an evaluator's own epoch is always 1).
        names: for vector-valued metrics (e.g. a per-class Dice with ``reduction="mean_batch"``), the names of
            their elements: ``{"test_dice_per_class": ["nodule", ...]}`` writes ``{"nodule": 0.71, ...}``.
            Vector metrics without names are written as lists; NaN (a class never present) as ``null``.
    """

    def __init__(self, path: str | os.PathLike, trainer=None, names: Mapping[str, Sequence[str]] | None = None) -> None:
        self.path = Path(path)
        self.trainer = trainer
        self.names = dict(names or {})

    def _value(self, key: str, v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.numel() > 1:
            values = [None if math.isnan(x) else x for x in v.detach().float().flatten().tolist()]
            names = self.names.get(key)
            if names is not None:
                if len(names) != len(values):
                    raise ValueError(f"metric {key!r} has {len(values)} values but {len(names)} names: {list(names)}.")
                return dict(zip(names, values))
            return values
        if isinstance(v, (int, float, torch.Tensor)):
            v = float(v)
            return None if math.isnan(v) else v
        return v

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        metrics = {k: self._value(k, v) for k, v in engine.state.metrics.items()}
        epoch = int(self.trainer.state.epoch) if self.trainer is not None else int(engine.state.epoch)
        if self.path.is_file():  # another evaluator of the same epoch wrote first: keep its figures
            try:
                previous = json.loads(self.path.read_text())
                if previous.get("epoch") == epoch:
                    metrics = {**previous.get("metrics", {}), **metrics}
            except (OSError, ValueError):
                pass
        record = {"epoch": epoch, "metrics": metrics}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, self.path)


def from_pred(keys: Sequence[str], label: bool = False) -> Callable[[Mapping], tuple]:
    """``output_transform`` picking entries of the network's output dict (``engine.state.output["pred"]``),
    e.g. for :class:`monai.handlers.IgniteMetricHandler`: ``from_pred(["image_global", "text_global"])`` gives
    ``(image_global, text_global)``.

    With ``label``, the result is ``(y_pred, y)`` with ``y`` the engine's target (``output["label"]``, for
    example the multi-hot classes of :func:`prepare_vlp_batch`) and ``y_pred`` the one picked entry, or the
    tuple of several: ``from_pred(["image_global"], label=True)`` gives ``(image_global, label)``."""
    keys = list(keys)

    def transform(output: Mapping) -> tuple:
        pred = output[CommonKeys.PRED]
        picked = tuple(pred[k].detach() for k in keys)
        if not label:
            return picked
        return (picked[0] if len(picked) == 1 else picked), output.get(CommonKeys.LABEL)

    return transform


def ensure_tokenizer(folder: str | os.PathLike, datalist: str | os.PathLike, vocab_size: int = 4096,
                     key: str = "training") -> str:  # fmt: skip
    """A tokenizer folder: ``folder`` when it already holds one (e.g. a pretrained CXR-BERT folder), else a WordPiece tokenizer trained on the
    reports of ``datalist[key]`` and saved there. Returns the folder."""
    from monai_elvis.transforms import train_wordpiece_tokenizer

    folder = Path(folder)
    if any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        return str(folder)
    entries = json.loads(Path(datalist).read_text())[key]
    texts = [e[Keys.REPORT] for e in entries if e.get(Keys.REPORT)]
    if not texts:
        raise ValueError(f"no report in {datalist}[{key!r}] to train a tokenizer on.")
    logger.info("training a WordPiece tokenizer (%d words) on %d reports into %s", vocab_size, len(texts), folder)
    train_wordpiece_tokenizer(texts, folder, vocab_size=vocab_size)
    return str(folder)


def save_text_model(network: nn.Module, tokenizer: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Save the network's text encoder (``save_pretrained``) and the tokenizer into ``folder``, so that
    ``ReportTextEncoder(folder)`` and ``AutoTokenizer.from_pretrained(folder)`` load them. transformers' progress
    bar over the weight shards (one shard here) is switched off while it saves."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    text_encoder = getattr(network, "text_encoder", None)
    if text_encoder is None:
        raise ValueError(f"{type(network).__name__} has no text_encoder to save.")
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        text_encoder.save_pretrained(folder)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(str(folder))
