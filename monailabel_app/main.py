"""A MONAI Label app serving the ELVIS bundles of this repository, used as they are (MONAI Label's stock
``monaibundle`` app serves them as well; this one takes them from any folder and refuses to start without their
models):

- ``elvis_cxr_segmentation``: auto-segmentation of the bundle's classes (``channel_def`` of its metadata);
- ``elvis_grounding``: text-prompted; the request's ``phrase`` parameter selects what to outline, and the
  answer is a mask of the pixels where that phrase is grounded.

Start it (in the MONAI Label environment, see README "MONAI Label"):

    monailabel start_server --app monailabel_app --studies /path/to/pngs --conf bundles /path/to/bundles

``bundles`` is a folder holding the two bundle folders, each with ``models/model.pt`` (and, for grounding,
``models/tokenizer/``). It defaults to this repository's ``bundles/``. ``--conf models`` picks a
comma-separated subset.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.tasks.infer.bundle import BundleInferTask

logger = logging.getLogger(__name__)

BUNDLE_NAMES = ("elvis_cxr_segmentation", "elvis_grounding")


class GroundingInferTask(BundleInferTask):
    """The grounding bundle's infer task: the same bundle, with a clear error when a request has no phrase."""

    def __call__(self, request: dict[str, Any], *args: Any, **kwargs: Any):  # type: ignore[override]
        from fastapi import HTTPException

        phrase = request.get("phrase")
        if not isinstance(phrase, str) or not phrase.strip():  # a client error (400), not a server error (500)
            raise HTTPException(status_code=400, detail="elvis_grounding needs a 'phrase' parameter: the text to "
                                "outline, e.g. {\"phrase\": \"left pleural effusion\"}.")  # fmt: skip
        return super().__call__(request, *args, **kwargs)


class ElvisApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        default = Path(app_dir).resolve().parent / "bundles"
        self.bundles_dir = Path(conf.get("bundles", default)).expanduser().resolve()
        names = [n.strip() for n in conf.get("models", ",".join(BUNDLE_NAMES)).split(",") if n.strip()]
        unknown = set(names) - set(BUNDLE_NAMES)
        if unknown:
            raise ValueError(f"unknown models {sorted(unknown)}; this app serves {list(BUNDLE_NAMES)}.")
        self.models = names
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="monai-elvis",
                         description="ELVIS chest X-ray segmentation and phrase grounding bundles")  # fmt: skip

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name in self.models:
            path = self.bundles_dir / name
            if not (path / "models" / "model.pt").is_file():
                raise FileNotFoundError(f"{name}: no trained model at {path / 'models' / 'model.pt'}.")
            task_class = GroundingInferTask if name == "elvis_grounding" else BundleInferTask
            task = task_class(str(path), self.conf)
            if not task.is_valid():
                raise RuntimeError(f"MONAI Label could not load the bundle {path}: see the log above.")
            infers[name] = task
            logger.info("serving %s from %s", name, path)
        return infers

    def init_trainers(self) -> dict:
        return {}

    def init_strategies(self) -> dict:
        from monailabel.tasks.activelearning.first import First

        return {"first": First()}
