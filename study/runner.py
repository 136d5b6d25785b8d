"""Run every (objective, seed) of the study through the bundles, recording each step's figures as it finishes.

Each finished step appends one JSON line to ``<work_dir>/records.jsonl``; a restarted study skips the steps
already recorded there, so an interrupted run loses at most the step in progress.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"
OBJECTIVES = ("elvis", "lovt", "one_hot", "gloria", "convirt", "random")
logger = logging.getLogger("study")


@dataclass
class StudyConfig:
    """What the study runs. The defaults are the tiny scale that fits about an hour on 2 CPU cores."""

    work_dir: str = "runs/study"
    dataset_dir: str = "data/phantom"
    objectives: Sequence[str] = OBJECTIVES
    seeds: Sequence[int] = (0, 1, 2)
    scale: str = "tiny"  # the configs/scale overlay of pre-training; "paper" for the GPU scale
    pretrain_epochs: int = 3
    pretrain_overrides: dict = field(default_factory=dict)
    segmentation_overlay: str | None = None  # e.g. configs/segmentation/paper.json at the paper scale
    seg_fractions: Sequence[float] = (0.01, 0.1, 1.0)
    seg_modes: Sequence[str] = ("frozen", "finetune")
    seg_iterations: int = 25
    seg_batch_size: int = 16
    seg_val_items: int = 32
    split: str = "test"  # where locality, retrieval and grounding are measured; "validation" for tuning
    heatmap_phrases: int = 4  # 0: no heatmap figure
    num_workers: int = 0
    phantom_num: int = 2000
    image_size: int | None = None  # None: the scale overlay's
    # None: one WordPiece tokenizer trained into <work_dir>/tokenizer. Training one is not deterministic
    # (tokenizers 0.23, huggingface/tokenizers#1794), so runs that are compared, or repeated, should share one.
    tokenizer_dir: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.objectives) - set(OBJECTIVES)
        if unknown:
            raise ValueError(f"unknown objectives {sorted(unknown)}; choose from {list(OBJECTIVES)}.")
        bad = [m for m in self.seg_modes if m not in ("frozen", "finetune")]
        if bad:
            raise ValueError(f"seg_modes must be 'frozen' or 'finetune', got {bad}.")


def _bundle(name: str, *files: str) -> list[str]:
    return [str(BUNDLES / name / "configs" / f) for f in files]


def _run_bundle(config_files: list[str], meta: str, **overrides: Any) -> None:
    from monai.bundle import run

    run(config_file=config_files, meta_file=meta, logging_file=str(BUNDLES / "elvis_pretrain" / "configs" / "logging.conf"),
        **overrides)  # fmt: skip


class StudyRunner:
    """Runs the study of ``config`` step by step; :meth:`run` returns the records (one dict per finished step)."""

    def __init__(self, config: StudyConfig) -> None:
        self.cfg = config
        self.work = Path(config.work_dir).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.records_file = self.work / "records.jsonl"
        self.tokenizer_dir = Path(config.tokenizer_dir).resolve() if config.tokenizer_dir else self.work / "tokenizer"
        self.records = self._load_records()
        settings = json.loads(json.dumps(asdict(config)))  # lists, as read back from JSON
        previous_file = self.work / "config.json"
        if self.records and previous_file.is_file():
            previous = json.loads(previous_file.read_text())
            defaults = json.loads(json.dumps(asdict(StudyConfig())))  # a setting added since then: its default
            changed = sorted(k for k in settings if previous.get(k, defaults[k]) != settings[k])
            if changed:  # resuming with other settings would mix results of two studies in one table
                raise ValueError(f"{self.work} holds a study run with other settings ({', '.join(changed)}): "
                                 "use another --work-dir, or the same settings to resume.")  # fmt: skip
        previous_file.write_text(json.dumps(settings, indent=1))

    # ------------------------------------------------------------------ bookkeeping
    def _load_records(self) -> list[dict]:
        return load_records(self.records_file) if self.records_file.is_file() else []

    def done(self, **key: Any) -> dict | None:
        for r in self.records:
            if all(r.get(k) == v for k, v in key.items()):
                return r
        return None

    def record(self, **fields: Any) -> dict:
        self.records.append(fields)
        with open(self.records_file, "a") as f:
            f.write(json.dumps(fields) + "\n")
        return fields

    # ------------------------------------------------------------------ steps
    def prepare(self) -> None:
        """The phantom (shared by every run) and the tokenizer, shared by every objective: ``tokenizer_dir``, or
        one trained on the phantom's reports."""
        from monai_elvis.data.phantom import prepare_phantom
        from monai_elvis.engines import ensure_tokenizer

        prepare_phantom(self.cfg.dataset_dir, num=self.cfg.phantom_num, size=256, seed=0)
        ensure_tokenizer(self.tokenizer_dir, Path(self.cfg.dataset_dir) / "datalist.json", 4096)

    def _scale_files(self) -> list[str]:
        return [str(ROOT / "configs" / "scale" / f"{self.cfg.scale}.json")]

    def _pretrain_overrides(self, seed: int) -> dict:
        o = {"seed": seed, "dataset_dir": str(Path(self.cfg.dataset_dir).resolve()), "num_workers": self.cfg.num_workers,
             "tokenizer_dir": str(self.tokenizer_dir), **self.cfg.pretrain_overrides}  # fmt: skip
        if self.cfg.image_size:
            o["image_size"] = self.cfg.image_size
        return o

    def pretrain(self, objective: str, seed: int) -> Path:
        """Pre-train (or, for ``random``, save an untrained network) and return the bundle root."""
        root = self.work / "pretrain" / f"{objective}_s{seed}"
        if self.done(step="pretrain", objective=objective, seed=seed) and (root / "models" / "model.pt").is_file():
            return root
        start = time.time()
        files = _bundle("elvis_pretrain", "train.json") + self._scale_files()
        meta = _bundle("elvis_pretrain", "metadata.json")[0]
        overrides = self._pretrain_overrides(seed)
        if objective == "random":
            from monai.bundle import ConfigParser
            from monai.utils import set_determinism

            from monai_elvis.engines import save_text_model

            parser = ConfigParser()
            parser.read_config(files)
            parser.update({**overrides, "bundle_root": str(root)})
            set_determinism(seed=seed)
            net = parser.get_parsed_content("network_def")
            (root / "models").mkdir(parents=True, exist_ok=True)
            torch.save(net.state_dict(), root / "models" / "model.pt")
            save_text_model(net, overrides["tokenizer_dir"], root / "models" / "text_model")
        else:
            if root.exists():  # an interrupted run: start it again from scratch
                shutil.rmtree(root)
            files.append(str(ROOT / "configs" / "objective" / f"{objective}.json"))
            _run_bundle(files, meta, bundle_root=str(root), max_epochs=self.cfg.pretrain_epochs,
                        val_interval=self.cfg.pretrain_epochs, validate_grounding=False, **overrides)  # fmt: skip
        self.record(step="pretrain", objective=objective, seed=seed, seconds=round(time.time() - start, 1))
        return root

    def evaluate_pretrain(self, objective: str, seed: int, root: Path) -> dict:
        """Retrieval and locality preservation on ``split`` (the pre-training bundle's evaluate.json)."""
        found = self.done(step="locality", objective=objective, seed=seed)
        if found:
            return found
        start = time.time()
        files = _bundle("elvis_pretrain", "train.json") + self._scale_files() + _bundle("elvis_pretrain", "evaluate.json")
        _run_bundle(files, _bundle("elvis_pretrain", "metadata.json")[0], bundle_root=str(root), split=self.cfg.split,
                    **self._pretrain_overrides(seed), **self._network_overrides(objective))  # fmt: skip
        metrics = json.loads((root / "eval" / f"{self.cfg.split}_metrics.json").read_text())["metrics"]
        return self.record(step="locality", objective=objective, seed=seed, seconds=round(time.time() - start, 1),
                           **metrics)  # fmt: skip

    @staticmethod
    def _network_overrides(objective: str) -> dict:
        """The network settings an objective's overlay changes (``network_def#...`` keys, e.g. LoVT's attention
        pooling), for the steps that rebuild the pre-trained network from other configs than the overlay."""
        overlay = ROOT / "configs" / "objective" / f"{objective}.json"
        if not overlay.is_file():
            return {}
        return {k: v for k, v in json.loads(overlay.read_text()).items() if k.startswith("network_def#")}

    def _grounding_overrides(self, root: Path) -> dict:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(_bundle("elvis_pretrain", "train.json") + self._scale_files())
        if self.cfg.image_size:
            parser.update({"image_size": self.cfg.image_size})
        arch = {k: parser[k] for k in ("image_arch", "image_widen_factor", "image_output_stride", "image_global_pool",
                                       "embed_dim", "shared_projection", "projection_layers", "text_global_pooling",
                                       "grounding_text_feature", "grounding_similarity")}  # fmt: skip
        return {"ckpt_dir": str(root / "models"), **arch,
                "image_size": parser.get_parsed_content("image_size"), "dataset_dir": str(Path(self.cfg.dataset_dir).resolve())}  # fmt: skip

    def grounding(self, objective: str, seed: int, root: Path) -> dict:
        """Phrase-grounding CNR, mIoU and pointing on the phantom's MS-CXR CSV, overall and per category."""
        found = self.done(step="grounding", objective=objective, seed=seed)
        if found:
            return found
        start = time.time()
        eval_dir = root / "grounding"
        _run_bundle(_bundle("elvis_grounding", "inference.json", "evaluate.json"),
                    _bundle("elvis_grounding", "metadata.json")[0], bundle_root=str(BUNDLES / "elvis_grounding"),
                    eval_dir=str(eval_dir), split=self.cfg.split, **self._grounding_overrides(root),
                    **self._network_overrides(objective))  # fmt: skip
        table = json.loads((eval_dir / "grounding_by_category.json").read_text())
        return self.record(step="grounding", objective=objective, seed=seed, seconds=round(time.time() - start, 1),
                           table=table)  # fmt: skip

    def heatmaps(self, objective: str, root: Path, phrases_file: Path) -> Path:
        """Heatmaps of the study's chosen phrases (seed 0), for the side-by-side figure."""
        out = self.work / "heatmaps" / objective
        if (out / "groundings.json").is_file():
            return out
        _run_bundle(_bundle("elvis_grounding", "inference.json"), _bundle("elvis_grounding", "metadata.json")[0],
                    bundle_root=str(BUNDLES / "elvis_grounding"), output_dir=str(out), datalist_file=str(phrases_file),
                    **self._grounding_overrides(root), **self._network_overrides(objective))  # fmt: skip
        return out

    def segmentation(self, objective: str, seed: int, root: Path, fraction: float, mode: str) -> dict:
        """Fine-tune (or train the decoder of a frozen encoder) on ``fraction`` of the labels; test Dice."""
        key = dict(step="segmentation", objective=objective, seed=seed, fraction=fraction, mode=mode)
        found = self.done(**key)
        if found:
            return found
        seg_root = self.work / "segmentation" / f"{objective}_s{seed}_{mode}_{fraction}"
        if seg_root.exists():
            shutil.rmtree(seg_root)
        start = time.time()
        g = self._grounding_overrides(root)
        files = _bundle("elvis_cxr_segmentation", "train.json")
        if self.cfg.segmentation_overlay:
            files.append(str(ROOT / self.cfg.segmentation_overlay))
        common = dict(bundle_root=str(seg_root), dataset_dir=g["dataset_dir"], seed=seed, image_size=g["image_size"],
                      image_arch=g["image_arch"], image_widen_factor=g["image_widen_factor"],
                      num_workers=self.cfg.num_workers, cache_rate=0.0)  # fmt: skip
        meta = _bundle("elvis_cxr_segmentation", "metadata.json")[0]
        # random + finetune is training from scratch; random + frozen is a frozen random encoder (a probe's floor)
        scratch = objective == "random" and mode == "finetune"
        pretrained = None if scratch else str(root / "models" / "model.pt")
        _run_bundle(files, meta, **common, label_fraction=fraction, pretrained_ckpt=pretrained,
                    freeze_encoder=mode == "frozen", max_epochs=1, epoch_length=self.cfg.seg_iterations,
                    val_interval=1, batch_size=self.cfg.seg_batch_size,
                    **{"validate#data": "$monai_elvis.data.datalist_split(@datalist, 'validation', @dataset_dir, "
                                        f"@path_keys)[:{self.cfg.seg_val_items}]"})  # fmt: skip
        _run_bundle(files + _bundle("elvis_cxr_segmentation", "evaluate.json"), meta, **common,
                    batch_size=self.cfg.seg_batch_size)  # fmt: skip
        metrics = json.loads((seg_root / "eval" / "test_metrics.json").read_text())["metrics"]
        shutil.rmtree(seg_root / "models", ignore_errors=True)  # keep the figures, not 100 checkpoints
        return self.record(**key, seconds=round(time.time() - start, 1), **metrics)

    # ------------------------------------------------------------------ all
    def run(self) -> list[dict]:
        start = time.time()
        self.prepare()
        phrases_file = self.work / "heatmap_phrases.json"
        if self.cfg.heatmap_phrases and not phrases_file.is_file():
            phrases_file.write_text(json.dumps(choose_phrases(self.cfg.dataset_dir, self.cfg.split,
                                                              self.cfg.heatmap_phrases), indent=1))  # fmt: skip
        total = len(self.cfg.seeds) * len(self.cfg.objectives)
        for i, (seed, objective) in enumerate((s, o) for s in self.cfg.seeds for o in self.cfg.objectives):
            logger.info("study: %s seed %d (%d/%d), %.0f s so far", objective, seed, i + 1, total, time.time() - start)
            root = self.pretrain(objective, seed)
            self.evaluate_pretrain(objective, seed, root)
            self.grounding(objective, seed, root)
            if self.cfg.heatmap_phrases and seed == self.cfg.seeds[0]:
                self.heatmaps(objective, root, phrases_file)
            for fraction in self.cfg.seg_fractions:
                for mode in self.cfg.seg_modes:
                    self.segmentation(objective, seed, root, fraction, mode)
        self.record(step="session", seconds=round(time.time() - start, 1))
        return self.records


def load_records(path: str | Path) -> list[dict]:
    """The records of ``records.jsonl``; a line cut by an interruption is skipped (that step runs again)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("ignoring a truncated line of %s", path)
    return records


def choose_phrases(dataset_dir: str | Path, split: str, count: int) -> list[dict]:
    """One phrase of each of the first ``count`` categories of ``split``, in a fixed order (no tuning on results)."""
    from monai_elvis.data import load_grounding_datalist

    dataset_dir = Path(dataset_dir).resolve()  # the phrases file lives elsewhere: absolute image paths
    entries = load_grounding_datalist(dataset_dir, dataset_dir / "ms_cxr.csv", split)
    chosen, seen = [], set()
    for e in sorted(entries, key=lambda e: (e["category"], e["image"], e["phrase"])):
        if e["category"] not in seen:
            seen.add(e["category"])
            chosen.append({"image": e["image"], "phrase": e["phrase"], "category": e["category"], "boxes": e["boxes"]})
        if len(chosen) == count:
            break
    return chosen
