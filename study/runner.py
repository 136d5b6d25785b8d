"""Run every (objective, seed) of the study through the bundles, recording each step's figures as it finishes.

Each finished step appends one JSON line to ``<work_dir>/records.jsonl``; a restarted study skips the steps
already recorded there, so an interrupted run loses at most the steps in progress (one per worker process).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from monai_elvis.data.workers import in_spawned_main, spawn_can_run_main

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"
OBJECTIVES = ("elvis", "lovt", "one_hot", "gloria", "convirt", "random")
logger = logging.getLogger("study")
# the segmentation schedule of the tiny study, read off its from-scratch curve (see docs/design.md)
TINY_SEG_SCHEDULE = {"batch_size": 8, "learning_rate": 0.01}


@dataclass
class StudyConfig:
    """What the study runs. The defaults are the tiny scale, sized for 100 minutes on 2 idle CPU cores: from scratch
    they took 83 minutes of wall time, 2 steps at a time (docs/design.md, "The study").

    Every objective is pre-trained for ``pretrain_epochs`` on the default (easy) phantom and measured there;
    ``length_objectives`` are also pre-trained for each of ``length_epochs`` (the training-length axis);
    ``hard_objectives`` are pre-trained on the harder, realistic phantom in ``hard_dataset_dir`` (its
    retrieval, locality and grounding figures; no segmentation). Segmentation fine-tunes ``seg_objectives``
    (all objectives when None) of the first ``seg_seeds`` seeds (all when None) for ``seg_iterations`` steps of
    ``seg_batch_size`` images at the constant rate ``seg_learning_rate``, a length chosen from the curve of a model
    trained from scratch (``seg_curve_epochs`` x ``seg_curve_epoch_length`` steps, validated after each epoch on
    ``seg_val_items`` images, each class on its own). ``seg_batch_size`` and ``seg_learning_rate`` left None are
    those of ``segmentation_overlay`` where it sets them (``batch_size``, ``learning_rate``), else the tiny
    study's 8 and 0.01. The ``seg_*`` settings may change between invocations: the segmentation steps then run
    again on the pre-trained models already there (see :class:`StudyRunner`).
    """

    work_dir: str = "runs/study"
    dataset_dir: str = "data/phantom"
    objectives: Sequence[str] = OBJECTIVES
    seeds: Sequence[int] = (0, 1, 2)
    scale: str = "tiny"  # the configs/scale overlay of pre-training; "paper" for the GPU scale
    pretrain_epochs: int = 6
    pretrain_overrides: dict = field(default_factory=dict)
    length_objectives: Sequence[str] = ("elvis", "one_hot")
    length_epochs: Sequence[int] = (2, 4)
    hard_dataset_dir: str = "data/phantom_realistic"
    hard_objectives: Sequence[str] = ("elvis", "one_hot", "random")
    segmentation_overlay: str | None = None  # e.g. configs/segmentation/paper.json at the paper scale
    seg_objectives: Sequence[str] | None = ("elvis", "one_hot", "random")  # None: all of objectives
    seg_fractions: Sequence[float] = (0.01, 0.1, 1.0)
    seg_modes: Sequence[str] = ("frozen", "finetune")
    seg_seeds: int | None = 3
    seg_iterations: int = 500
    seg_curve_epochs: int = 12
    seg_curve_epoch_length: int = 50
    seg_batch_size: int | None = None  # None: the overlay's batch_size, else TINY_SEG_SCHEDULE's
    seg_learning_rate: float | None = None  # None: the overlay's learning_rate, else TINY_SEG_SCHEDULE's
    seg_val_items: int = 64
    split: str = "test"  # where locality, retrieval and grounding are measured; "validation" for tuning
    heatmap_phrases: int = 4  # 0: no heatmap figure
    num_workers: int = 0
    phantom_num: int = 2000
    image_size: int | None = None  # None: the scale overlay's
    # None: one WordPiece tokenizer trained into <work_dir>/tokenizer (the same for the same reports, see
    # train_wordpiece_tokenizer); naming one lets a study repeat runs made with an earlier tokenizer.
    tokenizer_dir: str | None = None

    def __post_init__(self) -> None:
        unknown = (set(self.objectives) | set(self.length_objectives) | set(self.hard_objectives)
                   | set(self.seg_objectives or ())) - set(OBJECTIVES)  # fmt: skip
        if unknown:
            raise ValueError(f"unknown objectives {sorted(unknown)}; choose from {list(OBJECTIVES)}.")
        bad = [m for m in self.seg_modes if m not in ("frozen", "finetune")]
        if bad:
            raise ValueError(f"seg_modes must be 'frozen' or 'finetune', got {bad}.")
        if any(e < 1 for e in [self.pretrain_epochs, *self.length_epochs]):
            raise ValueError("pre-training lengths (pretrain_epochs, length_epochs) must be at least 1 epoch.")
        if self.seg_seeds is not None and self.seg_seeds < 1:
            raise ValueError(f"seg_seeds is the number of seeds that segment (None: all), got {self.seg_seeds}.")
        names = {"seg_batch_size": "batch_size", "seg_learning_rate": "learning_rate"}
        unset = [key for name, key in names.items() if getattr(self, name) is None]
        overlay = overlay_schedule(self.segmentation_overlay, unset) if unset else {}
        for name, key in names.items():
            if getattr(self, name) is None:  # written out, so that config.json records what ran
                setattr(self, name, overlay.get(key, TINY_SEG_SCHEDULE[key]))
        if self.seg_iterations < 1 or self.seg_batch_size < 1 or self.seg_learning_rate <= 0:
            raise ValueError("seg_iterations, seg_batch_size and seg_learning_rate must be positive, got "
                             f"{self.seg_iterations}, {self.seg_batch_size}, {self.seg_learning_rate}.")  # fmt: skip


def overlay_schedule(overlay: str | None, keys: Sequence[str] = ("batch_size", "learning_rate")) -> dict:
    """Those of ``keys`` (``batch_size``, ``learning_rate``) that a segmentation overlay (a path, relative to the
    repository or absolute; None: no overlay) sets. Raises ValueError for a missing file or a value that is not a
    positive number (a ``@`` reference or ``$`` expression cannot be written into the study's ``config.json``)."""
    if not overlay:
        return {}
    from monai.bundle import ConfigParser

    path = Path(overlay)
    path = path if path.is_absolute() else ROOT / path
    if not path.is_file():
        raise ValueError(f"segmentation_overlay {overlay!r}: no such file ({path}).")
    config = ConfigParser.load_config_file(str(path))
    found = {k: config[k] for k in keys if k in config}
    for key, value in found.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"segmentation_overlay {overlay!r}: {key} must be a positive number for the study "
                             f"(it records the schedule it ran with), got {value!r}; give --seg-{key.replace('_', '-')} "
                             "instead, or write the number into the overlay.")  # fmt: skip
    return found


