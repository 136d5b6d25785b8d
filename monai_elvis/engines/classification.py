"""Writing a classifier's per-class probabilities, one row per image."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["ProbabilityWriter"]


class ProbabilityWriter:
    """Collect each image's per-class probabilities from an evaluator and write them when it completes:
    ``<stem>.json`` (``[{"image": path, "probabilities": {class: p, ...}}, ...]``) and ``<stem>.csv`` (a header
    ``image,<class>,...`` and one row per image), both in the order the images were read.

    Args:
        output_dir: the folder (made when missing).
        class_names: the names of the outputs, in order.
        stem: the files' name without suffix.
        pred_key, image_key: where the probabilities (``[K]`` per image, after postprocessing) and the image
            (whose ``meta["filename_or_obj"]`` names it) are in ``engine.state.output`` (decollated) or the batch.
    """

    def __init__(self, output_dir: str | os.PathLike, class_names: Sequence[str], stem: str = "predictions",
                 pred_key: str = "pred", image_key: str = "image") -> None:  # fmt: skip
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.stem, self.pred_key, self.image_key = stem, pred_key, image_key
        self.rows: list[dict] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def _collect(self, engine) -> None:
        for item in engine.state.output:
            p = torch.as_tensor(item[self.pred_key]).detach().float().flatten().cpu()
            if p.numel() != len(self.class_names):
                raise ValueError(f"{p.numel()} probabilities for {len(self.class_names)} classes {self.class_names}.")
            meta = getattr(item.get(self.image_key), "meta", {}) or {}
            name = meta.get("filename_or_obj", f"image_{len(self.rows)}")
            self.rows.append({"image": str(name), "probabilities": dict(zip(self.class_names, p.tolist()))})

    def write(self, engine=None) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / f"{self.stem}.json").write_text(json.dumps(self.rows, indent=1))
        with open(self.output_dir / f"{self.stem}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", *self.class_names])
            writer.writerows([[r["image"], *(f"{v:.6f}" for v in r["probabilities"].values())] for r in self.rows])
