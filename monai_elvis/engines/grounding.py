"""Handlers of the phrase-grounding bundle: writing heatmaps, overlays, masks and boxes, and a per-category
table of the grounding metrics."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_elvis.keys import Keys
from monai_elvis.metrics.grounding import GroundingMetric

__all__ = ["GroundingWriter", "GroundingReportHandler", "heat_colormap", "phrase_slug"]

logger = logging.getLogger(__name__)


def phrase_slug(phrase: str, max_length: int = 48) -> str:
    """A file-name-safe form of a phrase: ``"Small left pneumothorax."`` -> ``"small_left_pneumothorax"``.

    A phrase longer than ``max_length`` keeps its first whole words that fit, then ``_`` and 6 hexadecimal
    characters of the phrase's SHA-1, so that no word is cut and two long phrases that start alike get different
    names: ``"focal consolidation in the right upper lobe of the left lung"`` ->
    ``"focal_consolidation_in_the_right_upper_97cf78"`` (not ``..._right_upper_l``).
    """
    words = re.findall(r"[a-z0-9]+", phrase.lower())
    full = "_".join(words)
    if len(full) <= max_length:
        return full or "phrase"
    digest = hashlib.sha1(phrase.encode("utf-8")).hexdigest()[:6]
    budget = max(1, max_length - len(digest) - 1)
    slug = ""
    for word in words:
        candidate = f"{slug}_{word}" if slug else word
        if len(candidate) > budget:
            break
        slug = candidate
    return f"{slug or words[0][:budget]}_{digest}"


def heat_colormap(heat: np.ndarray) -> np.ndarray:
    """A blue-cyan-yellow-red ("jet"-like) colour for each value of a ``[..., N]`` map in ``[0, 1]`` -> ``[..., N, 3]``
    float in ``[0, 1]``."""
    h = np.clip(heat, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25])  # red, green, blue
    return np.clip(1.5 - np.abs(4.0 * (h - centres)), 0.0, 1.0)


def _item(x: Any) -> Any:
    return x[0] if isinstance(x, (list, tuple)) and len(x) == 1 and isinstance(x[0], (list, tuple, str)) else x


class GroundingWriter:
    """Write, for every (image, phrase) an evaluator grounds, into ``output_dir``:

    - ``<image>_<phrase>_heatmap.png`` (16-bit, the ``[0, 1]`` map times 65535) or ``.nii.gz`` (float32),
    - ``<image>_<phrase>_overlay.png``: the radiograph with the heatmap blended in colour,
    - ``<image>_<phrase>_mask.png``: ``heatmap >= threshold`` as 0/255,
    - and, when the run completes, ``groundings.json`` and ``groundings.csv``: image, phrase, the files, the box
      ``[x, y, w, h]`` of the largest connected region of the mask (``null`` when empty) and the peak ``[x, y]``.

    The two index files accumulate: a run adds its records to those already in ``output_dir``, and replaces a
    record whose files it wrote again (the same image name and phrase), so that they list every set of files in the
    folder. :attr:`records` holds this run's records only. Paths are written normalised (no ``..`` segments).

    It reads the decollated ``engine.state.output[i][heatmap_key]`` (``[1, W, H]``, MONAI's ``(x, y)`` order, in the
    input image's geometry: put :class:`~monai.transforms.Invertd` before it in the postprocessing) and the phrase
    from the batch. The PNG files are written as the radiograph is viewed (rows top to bottom), like MONAI's
    ``PILWriter``; the NIfTI map keeps the ``(x, y)`` array.

    Args:
        output_dir: created if needed.
        heatmap_key: the output entry with the heatmap.
        threshold: for the mask and box.
        map_format: ``"png"`` (16-bit) or ``"nifti"``.
        alpha: heatmap opacity in the overlay.
    """

    def __init__(self, output_dir: str | os.PathLike, heatmap_key: str = "heatmap", threshold: float = 0.5,
                 map_format: str = "png", alpha: float = 0.45) -> None:  # fmt: skip
        if map_format not in ("png", "nifti"):
            raise ValueError(f"map_format must be 'png' or 'nifti', got {map_format!r}.")
        self.output_dir = Path(os.path.normpath(output_dir))
        self.heatmap_key = heatmap_key
        self.threshold = threshold
        self.map_format = map_format
        self.alpha = alpha
        self.records: list[dict] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda _: self.records.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def iteration_completed(self, engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(output, Mapping):
            raise ValueError("GroundingWriter needs decollated engine outputs (the evaluator's decollate=True).")
        for b, o in zip(batch, output):
            self.write(o[self.heatmap_key], str(_item(b[Keys.PHRASE])))

    def write(self, heatmap: torch.Tensor, phrase: str) -> dict:
        """Write the files of one heatmap ``[1, W, H]`` (a MetaTensor naming its source image) and return its record."""
        from PIL import Image

        from monai_elvis.transforms import LoadCXR, MaskToBoxes

        source = os.path.normpath(str(getattr(heatmap, "meta", {}).get("filename_or_obj", "image")))
        heat = np.nan_to_num(torch.as_tensor(heatmap).detach().float().cpu().numpy()[0], nan=0.0).clip(0.0, 1.0)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        name = f"{Path(source).stem}_{phrase_slug(phrase)}"
        if self.map_format == "png":
            map_file = self.output_dir / f"{name}_heatmap.png"
            Image.fromarray(np.ascontiguousarray(np.round(heat * 65535).astype(np.uint16).T)).save(map_file)
        else:
            import nibabel as nib

            map_file = self.output_dir / f"{name}_heatmap.nii.gz"
            nib.save(nib.Nifti1Image(heat.astype(np.float32), np.eye(4)), str(map_file))
        mask = heat >= self.threshold
        mask_file = self.output_dir / f"{name}_mask.png"
        Image.fromarray(np.ascontiguousarray((mask * 255).astype(np.uint8).T)).save(mask_file)
        try:
            gray = LoadCXR()(source)[0].numpy()
        except (OSError, ValueError):  # the source is not a readable file (an in-memory image): a plain map
            gray = np.zeros_like(heat)
        if gray.shape != heat.shape:
            raise ValueError(f"the heatmap of {source} has shape {heat.shape}, the image {gray.shape}: invert the "
                             "preprocessing (Invertd) before writing.")  # fmt: skip
        rgb = (1 - self.alpha) * np.repeat(gray[..., None], 3, -1) + self.alpha * heat_colormap(heat)
        overlay_file = self.output_dir / f"{name}_overlay.png"
        Image.fromarray(np.ascontiguousarray(np.round(rgb * 255).clip(0, 255).astype(np.uint8).transpose(1, 0, 2))).save(overlay_file)
        boxes = MaskToBoxes()(mask.astype(np.uint8))
        box = None
        if len(boxes):
            areas = boxes[:, 2] * boxes[:, 3]
            box = [float(v) for v in boxes[int(np.argmax(areas))]]
        peak_x, peak_y = np.unravel_index(int(np.argmax(heat)), heat.shape)
        record = {"image": source, "phrase": phrase, "heatmap": str(map_file), "overlay": str(overlay_file),
                  "mask": str(mask_file), "box": box, "peak": [int(peak_x), int(peak_y)]}  # fmt: skip
        self.records.append(record)
        return record

    def _previous_records(self) -> list[dict]:
        path = self.output_dir / "groundings.json"
        if not path.is_file():
            return []
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            logger.warning("%s is not valid JSON: starting it again with this run's records", path)
            return []
        return [r for r in previous if isinstance(r, dict) and "heatmap" in r] if isinstance(previous, list) else []

    def completed(self, engine=None) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rewritten = {r["heatmap"] for r in self.records}
        kept = [r for r in self._previous_records() if r["heatmap"] not in rewritten]
        records = kept + self.records
        tmp = self.output_dir / "groundings.json.tmp"
        tmp.write_text(json.dumps(records, indent=1))
        os.replace(tmp, self.output_dir / "groundings.json")
        with open(self.output_dir / "groundings.csv.tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "phrase", "heatmap", "overlay", "mask", "box", "peak"])
            writer.writeheader()
            for r in records:
                writer.writerow({**r, "box": json.dumps(r.get("box")), "peak": json.dumps(r.get("peak"))})
        os.replace(self.output_dir / "groundings.csv.tmp", self.output_dir / "groundings.csv")
        logger.info("wrote %d groundings to %s (%d in its groundings.json)", len(self.records), self.output_dir,
                    len(records))  # fmt: skip


class GroundingReportHandler:
    """Grounding metrics per category (and ``"all"``), written as CSV, JSON and Markdown when the evaluator completes.

    Each (category, metric) pair accumulates in its own :class:`~monai_elvis.metrics.GroundingMetric`, fed the
    decollated ``output[pred_key]`` (``[1, W, H]``) and ``output[label_key]`` (``[K, W, H]``, one channel per box).
    Items with no scorable box are counted in ``n`` but not in the means (``n_scored``). The value of every item,
    in the evaluator's order, goes to ``{prefix}_items.json`` (``{"category": [N], "metrics": {name: [N]}}``,
    ``None`` where unscored), for paired comparisons and resampling.

    Args:
        output_dir: where ``{prefix}_by_category.{csv,json,md}`` and ``{prefix}_items.json`` go.
        metrics: names of :class:`GroundingMetric` metrics, in table order.
        category_key: the batch entry with the category (``"category"`` in MS-CXR datalists).
    """

    def __init__(self, output_dir: str | os.PathLike, metrics: Sequence[str] = ("cnr", "miou", "pointing"),
                 category_key: str = "category", pred_key: str = "pred", label_key: str = Keys.LABEL,
                 prefix: str = "grounding") -> None:  # fmt: skip
        self.output_dir = Path(output_dir)
        self.metric_names = list(metrics)
        for m in self.metric_names:
            GroundingMetric(m)  # validates the name
        self.category_key, self.pred_key, self.label_key, self.prefix = category_key, pred_key, label_key, prefix
        self.metrics: dict[tuple[str, str], GroundingMetric] = {}
        self.counts: dict[str, int] = defaultdict(int)
        self.categories: list[str] = []
        self.table: list[dict] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def reset(self, engine=None) -> None:
        self.metrics.clear()
        self.counts.clear()
        self.categories = []
        self.table = []

    def update(self, pred: torch.Tensor, label: torch.Tensor, category: str) -> None:
        """Add one item: ``pred [1, W, H]``, ``label [K, W, H]``."""
        self.categories.append(category)
        for cat in (category, "all"):
            self.counts[cat] += 1
            for name in self.metric_names:
                metric = self.metrics.setdefault((cat, name), GroundingMetric(name))
                metric(y_pred=[pred], y=[label])

    def iteration_completed(self, engine) -> None:
        for b, o in zip(engine.state.batch, engine.state.output):
            self.update(o[self.pred_key], o[self.label_key], str(_item(b.get(self.category_key, "all"))))

    def rows(self) -> list[dict]:
        cats = sorted(c for c in self.counts if c != "all") + (["all"] if "all" in self.counts else [])
        rows = []
        for cat in cats:
            row: dict[str, Any] = {"category": cat, "n": self.counts[cat]}
            for name in self.metric_names:
                values = self.metrics[(cat, name)].get_buffer().flatten().float()
                values = values[~values.isnan()]
                row["n_scored"] = int(values.numel())
                row[name] = float(values.mean()) if values.numel() else math.nan
                row[f"{name}_std"] = float(values.std(unbiased=False)) if values.numel() else math.nan
            rows.append(row)
        return rows

    def completed(self, engine=None) -> None:
        self.table = self.rows()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        base = self.output_dir / f"{self.prefix}_by_category"
        fields = ["category", "n", "n_scored"] + [f for m in self.metric_names for f in (m, f"{m}_std")]
        with open(f"{base}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.table)
        clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in self.table]
        Path(f"{base}.json").write_text(json.dumps(clean, indent=1))
        lines = ["| category | n | " + " | ".join(self.metric_names) + " |",
                 "| --- | ---: | " + " | ".join("---:" for _ in self.metric_names) + " |"]  # fmt: skip
        for r in self.table:
            cells = [f"{r[m]:.3f} ± {r[f'{m}_std']:.3f}" if not math.isnan(r[m]) else "n/a" for m in self.metric_names]
            lines.append(f"| {r['category']} | {r['n']} | " + " | ".join(cells) + " |")
        Path(f"{base}.md").write_text("\n".join(lines) + "\n")
        items = {"category": self.categories, "metrics": {}}
        for name in self.metric_names:
            values = self.metrics[("all", name)].item_values().tolist() if self.categories else []
            items["metrics"][name] = [None if math.isnan(v) else v for v in values]
        Path(self.output_dir / f"{self.prefix}_items.json").write_text(json.dumps(items))
        logger.info("grounding by category:\n%s", "\n".join(lines))