EASY, HARD = "easy", "realistic"  # the phantom's difficulty settings the study runs on
# the settings each segmentation step's records depend on: a change supersedes those records
SEG_SCHEDULE = {"seg_batch_size", "seg_learning_rate", "seg_val_items", "segmentation_overlay"}
SUPERSEDED_BY = {"seg_curve": SEG_SCHEDULE | {"seg_curve_epochs", "seg_curve_epoch_length"},
                 "segmentation": SEG_SCHEDULE | {"seg_iterations", "seg_seeds", "seg_objectives", "seg_fractions",
                                                 "seg_modes"}}  # fmt: skip
# settings added after the first studies, with the value a work folder without them was run with (the rate: the
# segmentation bundle's, unless that folder's overlay set one; see legacy_settings)
LEGACY = {"seg_seeds": None, "seg_learning_rate": 0.001}


def legacy_settings(previous: dict) -> dict:
    """:data:`LEGACY` for the work folder whose ``config.json`` is ``previous``: its runs kept the rate of its
    ``segmentation_overlay`` where that set one."""
    rate = overlay_schedule(previous.get("segmentation_overlay"), ["learning_rate"]).get("learning_rate")
    return {**LEGACY, "seg_learning_rate": rate or LEGACY["seg_learning_rate"]}


def _key(record: dict) -> str:
    """A record, told apart from others whatever its supersession tag."""
    return json.dumps({k: v for k, v in record.items() if k != "superseded"}, sort_keys=True)


def is_seg_setting(name: str) -> bool:
    """The settings of the segmentation steps alone: changing them re-runs those steps, not pre-training."""
    return name.startswith("seg_") or name == "segmentation_overlay"


# the segmentation bundle's cosine scheduler replaced by one that keeps the optimizer's rate (ConstantLR, factor 1)
CONSTANT_LR = {"train#lr_scheduler": {"_target_": "torch.optim.lr_scheduler.ConstantLR", "optimizer": "@optimizer",
                                      "factor": 1.0}}


def _bundle(name: str, *files: str) -> list[str]:
    return [str(BUNDLES / name / "configs" / f) for f in files]


def _run_bundle(config_files: list[str], meta: str, **overrides: Any) -> None:
    from monai.bundle import run

    run(config_file=config_files, meta_file=meta, logging_file=str(BUNDLES / "elvis_pretrain" / "configs" / "logging.conf"),
        **overrides)  # fmt: skip


