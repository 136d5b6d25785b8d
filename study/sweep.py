"""One setting of ELVIS changed at a time, measured on the validation split: the investigation of the study.

Each (variant, training length) runs as its own study (:class:`~study.runner.StudyRunner`) in
``<work_dir>/<variant>_e<epochs>``: pre-training, locality and retrieval, phrase grounding; no segmentation and no
heatmaps. So each one resumes, and refuses other settings, like the study itself. All share one tokenizer
(``<work_dir>/tokenizer`` unless given). Tune on ``split="validation"`` (the default); run a pick once with
``split="test"``, in another work dir, to confirm it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from study.report import _fmt, _ms
from study.runner import StudyConfig, StudyRunner, load_records

logger = logging.getLogger("study")


@dataclass(frozen=True)
class Variant:
    """A pre-training objective overlay (``configs/objective/<objective>.json``) with bundle config overrides."""

    objective: str
    overrides: dict = field(default_factory=dict)
    note: str = ""


LOCAL = "objective#local_loss#"
VARIANTS: dict[str, Variant] = {
    "elvis": Variant("elvis", {}, "as shipped: tau_intra 0.1, pre-projection targets, local weight 1"),
    "one_hot": Variant("one_hot", {}, "the one-hot baseline"),
    "tau_intra=0.03": Variant("elvis", {LOCAL + "target_temperature": 0.03}, "sharper intra-modal targets"),
    "tau_intra=0.3": Variant("elvis", {LOCAL + "target_temperature": 0.3}, "flatter intra-modal targets"),
    "target=projected": Variant("elvis", {LOCAL + "target_source": "projected"},
                                "targets from the detached projected features"),  # fmt: skip
    "local_weight=0.5": Variant("elvis", {"objective#local_weight": 0.5}, "half the local loss"),
    "local_weight=2": Variant("elvis", {"objective#local_weight": 2.0}, "twice the local loss"),
}
METRICS = (("locality", "locality", "val_locality"), ("R@10", "locality", "val_recall_at_10"),
           ("CNR", "grounding", "cnr"), ("mIoU", "grounding", "miou"), ("pointing", "grounding", "pointing"))  # fmt: skip


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def run_sweep(work_dir: str | Path, variants: Sequence[str], lengths: Sequence[int], seeds: Sequence[int],
              split: str = "validation", tokenizer_dir: str | None = None, processes: int = 1,
              **study: object) -> list[dict]:  # fmt: skip
    """Run every variant x training length x seed, each variant's steps ``processes`` at a time; return the records,
    each tagged with ``variant`` and ``epochs``.

    ``study`` holds further :class:`~study.runner.StudyConfig` settings (dataset_dir, phantom_num, image_size, ...).
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}.")
    work = Path(work_dir)
    tokenizer_dir = tokenizer_dir or str(work / "tokenizer")  # one for all variants: not a difference between them
    runs = [(name, epochs) for epochs in lengths for name in variants]
    for i, (name, epochs) in enumerate(runs):
        v = VARIANTS[name]
        logger.info("sweep: %s, %d epochs (%d/%d) on the %s split", name, epochs, i + 1, len(runs), split)
        sub = work / f"{_slug(name)}_e{epochs}"
        cfg = StudyConfig(work_dir=str(sub), objectives=(v.objective,), seeds=tuple(seeds), pretrain_epochs=epochs,
                          pretrain_overrides=dict(v.overrides), seg_fractions=(), split=split, heatmap_phrases=0,
                          length_objectives=(), hard_objectives=(), seg_curve_epochs=0,
                          tokenizer_dir=tokenizer_dir, **study)  # type: ignore[arg-type]  # fmt: skip
        StudyRunner(cfg).run(processes)
        (sub / "variant.json").write_text(json.dumps({"variant": name, "epochs": epochs, "split": split}))
    return sweep_records(work)


def sweep_records(work_dir: str | Path) -> list[dict]:
    """The records of every finished variant under ``work_dir``, tagged with ``variant``, ``epochs`` and ``split``."""
    records = []
    for tag_file in sorted(Path(work_dir).glob("*/variant.json")):
        tag = json.loads(tag_file.read_text())
        records += [{**r, **tag} for r in load_records(tag_file.parent / "records.jsonl") if r.get("step") != "session"]
    return records


def sweep_table(records: Sequence[dict]) -> str:
    """Markdown: one row per (training length, variant), mean ± sample std over seeds of each metric."""
    keys = sorted({(r["epochs"], r["variant"]) for r in records},
                  key=lambda k: (k[0], list(VARIANTS).index(k[1]) if k[1] in VARIANTS else len(VARIANTS)))  # fmt: skip
    lines = ["| variant | epochs | seeds | " + " | ".join(m[0] for m in METRICS) + " | what changes |",
             "| --- | ---: | ---: |" + " ---: |" * len(METRICS) + " --- |"]  # fmt: skip
    for epochs, name in keys:
        mine = [r for r in records if r["variant"] == name and r["epochs"] == epochs]
        cells = []
        for _, step, metric in METRICS:
            rows = [r for r in mine if r["step"] == step]
            if step == "grounding":
                values = [next(t for t in r["table"] if t["category"] == "all").get(metric) for r in rows]
            else:
                values = [r.get(metric) for r in rows]
            cells.append(_fmt(*_ms(values)))
        seeds = len({r["seed"] for r in mine if r["step"] == "grounding"})
        note = VARIANTS[name].note if name in VARIANTS else ""
        lines.append(f"| {name} | {epochs} | {seeds} | " + " | ".join(cells) + f" | {note} |")
    return "\n".join(lines)


def write_sweep_report(records: Sequence[dict], out_dir: str | Path) -> Path:
    """``sweep_<split>.md`` (the table and the time it took) and ``sweep_<split>_records.json`` in ``out_dir``."""
    splits = sorted({r["split"] for r in records})
    if len(splits) != 1:
        raise ValueError(f"a sweep report covers one split; these records come from {splits}: use one work dir per split.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    minutes = sum(r.get("seconds", 0) for r in records) / 60
    text = [f"# Sweep of ELVIS settings, {splits[0]} split of the phantom", "",
            f"One setting of ELVIS changed at a time ('what changes' says which); mean ± sample standard "
            f"deviation over seeds. Steps took {minutes:.1f} min in all.", "", sweep_table(records), ""]  # fmt: skip
    path = out_dir / f"sweep_{splits[0]}.md"
    path.write_text("\n".join(text))
    (out_dir / f"sweep_{splits[0]}_records.json").write_text(json.dumps(list(records), indent=1))
    return path
