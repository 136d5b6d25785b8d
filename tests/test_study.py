"""The reproduction study runner, end to end at a micro scale: records, resume, tables and plots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _study(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "study", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)


def test_study_runs_resumes_and_reports(phantom, tmp_path):
    work, out = tmp_path / "work", tmp_path / "results"
    args = ["run", "--work-dir", str(work), "--out", str(out), "--dataset-dir", str(phantom), "--phantom-num", "40",
            "--image-size", "64", "--objectives", "elvis", "random", "--seeds", "0", "1", "--pretrain-epochs", "1",
            "--seg-iterations", "2", "--seg-fractions", "0.5", "1.0"]  # fmt: skip
    res = _study(*args)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    records = [json.loads(line) for line in (work / "records.jsonl").read_text().splitlines()]
    steps = [(r["step"], r.get("objective"), r.get("seed")) for r in records]
    for objective in ("elvis", "random"):
        for seed in (0, 1):
            for step in ("pretrain", "locality", "grounding"):
                assert steps.count((step, objective, seed)) == 1, (step, objective, seed)
            assert steps.count(("segmentation", objective, seed)) == 4  # 2 fractions x frozen / fine-tuned
    grounding = next(r for r in records if r["step"] == "grounding")
    assert grounding["table"][-1]["category"] == "all" and grounding["table"][-1]["n"] > 0
    seg = next(r for r in records if r["step"] == "segmentation")
    assert 0 <= seg["test_mean_dice"] <= 1 and set(seg["test_dice_per_class"]) >= {"nodule", "effusion"}
    # the frozen random encoder and the ELVIS encoder differ, so do their pretrain checkpoints
    assert (work / "pretrain" / "random_s0" / "models" / "model.pt").is_file()
    text = (out / "results.md").read_text()
    for label in ("ELVIS (intra-modal)", "random init", "frozen 0.5", "finetune 1"):
        assert label in text
    for png in ("cnr_per_category", "dice_vs_fraction", "locality", "heatmaps"):
        assert (out / f"{png}.png").stat().st_size > 5000, png
    # a second invocation finds every step recorded and runs none again
    res = _study(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    again = [json.loads(line) for line in (work / "records.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again[len(records) :]] == ["session"]
    # the report alone, from the records
    res = _study("report", "--work-dir", str(work), "--out", str(tmp_path / "again"))
    assert res.returncode == 0 and (tmp_path / "again" / "results.md").read_text().split("\n", 4)[4] == text.split("\n", 4)[4]


def test_resuming_with_other_settings_is_refused(tmp_path):
    import sys

    import pytest

    sys.path.insert(0, str(ROOT))
    from study.runner import StudyConfig, StudyRunner

    StudyRunner(StudyConfig(work_dir=str(tmp_path))).record(step="pretrain", objective="elvis", seed=0)
    assert StudyRunner(StudyConfig(work_dir=str(tmp_path))).done(step="pretrain", objective="elvis", seed=0)
    with pytest.raises(ValueError, match="other settings \\(pretrain_epochs, seeds\\)"):
        StudyRunner(StudyConfig(work_dir=str(tmp_path), seeds=(0,), pretrain_epochs=9))
    with pytest.raises(ValueError, match="unknown objectives \\['clip'\\]"):
        StudyConfig(objectives=("elvis", "clip"))