class StudyRunner:
    """Runs the study of ``config`` step by step; :meth:`run` returns the records (one dict per finished step)."""

    def __init__(self, config: StudyConfig) -> None:
        self._open(config)
        self.work.mkdir(parents=True, exist_ok=True)
        self.records = self._load_records()
        settings = json.loads(json.dumps(asdict(config)))  # lists, as read back from JSON
        previous_file = self.work / "config.json"
        if self.records and previous_file.is_file():
            previous = json.loads(previous_file.read_text())
            # a setting added since then: the value those runs had (LEGACY), else its default
            defaults = {**json.loads(json.dumps(asdict(StudyConfig()))), **legacy_settings(previous)}
            previous = {k: previous.get(k, defaults[k]) for k in settings}
            # where the folder is does not change what it holds: a moved or copied work folder resumes
            changed = sorted(k for k in settings if previous[k] != settings[k] and k != "work_dir")
            if settings["seeds"][: len(previous["seeds"])] == previous["seeds"]:  # more seeds after the same ones
                changed = [k for k in changed if k != "seeds"]  # extend the study
            refused = [k for k in changed if not is_seg_setting(k)]
            if refused:  # would mix results of two studies in one table
                raise ValueError(f"{self.work} holds a study run with other settings ({', '.join(refused)}): "
                                 "use another --work-dir, or the same settings to resume (--seeds may add "
                                 "seeds after the ones it has; the seg_* settings may change).")  # fmt: skip
            old_seeds, new_seeds = (s["seeds"][: s["seg_seeds"]] for s in (previous, settings))  # [:None]: all
            if new_seeds[: len(old_seeds)] == old_seeds:  # more seeds segment: the runs there are kept
                changed = [k for k in changed if k != "seg_seeds"]
            steps = [step for step, names in SUPERSEDED_BY.items() if set(changed) & names]
            if steps or (self.work / "superseding.json").is_file():
                self._supersede(steps, changed, previous)
        previous_file.write_text(json.dumps(settings, indent=1))

    def _supersede(self, steps: Sequence[str], changed: Sequence[str], previous: dict) -> None:
        """Other segmentation settings: the records of ``steps`` (``segmentation``, ``seg_curve``) made with the
        old ones move to ``records_superseded.jsonl`` (each tagged ``superseded: n``), and with the segmentation
        runs their per-item files and the settings they ran with to ``items_superseded/<n>/``, so the report never
        mixes two schedules and nothing is deleted; pre-training, evaluation and grounding records stay and are
        reused. ``superseding.json`` names the supersession under way until it is complete: one an interruption
        cut short is completed, under its number, by the next invocation."""
        kept, moved = self.work / "items_superseded", self.work / "records_superseded.jsonl"
        journal = self.work / "superseding.json"
        earlier = load_records(moved) if moved.is_file() else []
        resuming = journal.is_file()  # cut short: complete it, whatever the settings are now
        if resuming:
            n, steps = (json.loads(journal.read_text())[k] for k in ("n", "steps"))
        old = [r for r in self.records if r.get("step") in steps]
        items = sorted((self.work / "items").glob("seg_*.json")) if "segmentation" in steps else []
        if resuming:
            logger.warning("study: completing supersession %d of %s, cut short earlier", n, " and ".join(steps))
        elif not old and not items:
            return
        else:
            folders = [int(p.name) for p in kept.glob("*") if p.name.isdigit()]
            n = 1 + max(folders + [r.get("superseded", 0) for r in earlier], default=0)  # in records and folders
            journal.write_text(json.dumps({"n": n, "steps": list(steps)}))
            logger.warning("study: segmentation settings changed (%s): %d records of %s superseded, kept in %s",
                           ", ".join(changed), len(old), " and ".join(steps), moved)  # fmt: skip
        if "segmentation" in steps:  # first the files, then the records
            (kept / str(n)).mkdir(parents=True, exist_ok=True)
            if not (kept / str(n) / "config.json").is_file():
                (kept / str(n) / "config.json").write_text(json.dumps(previous, indent=1))
            for path in items:
                path.replace(kept / str(n) / path.name)
        there = Counter(_key(r) for r in earlier if r.get("superseded") == n)  # copied before an interruption
        with open(moved, "a") as f:
            for r in old:
                if there[_key(r)]:
                    there[_key(r)] -= 1
                else:
                    f.write(json.dumps({**r, "superseded": n}) + "\n")
        self.records = [r for r in self.records if r.get("step") not in steps]
        partial = self.records_file.with_suffix(".jsonl.partial")  # replaced whole: never a half-written file
        partial.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        os.replace(partial, self.records_file)
        journal.unlink()

    def _open(self, config: StudyConfig) -> None:
        self.cfg = config
        self.work = Path(config.work_dir).resolve()
        self.records_file = self.work / "records.jsonl"
        self.tokenizer_dir = Path(config.tokenizer_dir).resolve() if config.tokenizer_dir else self.work / "tokenizer"
        self.written: list[dict] | None = None  # None: records go to records_file; a list: a worker's, kept there
        # a worker's per-item merges into items/<name>.json (name, part, source), left for the parent to make: two
        # steps of one model (its evaluation and its grounding) end in different processes, and a file that both
        # read, change and write back would keep only one of them
        self.kept_items: list[tuple[str, str, str]] = []

    @classmethod
    def worker(cls, config: StudyConfig) -> StudyRunner:
        """A runner for one step in a worker process: it reads the records but writes none; the records of its
        step are left in :attr:`written`, and its per-item merges in :attr:`kept_items`, for the parent (:meth:`run`)
        to make."""
        runner = cls.__new__(cls)
        runner._open(config)
        runner.records = runner._load_records()
        runner.written = []
        return runner

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
        if self.written is not None:
            self.written.append(fields)
            return fields
        with open(self.records_file, "a") as f:
            f.write(json.dumps(fields) + "\n")
        return fields

    # ------------------------------------------------------------------ steps
    def _dataset(self, phantom: str) -> Path:
        return Path(self.cfg.dataset_dir if phantom == EASY else self.cfg.hard_dataset_dir).resolve()

    def prepare(self) -> None:
        """The phantoms (shared by every run) and the tokenizer, shared by every objective: ``tokenizer_dir``, or
        one trained on the default phantom's reports (the harder phantom's reports are written the same way)."""
        from monai_elvis.data.phantom import prepare_phantom, progress_logger
        from monai_elvis.engines import ensure_tokenizer

        prepare_phantom(self.cfg.dataset_dir, num=self.cfg.phantom_num, size=256, seed=0, difficulty=EASY,
                        progress=progress_logger())  # fmt: skip
        if self.cfg.hard_objectives:
            prepare_phantom(self.cfg.hard_dataset_dir, num=self.cfg.phantom_num, size=256, seed=0, difficulty=HARD,
                            progress=progress_logger())  # fmt: skip
        ensure_tokenizer(self.tokenizer_dir, Path(self.cfg.dataset_dir) / "datalist.json", 4096)

    def _scale_files(self) -> list[str]:
        return [str(ROOT / "configs" / "scale" / f"{self.cfg.scale}.json")]

    def _pretrain_overrides(self, seed: int, phantom: str = EASY) -> dict:
        o = {"seed": seed, "dataset_dir": str(self._dataset(phantom)), "phantom_difficulty": phantom,
             "num_workers": self.cfg.num_workers, "tokenizer_dir": str(self.tokenizer_dir),
             **self.cfg.pretrain_overrides}  # fmt: skip
        if self.cfg.image_size:
            o["image_size"] = self.cfg.image_size
        return o

    def _root(self, objective: str, seed: int, phantom: str, epochs: int) -> Path:
        return self.work / "pretrain" / f"{phantom}_{objective}_s{seed}_e{epochs}"

    def _items(self, name: str) -> Path:
        return self.work / "items" / f"{name}.json"

    def pretrain(self, objective: str, seed: int, phantom: str = EASY, epochs: int | None = None) -> Path:
        """Pre-train (or, for ``random``, save an untrained network) and return the bundle root."""
        epochs = epochs or self.cfg.pretrain_epochs
        key = dict(objective=objective, seed=seed, phantom=phantom, epochs=epochs)
        root = self._root(**key)
        if self.done(step="pretrain", **key) and (root / "models" / "model.pt").is_file():
            return root
        start = time.time()
        files = _bundle("elvis_pretrain", "train.json") + self._scale_files()
        meta = _bundle("elvis_pretrain", "metadata.json")[0]
        overrides = self._pretrain_overrides(seed, phantom)
        if root.exists():  # an interrupted run: start it again from scratch
            shutil.rmtree(root)
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
            files.append(str(ROOT / "configs" / "objective" / f"{objective}.json"))
            _run_bundle(files, meta, bundle_root=str(root), max_epochs=epochs, val_interval=epochs,
                        validate_grounding=False, prepare_phantom=False, **overrides)  # fmt: skip
        self.record(step="pretrain", **key, seconds=round(time.time() - start, 1))
        return root

    def evaluate_pretrain(self, objective: str, seed: int, root: Path, phantom: str = EASY,
                          epochs: int | None = None) -> dict:  # fmt: skip
        """Zero-shot classification, retrieval, phrase sensitivity and locality preservation on ``split`` (the
        pre-training bundle's evaluate.json); the value of every test item is kept in ``items/``."""
        key = dict(objective=objective, seed=seed, phantom=phantom, epochs=epochs or self.cfg.pretrain_epochs)
        found = self.done(step="locality", **key)
        if found:
            return found
        start = time.time()
        files = _bundle("elvis_pretrain", "train.json") + self._scale_files() + _bundle("elvis_pretrain", "evaluate.json")
        _run_bundle(files, _bundle("elvis_pretrain", "metadata.json")[0], bundle_root=str(root), split=self.cfg.split,
                    validate_grounding=False, prepare_phantom=False, **self._pretrain_overrides(seed, phantom),
                    **self._network_overrides(objective))  # fmt: skip
        metrics = json.loads((root / "eval" / f"{self.cfg.split}_metrics.json").read_text())["metrics"]
        self._keep_items(self._root(**key).name, "validate", root / "eval" / f"{self.cfg.split}_items.json")
        return self.record(step="locality", **key, seconds=round(time.time() - start, 1), **metrics)

    def _keep_items(self, name: str, part: str, source: Path) -> None:
        """Merge the per-item values of ``source`` into ``items/<name>.json`` under ``part`` (in a worker: later,
        by the parent)."""
        if self.written is not None:
            self.kept_items.append((name, part, str(source)))
            return
        target = self._items(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(target.read_text()) if target.is_file() else {}
        data[part] = json.loads(source.read_text())
        target.write_text(json.dumps(data))

    @staticmethod
    def _network_overrides(objective: str) -> dict:
        """The network settings an objective's overlay changes (``network_def#...`` keys, e.g. LoVT's attention
        pooling), for the steps that rebuild the pre-trained network from other configs than the overlay."""
        overlay = ROOT / "configs" / "objective" / f"{objective}.json"
        if not overlay.is_file():
            return {}
        return {k: v for k, v in json.loads(overlay.read_text()).items() if k.startswith("network_def#")}

    def _grounding_overrides(self, root: Path, phantom: str = EASY) -> dict:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(_bundle("elvis_pretrain", "train.json") + self._scale_files())
        if self.cfg.image_size:
            parser.update({"image_size": self.cfg.image_size})
        arch = {k: parser[k] for k in ("image_arch", "image_widen_factor", "image_output_stride", "image_global_pool",
                                       "embed_dim", "shared_projection", "projection_layers", "text_global_pooling",
                                       "grounding_text_feature", "grounding_similarity", "grounding_sigma", "text_model",
                                       "vocab_size", "text_config")}  # fmt: skip
        return {"ckpt_dir": str(root / "models"), "tokenizer_dir": str(self.tokenizer_dir), **arch,
                "image_size": parser.get_parsed_content("image_size"), "dataset_dir": str(self._dataset(phantom))}  # fmt: skip

    def grounding(self, objective: str, seed: int, root: Path, phantom: str = EASY, epochs: int | None = None) -> dict:
        """Phrase-grounding CNR, mIoU, pointing and side of the peak on the phantom's MS-CXR CSV, overall and per
        category; the value of every phrase is kept in ``items/``."""
        key = dict(objective=objective, seed=seed, phantom=phantom, epochs=epochs or self.cfg.pretrain_epochs)
        found = self.done(step="grounding", **key)
        if found:
            return found
        start = time.time()
        eval_dir = root / "grounding"
        _run_bundle(_bundle("elvis_grounding", "inference.json", "evaluate.json"),
                    _bundle("elvis_grounding", "metadata.json")[0], bundle_root=str(BUNDLES / "elvis_grounding"),
                    eval_dir=str(eval_dir), split=self.cfg.split, **self._grounding_overrides(root, phantom),
                    **self._network_overrides(objective))  # fmt: skip
        table = json.loads((eval_dir / "grounding_by_category.json").read_text())
        self._keep_items(self._root(**key).name, "grounding", eval_dir / "grounding_items.json")
        return self.record(step="grounding", **key, seconds=round(time.time() - start, 1), table=table)

    def heatmaps(self, objective: str, root: Path, phrases_file: Path) -> Path:
        """Heatmaps of the study's chosen phrases (seed 0), for the side-by-side figure."""
        out = self.work / "heatmaps" / objective
        if (out / "groundings.json").is_file():
            return out
        _run_bundle(_bundle("elvis_grounding", "inference.json"), _bundle("elvis_grounding", "metadata.json")[0],
                    bundle_root=str(BUNDLES / "elvis_grounding"), output_dir=str(out), datalist_file=str(phrases_file),
                    **self._grounding_overrides(root), **self._network_overrides(objective))  # fmt: skip
        return out

    def _seg_common(self, root: Path | None, seed: int, seg_root: Path) -> dict:
        g = self._grounding_overrides(root or self.work)
        return dict(bundle_root=str(seg_root), dataset_dir=g["dataset_dir"], seed=seed, image_size=g["image_size"],
                    image_arch=g["image_arch"], image_widen_factor=g["image_widen_factor"], prepare_phantom=False,
                    num_workers=self.cfg.num_workers, cache_rate=1.0, batch_size=self.cfg.seg_batch_size,
                    learning_rate=self.cfg.seg_learning_rate)  # fmt: skip

    def _seg_files(self) -> list[str]:
        files = _bundle("elvis_cxr_segmentation", "train.json")
        if self.cfg.segmentation_overlay:
            files.append(str(ROOT / self.cfg.segmentation_overlay))
        return files

    def _seg_val_data(self) -> dict:
        return {"validate#data": "$monai_elvis.data.datalist_split(@datalist, 'validation', @dataset_dir, "
                                 f"@path_keys)[:{self.cfg.seg_val_items}]"}  # fmt: skip

    def _seg_class_names(self) -> list[str]:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(self._seg_files())
        return list(parser["class_names"])

    def segmentation_curve(self) -> dict | None:
        """The validation Dice of a segmentation model trained from scratch on every label, after each of
        ``seg_curve_epochs`` epochs of ``seg_curve_epoch_length`` steps, in all and of each class (``per_class``;
        None where no validation image has the class): the curve that sizes ``seg_iterations``.

        The learning rate stays constant, as in the study's runs (one epoch each, whose cosine schedule of one epoch
        lowers the rate only after their last step); with the bundle's cosine over the curve's epochs, the curve
        would level off where the rate reaches 0, not where learning does."""
        if not self.cfg.seg_curve_epochs:
            return None
        found = self.done(step="seg_curve")
        if found:
            return found
        seg_root = self.work / "segmentation" / "curve"
        if seg_root.exists():
            shutil.rmtree(seg_root)
        start = time.time()
        classes = self._seg_class_names()[1:]
        _run_bundle(self._seg_files(), _bundle("elvis_cxr_segmentation", "metadata.json")[0],
                    **self._seg_common(None, self.cfg.seeds[0], seg_root), label_fraction=1.0, pretrained_ckpt=None,
                    freeze_encoder=False, max_epochs=self.cfg.seg_curve_epochs,
                    epoch_length=self.cfg.seg_curve_epoch_length, val_interval=1, **CONSTANT_LR,
                    **self._seg_val_data(), **{"validate#additional_metrics": per_class_dice(classes)})  # fmt: skip
        history = [json.loads(line) for line in (seg_root / "eval" / "metrics_history.jsonl").read_text().splitlines()]
        curve = [{"iterations": h["epoch"] * self.cfg.seg_curve_epoch_length,
                  "val_mean_dice": h["metrics"].get("val_mean_dice"),
                  "per_class": {c: h["metrics"].get(f"val_dice_{c}") for c in classes}} for h in history]  # fmt: skip
        shutil.rmtree(seg_root / "models", ignore_errors=True)
        return self.record(step="seg_curve", seconds=round(time.time() - start, 1), curve=curve,
                           batch_size=self.cfg.seg_batch_size, learning_rate=self.cfg.seg_learning_rate)  # fmt: skip

    def segmentation(self, objective: str, seed: int, root: Path, fraction: float, mode: str) -> dict:
        """Fine-tune (or train the decoder of a frozen encoder) on ``fraction`` of the labels; test Dice, and the
        Dice of every test image in ``items/``."""
        key = dict(step="segmentation", objective=objective, seed=seed, fraction=fraction, mode=mode)
        found = self.done(**key)
        if found:
            return found
        name = f"{objective}_s{seed}_{mode}_{fraction}"
        seg_root = self.work / "segmentation" / name
        if seg_root.exists():
            shutil.rmtree(seg_root)
        start = time.time()
        files = self._seg_files()
        common = self._seg_common(root, seed, seg_root)
        meta = _bundle("elvis_cxr_segmentation", "metadata.json")[0]
        # random + finetune is training from scratch; random + frozen is a frozen random encoder (a probe's floor)
        scratch = objective == "random" and mode == "finetune"
        pretrained = None if scratch else str(root / "models" / "model.pt")
        _run_bundle(files, meta, **common, label_fraction=fraction, pretrained_ckpt=pretrained,
                    freeze_encoder=mode == "frozen", max_epochs=1, epoch_length=self.cfg.seg_iterations,
                    val_interval=1, **self._seg_val_data())  # fmt: skip
        _run_bundle(files + _bundle("elvis_cxr_segmentation", "evaluate.json"), meta, **common)
        metrics = json.loads((seg_root / "eval" / "test_metrics.json").read_text())["metrics"]
        self._keep_seg_items(f"seg_{name}", seg_root / "eval" / "test_mean_dice_raw.csv")
        shutil.rmtree(seg_root / "models", ignore_errors=True)  # keep the figures, not 100 checkpoints
        return self.record(**key, phantom=EASY, epochs=self.cfg.pretrain_epochs, seconds=round(time.time() - start, 1),
                           **metrics)  # fmt: skip

    def _keep_seg_items(self, name: str, raw_csv: Path) -> None:
        """The mean Dice over classes of every test image: the ``mean`` column of MONAI's MetricsSaver raw CSV
        (one row per image; NaN, kept as None, where no class is in either the prediction or the label)."""
        import csv
        import math

        with open(raw_csv, newline="") as f:
            values = [float(row["mean"]) for row in csv.DictReader(f)]
        values = [None if math.isnan(v) else v for v in values]
        target = self._items(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({"segmentation": {"metrics": {"test_mean_dice": values}}}))

    # ------------------------------------------------------------------ all
    def tasks(self, phrases_file: Path | None = None) -> list[Task]:
        """Every step of the study, in the order they start: seed by seed, so that an interrupted study has whole
        seeds; each model's measures and segmentation runs after its pre-training."""
        seg_objectives = self.cfg.objectives if self.cfg.seg_objectives is None else self.cfg.seg_objectives
        seg_seeds = list(self.cfg.seeds)[: self.cfg.seg_seeds]  # [:None] is all of them
        tasks = [Task("segmentation curve", "segmentation_curve", {})]
        for seed in self.cfg.seeds:
            models = [(o, EASY, None) for o in self.cfg.objectives]
            models += [(o, EASY, e) for e in self.cfg.length_epochs for o in self.cfg.length_objectives
                       if e != self.cfg.pretrain_epochs]  # fmt: skip
            models += [(o, HARD, None) for o in self.cfg.hard_objectives]
            for objective, phantom, epochs in models:
                key = dict(objective=objective, seed=seed, phantom=phantom, epochs=epochs)
                name = f"{objective} seed {seed}, {phantom} phantom, {epochs or self.cfg.pretrain_epochs} epochs"
                main = phantom == EASY and epochs is None
                draw = main and bool(self.cfg.heatmap_phrases) and seed == self.cfg.seeds[0] and phrases_file
                after = f"pre-training {name}"
                root = self._root(objective, seed, phantom, epochs or self.cfg.pretrain_epochs)
                tasks += [Task(after, "pretrain", key), Task(f"evaluation of {name}", "evaluate_pretrain",
                                                            {**key, "root": root}, after),
                          Task(f"grounding of {name}", "grounding", {**key, "root": root}, after)]  # fmt: skip
                if draw:
                    tasks.append(Task(f"heatmaps of {name}", "heatmaps",
                                      dict(objective=objective, root=root, phrases_file=phrases_file), after))  # fmt: skip
                if main and objective in seg_objectives and seed in seg_seeds:
                    tasks += [Task(f"segmentation {objective} seed {seed}, {mode} {fraction:g}", "segmentation",
                                   dict(objective=objective, seed=seed, root=root, fraction=fraction, mode=mode), after)
                              for fraction in self.cfg.seg_fractions for mode in self.cfg.seg_modes]  # fmt: skip
        unique = {t.name: t for t in tasks}  # a value given twice (--seeds 0 0) is one step, run once
        return list(unique.values())

    def run(self, processes: int = 1) -> list[dict]:
        """Run the steps not yet recorded, ``processes`` at a time, each in a worker process on one thread (so
        that the figures do not depend on how many run at once); the records are written here as each step ends.

        A step that fails stops the study with its error, once the steps already under way have ended and been
        recorded; a worker that dies stops it too, and takes the steps the other workers were running with it."""
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}.")
        if processes > 1 and in_spawned_main():
            raise RuntimeError("a study worker is running the main script again. " + WORKER_HELP)
        start = time.time()
        self.prepare()
        phrases_file = self.work / "heatmap_phrases.json"
        if self.cfg.heatmap_phrases and not phrases_file.is_file():
            phrases_file.write_text(json.dumps(choose_phrases(self.cfg.dataset_dir, self.cfg.split,
                                                              self.cfg.heatmap_phrases), indent=1))  # fmt: skip
        if processes > 1 and not spawn_can_run_main():
            logger.warning("the main script was read from stdin, where worker processes cannot start: the study runs "
                           "its steps one at a time, in this process")  # fmt: skip
            processes = 1
        pending = self.tasks(phrases_file)
        total, finished, running, error = len(pending), set(), {}, None
        # spawn, not fork (a fork of a process that has used torch's threads can hang), in an executor, which
        # raises BrokenProcessPool for a worker that dies (see monai_elvis.data.workers)
        context = multiprocessing.get_context("spawn")
        executor = _InProcess() if processes == 1 else ProcessPoolExecutor(processes, mp_context=context,
                                                                           initializer=_init_worker)  # fmt: skip
        with executor as pool:
            while pending or running:
                while error is None and len(running) < processes:
                    ready = next((t for t in pending if t.after is None or t.after in finished), None)
                    if ready is None:
                        break
                    pending.remove(ready)
                    logger.info("study: %s (%d/%d), %.0f s so far", ready.name, total - len(pending), total,
                                time.time() - start)  # fmt: skip
                    try:
                        running[pool.submit(_run_task, self.cfg, ready.method, ready.kwargs)] = ready
                    except BrokenProcessPool as e:  # a worker died since the last wait
                        error = error or ([ready], e)
                if not running:
                    break
                ended, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in ended:
                    task = running.pop(future)
                    try:
                        written, kept_items = future.result()
                    except BrokenProcessPool as e:  # every step under way fails with it: name them all
                        error = error or ([task, *running.values()], e)
                        continue
                    except Exception as e:  # noqa: BLE001 - re-raised below, once the other steps have ended
                        logger.error("study: %s failed: %s", task.name, e)
                        error = error or ([task], e)
                        continue
                    for name, part, source in kept_items:  # the values first: a record means they are kept
                        self._keep_items(name, part, Path(source))
                    for fields in written:
                        self.record(**fields)
                    finished.add(task.name)
        if error is not None:
            tasks, e = error
            names = " or ".join(repr(t.name) for t in tasks)
            why = ("a worker process died (its error, if any, is printed above), e.g. out of memory: try fewer "
                   f"--processes. {WORKER_HELP}" if isinstance(e, BrokenProcessPool) else f"{type(e).__name__}: {e}")
            raise RuntimeError(f"study step {names} failed ({why}); the steps that ended are recorded in "
                               f"{self.records_file}, and running the study again resumes.") from e  # fmt: skip
        if pending:  # cannot happen: every task waits for one listed before it
            raise RuntimeError(f"study steps never started: {[t.name for t in pending]}")
        self.record(step="session", seconds=round(time.time() - start, 1), processes=processes)
        return self.records


