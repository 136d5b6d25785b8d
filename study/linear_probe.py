"""Linear probe at 1/10/100% of the labels: a pre-trained image encoder against a random initialisation.

Every (encoder, label fraction, seed) runs the ``elvis_cxr_classification`` bundle as it is: ``train.json`` with
the encoder frozen (the best validation AUROC's model is kept), then ``evaluate.json`` on the test split. Each
finished run appends one JSON line to ``<work_dir>/records.jsonl``; a restarted probe skips the runs recorded
there. The table gives the test AUROC (mean over the finding kinds) as mean ± sample standard deviation over
the seeds.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "elvis_cxr_classification" / "configs"
ENCODERS = ("pretrained", "random")
logger = logging.getLogger("study")


@dataclass
class ProbeConfig:
    """The probe's settings. The defaults fit about 15 minutes on a loaded 2-core machine."""

    pretrained_ckpt: str
    work_dir: str = "runs/linear_probe"
    dataset_dir: str = "data/phantom"
    fractions: Sequence[float] = (0.01, 0.1, 1.0)
    seeds: Sequence[int] = (0, 1, 2)
    encoders: Sequence[str] = ENCODERS
    epochs: int = 4  # validations; the best one's model is tested
    iterations: int = 25  # per epoch, whatever the fraction: every fraction gets the same number of steps
    batch_size: int = 32
    learning_rate: float = 0.01
    image_size: int = 128
    num_workers: int = 0

    def overrides(self, encoder: str, fraction: float, seed: int, bundle_root: Path) -> dict:
        return {
            "bundle_root": str(bundle_root), "dataset_dir": str(Path(self.dataset_dir).resolve()),
            "pretrained_ckpt": str(Path(self.pretrained_ckpt).resolve()) if encoder == "pretrained" else None,
            "freeze_encoder": True, "label_fraction": fraction, "seed": seed, "max_epochs": self.epochs,
            "epoch_length": self.iterations, "batch_size": self.batch_size, "learning_rate": self.learning_rate,
            "image_size": self.image_size, "num_workers": self.num_workers, "resume": False,
        }  # fmt: skip


def _run(files: Sequence[Path], overrides: dict) -> None:
    from monai.bundle import run

    run(config_file=[str(f) for f in files], meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"), **overrides)  # fmt: skip


def load_records(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run_linear_probe(cfg: ProbeConfig, progress: Callable[[str], None] = logger.info) -> list[dict]:
    """Run every (encoder, fraction, seed) not yet in ``<work_dir>/records.jsonl``; return all the records."""
    from monai_elvis.data import datalist_split

    if "pretrained" in cfg.encoders and not Path(cfg.pretrained_ckpt).is_file():
        raise FileNotFoundError(f"no pre-training checkpoint at {cfg.pretrained_ckpt}: pre-train first (python "
                                "-m monai.bundle run --config_file bundles/elvis_pretrain/configs/train.json).")
    work = Path(cfg.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k not in ("work_dir", "seeds",
                "fractions", "encoders", "num_workers")}  # fmt: skip
    settings_file = work / "settings.json"
    records_file = work / "records.jsonl"
    records = load_records(records_file)
    if records and settings_file.is_file() and json.loads(settings_file.read_text()) != settings:
        raise ValueError(f"{work} holds probe runs with other settings: use another --work-dir, or the same "
                         "settings to resume.")  # fmt: skip
    settings_file.write_text(json.dumps(settings, indent=1))
    done = {(r["encoder"], r["fraction"], r["seed"]) for r in records}
    runs = [(e, f, s) for e in cfg.encoders for f in cfg.fractions for s in cfg.seeds if (e, f, s) not in done]
    for i, (encoder, fraction, seed) in enumerate(runs, start=1):
        start = time.time()
        root = work / f"{encoder}_f{fraction:g}_s{seed}"
        overrides = cfg.overrides(encoder, fraction, seed, root)
        _run([CONFIGS / "train.json"], overrides)
        val = json.loads((root / "eval" / "metrics.json").read_text())["metrics"]
        _run([CONFIGS / "train.json", CONFIGS / "evaluate.json"], {**overrides, "resume": True})
        test = json.loads((root / "eval" / "test_metrics.json").read_text())["metrics"]
        n_train = len(datalist_split(Path(cfg.dataset_dir) / "datalist.json", "training", fraction=fraction, seed=seed))
        rec = {"encoder": encoder, "fraction": fraction, "seed": seed, "train_items": n_train,
               "val_mean_auroc": val["val_mean_auroc"], "test_mean_auroc": test["test_mean_auroc"],
               "test_auroc_per_class": test["test_auroc_per_class"],
               "seconds": round(time.time() - start, 1)}  # fmt: skip
        with open(records_file, "a") as f:
            f.write(json.dumps(rec) + "\n")
        records.append(rec)
        progress(f"[{i}/{len(runs)}] {encoder} {fraction:g} seed {seed}: test AUROC {rec['test_mean_auroc']:.3f} "
                 f"({rec['seconds']:.0f} s)")  # fmt: skip
    return records


def _fraction(f: float) -> str:
    return f"{f * 100:g}%"


def probe_table(records: Sequence[dict], fractions: Sequence[float] | None = None,
                encoders: Sequence[str] = ENCODERS) -> list[dict]:  # fmt: skip
    """One row per encoder, one ``mean ± std`` cell per fraction (test mean AUROC over the seeds)."""
    fractions = sorted({r["fraction"] for r in records}) if fractions is None else list(fractions)
    rows = []
    for encoder in encoders:
        row = {"encoder": encoder}
        for f in fractions:
            values = [r["test_mean_auroc"] for r in records if r["encoder"] == encoder and r["fraction"] == f]
            if not values:
                row[_fraction(f)] = "-"
            elif len(values) == 1:
                row[_fraction(f)] = f"{values[0]:.3f} (1 seed)"
            else:
                row[_fraction(f)] = f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
        rows.append(row)
    return rows


def per_class_table(records: Sequence[dict], fraction: float, encoders: Sequence[str] = ENCODERS) -> list[dict]:
    """One row per encoder: the test AUROC of each class at ``fraction``, mean over the seeds."""
    rows = []
    for encoder in encoders:
        recs = [r for r in records if r["encoder"] == encoder and r["fraction"] == fraction]
        if not recs:
            continue
        names = list(recs[0]["test_auroc_per_class"])
        row = {"encoder": encoder}
        for n in names:
            values = [r["test_auroc_per_class"][n] for r in recs if r["test_auroc_per_class"][n] is not None]
            row[n] = f"{statistics.mean(values):.3f}" if values else "-"
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "| --- |" + " ---: |" * (len(columns) - 1)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def text_table(rows: Sequence[dict]) -> str:
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