@dataclass(frozen=True)
class Task:
    """One step of the study: :class:`StudyRunner`'s ``method`` called with ``kwargs``, once ``after`` (the name of
    another task, or None) has ended."""

    name: str
    method: str
    kwargs: dict
    after: str | None = None


WORKER_HELP = ("The study's workers are started with 'spawn': each runs the main script again first, so a script "
               "that runs the study at its top level (without an `if __name__ == \"__main__\":` guard) cannot start "
               "them. Put the call under that guard, pass processes=1, or run `python -m study run`.")


def _init_worker() -> None:
    torch.set_num_threads(1)


class _InProcess:
    """An executor for ``processes=1``: runs each call at once, in this process, on one thread (as a worker does)."""

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn, *args: Any) -> Future:
        future: Future = Future()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            future.set_result(fn(*args))
        except Exception as e:  # noqa: BLE001 - handed to the caller through the future, as a pool would
            future.set_exception(e)
        finally:
            torch.set_num_threads(threads)
        return future


def _run_task(config: StudyConfig, method: str, kwargs: dict) -> tuple[list[dict], list[tuple[str, str, str]]]:
    """In a worker process: one step of the study; the records it made and its per-item merges (the parent makes
    both)."""
    runner = StudyRunner.worker(config)
    getattr(runner, method)(**kwargs)
    return runner.written, runner.kept_items


def default_processes() -> int:
    """Steps run at once: one per CPU core this process may use, or 1 with a GPU (where the runs share it)."""
    if torch.cuda.is_available():
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def per_class_dice(class_names: Sequence[str]) -> dict:
    """Validation metrics (``validate#additional_metrics`` of the segmentation bundle) of each class on its own:
    ``val_dice_<name>``, MONAI's ``MeanDice`` of that class's channel of the one-hot prediction and label, for
    ``class_names`` without the background (channels 1, 2, ...)."""
    return {f"val_dice_{name}": {"_target_": "MeanDice", "include_background": True, "save_details": False,
                                 "output_transform": f"$lambda out: ([o['pred'][{k}:{k + 1}] for o in out], "
                                                     f"[o['label'][{k}:{k + 1}] for o in out])"}
            for k, name in enumerate(class_names, start=1)}  # fmt: skip


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
