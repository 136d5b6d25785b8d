"""The reproduction study runner, end to end at a micro scale: records, resume, tables and plots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _study(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "study", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)


def test_study_runs_resumes_and_reports(phantom, tmp_path):
    from monai_elvis.data.phantom import prepare_phantom

    hard = tmp_path / "realistic"
    prepare_phantom(hard, num=40, size=64, workers=1, difficulty="realistic")
    work, out = tmp_path / "work", tmp_path / "results"
    args = ["run", "--work-dir", str(work), "--out", str(out), "--processes", "2", "--dataset-dir", str(phantom),
            "--phantom-num", "40", "--image-size", "64", "--objectives", "elvis", "one_hot", "random", "--seeds", "0", "1",
            "--pretrain-epochs", "1", "--length-objectives", "elvis", "one_hot", "--length-epochs", "2",
            "--hard-dataset-dir", str(hard), "--hard-objectives", "elvis", "random", "--seg-objectives", "elvis", "random",
            "--seg-iterations", "2", "--seg-fractions", "0.5", "1.0", "--seg-curve-epochs", "2",
            "--seg-curve-epoch-length", "2"]  # fmt: skip
    res = _study(*args)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    records = [json.loads(line) for line in (work / "records.jsonl").read_text().splitlines()]
    steps = [(r["step"], r.get("objective"), r.get("seed"), r.get("phantom"), r.get("epochs")) for r in records]
    for seed in (0, 1):
        runs = [(o, "easy", 1) for o in ("elvis", "one_hot", "random")] + [(o, "easy", 2) for o in ("elvis", "one_hot")]
        runs += [(o, "realistic", 1) for o in ("elvis", "random")]
        for objective, phantom_name, epochs in runs:
            for step in ("pretrain", "locality", "grounding"):
                assert steps.count((step, objective, seed, phantom_name, epochs)) == 1, (step, objective, seed, phantom_name)
            name = f"{phantom_name}_{objective}_s{seed}_e{epochs}"
            items = json.loads((work / "items" / f"{name}.json").read_text())
            test_size = len(items["validate"]["metrics"]["val_locality"])
            assert test_size > 0 and len(items["validate"]["metrics"]["val_zero_shot_auc"][0]) == test_size
            assert len(items["grounding"]["metrics"]["side"]) == len(items["grounding"]["category"]) > 0
        for objective in ("elvis", "random"):  # segmentation of the main length's models only, as asked
            assert steps.count(("segmentation", objective, seed, "easy", 1)) == 4  # 2 fractions x frozen / fine-tuned
        assert steps.count(("segmentation", "one_hot", seed, "easy", 1)) == 0
    curve = next(r for r in records if r["step"] == "seg_curve")
    assert [c["iterations"] for c in curve["curve"]] == [2, 4]
    grounding = next(r for r in records if r["step"] == "grounding")
    assert grounding["table"][-1]["category"] == "all" and grounding["table"][-1]["n"] > 0
    seg = next(r for r in records if r["step"] == "segmentation" and (r["objective"], r["seed"], r["mode"]) ==
               ("elvis", 0, "frozen") and r["fraction"] == 0.5)  # fmt: skip  # records come in the order steps end
    assert 0 <= seg["test_mean_dice"] <= 1 and set(seg["test_dice_per_class"]) >= {"nodule", "effusion"}
    seg_items = json.loads((work / "items" / "seg_elvis_s0_frozen_0.5.json").read_text())["segmentation"]["metrics"]
    scored = [v for v in seg_items["test_mean_dice"] if v is not None]
    assert scored and sum(scored) / len(scored) == pytest.approx(seg["test_mean_dice"], abs=1e-5)
    # the frozen random encoder and the ELVIS encoder differ, so do their pretrain checkpoints
    assert (work / "pretrain" / "easy_random_s0_e1" / "models" / "model.pt").is_file()
    text = (out / "results.md").read_text()
    for label in ("ELVIS (intra-modal)", "random init", "frozen 50%", "finetune 100%", "vs one-hot local",
                  "## Training length", "## Realistic (harder) phantom", "## The segmentation schedule",
                  "| steps | Dice (per image, mean of its classes) | nodule |",
                  "summed over the processes that ran them, 2 at a time); 1 invocation(s)"):
        assert label in text, label
    assert (out / "items" / "easy_elvis_s0_e1.json").is_file() and (out / "study_config.json").is_file()
    for png in ("cnr_per_category", "dice_vs_fraction", "locality", "heatmaps", "length_axis", "seg_curve",
                "differences"):
        assert (out / f"{png}.png").stat().st_size > 5000, png
    # a second invocation finds every step recorded and runs none again
    res = _study(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    again = [json.loads(line) for line in (work / "records.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again[len(records) :]] == ["session"]
    # another segmentation schedule on the first seed alone: segmentation runs again, on the same pre-trained models
    res = _study(*args[:-1], "3", "--seg-iterations", "3", "--seg-seeds", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    redone = [json.loads(line) for line in (work / "records.jsonl").read_text().splitlines()]
    assert [r for r in redone if r["step"] not in ("segmentation", "seg_curve")] == [
        r for r in again if r["step"] not in ("segmentation", "seg_curve")] + [redone[-1]]  # fmt: skip
    assert sorted((r["seed"], r["objective"]) for r in redone if r["step"] == "segmentation") == (
        [(0, "elvis")] * 4 + [(0, "random")] * 4)  # fmt: skip
    assert [c["iterations"] for c in next(r for r in redone if r["step"] == "seg_curve")["curve"]] == [3, 6]
    assert len((work / "records_superseded.jsonl").read_text().splitlines()) == 17  # 16 runs and the curve
    text = (out / "results.md").read_text()
    assert "seeds [0]; 3 steps of batch 8" in text
    published = sorted(p.name for p in (out / "items").glob("seg_*.json"))  # the superseded seed 1 runs are gone
    assert published == sorted(f"seg_{o}_s0_{m}_{f}.json" for o in ("elvis", "random") for m in ("frozen", "finetune")
                               for f in ("0.5", "1.0"))  # fmt: skip
    # the report alone, from the records
    res = _study("report", "--work-dir", str(work), "--out", str(tmp_path / "again"))
    again_text = (tmp_path / "again" / "results.md").read_text()
    assert res.returncode == 0 and again_text.split("\n", 6)[6] == text.split("\n", 6)[6]  # after time and tokenizer
    # the tokenizer the runs used ships with the results, and the report says how to reuse it
    for folder in (out, tmp_path / "again"):
        assert (folder / "tokenizer" / "tokenizer.json").read_bytes() == (work / "tokenizer" / "tokenizer.json").read_bytes()
        assert f"--tokenizer-dir {folder.as_posix()}/tokenizer" in (folder / "results.md").read_text()


@pytest.mark.filterwarnings("ignore:No artists with labels found")  # no records, so empty plots
def test_a_given_tokenizer_is_pointed_at_not_copied(tmp_path):
    """A study run with another study's tokenizer (--tokenizer-dir) does not ship a byte-for-byte second copy."""
    sys.path.insert(0, str(ROOT))
    from study.report import write_report

    given = tmp_path / "shared" / "tokenizer"
    given.mkdir(parents=True)
    (given / "tokenizer.json").write_text("{}")
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.json").write_text(json.dumps({"tokenizer_dir": str(given)}))
    write_report([], tmp_path / "out", work)
    assert not (tmp_path / "out" / "tokenizer").exists()
    assert (f"These runs used the tokenizer in `{given.as_posix()}` (given with `--tokenizer-dir`): `python -m study "
            f"run --tokenizer-dir {given.as_posix()}` repeats them with it.") in (tmp_path / "out" / "results.md").read_text()  # fmt: skip


def test_resuming_with_other_settings_is_refused(tmp_path):
    import sys

    import pytest

    sys.path.insert(0, str(ROOT))
    from study.runner import StudyConfig, StudyRunner

    StudyRunner(StudyConfig(work_dir=str(tmp_path))).record(step="pretrain", objective="elvis", seed=0)
    assert StudyRunner(StudyConfig(work_dir=str(tmp_path))).done(step="pretrain", objective="elvis", seed=0)
    with pytest.raises(ValueError, match="other settings \\(pretrain_epochs, seeds\\)"):
        StudyRunner(StudyConfig(work_dir=str(tmp_path), seeds=(0,), pretrain_epochs=9))
    # a work dir of an older version: a setting added since counts as its default, a dropped one is ignored
    old = json.loads((tmp_path / "config.json").read_text())
    old.pop("split")
    old["grounding_split"] = "test"
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert StudyRunner(StudyConfig(work_dir=str(tmp_path))).done(step="pretrain", objective="elvis", seed=0)
    with pytest.raises(ValueError, match="other settings \\(split\\)"):
        StudyRunner(StudyConfig(work_dir=str(tmp_path), split="validation"))
    # more seeds after the same ones extend a study: its records stay, and the extension is the new setting
    grown = tmp_path / "grown"
    StudyRunner(StudyConfig(work_dir=str(grown), seeds=(0, 1, 2))).record(step="pretrain", objective="elvis", seed=0)
    with pytest.raises(ValueError, match="other settings \\(seeds\\)"):  # the first seed would change
        StudyRunner(StudyConfig(work_dir=str(grown), seeds=(3, 0, 1, 2)))
    assert StudyRunner(StudyConfig(work_dir=str(grown), seeds=(0, 1, 2, 3))).done(step="pretrain", seed=0)
    assert json.loads((grown / "config.json").read_text())["seeds"] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="other settings \\(seeds\\)"):  # and fewer do not
        StudyRunner(StudyConfig(work_dir=str(grown), seeds=(0, 1, 2)))
    StudyRunner(StudyConfig(work_dir=str(grown), seeds=(0, 1, 2, 3, 4)))
    with pytest.raises(ValueError, match="unknown objectives \\['clip'\\]"):
        StudyConfig(objectives=("elvis", "clip"))


def test_sweep_variants_reach_the_parsed_objective():
    sys.path.insert(0, str(ROOT))
    from monai.bundle import ConfigParser

    from study.runner import _bundle
    from study.sweep import VARIANTS

    expected = {"elvis": ("intra_modal", 0.1, "pre_projection", 1.0), "one_hot": ("one_hot", None, None, 1.0),
                "tau_intra=0.03": ("intra_modal", 0.03, "pre_projection", 1.0),
                "tau_intra=0.3": ("intra_modal", 0.3, "pre_projection", 1.0),
                "target=projected": ("intra_modal", 0.1, "projected", 1.0),
                "local_weight=0.5": ("intra_modal", 0.1, "pre_projection", 0.5),
                "local_weight=2": ("intra_modal", 0.1, "pre_projection", 2.0)}  # fmt: skip
    assert set(VARIANTS) == set(expected)
    for name, v in VARIANTS.items():
        parser = ConfigParser()
        parser.read_config(_bundle("elvis_pretrain", "train.json") + [str(ROOT / "configs" / "objective" / f"{v.objective}.json")])
        parser.update(v.overrides)
        objective = parser.get_parsed_content("objective")
        target, tau, source, weight = expected[name]
        local = objective.local_loss
        assert local.target == target and objective.local_weight == weight, name
        if tau is not None:
            assert (local.target_temperature, local.target_source) == (tau, source), name


def test_sweep_runs_on_validation_resumes_and_reports(phantom, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["sweep", "--work-dir", str(work), "--out", str(out), "--dataset-dir", str(phantom), "--phantom-num", "40",
            "--image-size", "64", "--variants", "elvis", "local_weight=2", "--lengths", "1", "--seeds", "0"]  # fmt: skip
    res = _study(*args)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert sorted(p.name for p in work.iterdir()) == ["elvis_e1", "local_weight-2_e1", "tokenizer"]
    subs = [work / "elvis_e1", work / "local_weight-2_e1"]
    for sub in subs:  # one tokenizer for both variants
        assert json.loads((sub / "config.json").read_text())["tokenizer_dir"] == str(work / "tokenizer")
        assert not (sub / "tokenizer").exists()
        steps = [json.loads(line)["step"] for line in (sub / "records.jsonl").read_text().splitlines()]
        # no segmentation, no heatmaps; evaluation and grounding, after pre-training, end in either order
        assert steps[0] == "pretrain" and sorted(steps[1:3]) == ["grounding", "locality"] and steps[3:] == ["session"]
        assert (sub / "pretrain" / "easy_elvis_s0_e1" / "eval" / "validation_metrics.json").is_file()
        assert not (sub / "pretrain" / "easy_elvis_s0_e1" / "eval" / "test_metrics.json").exists()
    text = (out / "sweep_validation.md").read_text()
    assert "validation split" in text
    rows = [line for line in text.splitlines() if line.startswith("| elvis |") or line.startswith("| local_weight=2 |")]
    assert len(rows) == 2 and all(row.count("(1 seed)") == 5 for row in rows)
    records = json.loads((out / "sweep_validation_records.json").read_text())
    assert {(r["variant"], r["epochs"], r["split"]) for r in records} == {("elvis", 1, "validation"), ("local_weight=2", 1, "validation")}
    # nothing runs again
    res = _study(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    for sub in subs:
        steps = [json.loads(line)["step"] for line in (sub / "records.jsonl").read_text().splitlines()]
        assert steps[0] == "pretrain" and sorted(steps[1:3]) == ["grounding", "locality"]
        assert steps[3:] == ["session", "session"]
    # the report alone
    res = _study("report", "--sweep", "--work-dir", str(work), "--out", str(tmp_path / "again"))
    assert res.returncode == 0 and (tmp_path / "again" / "sweep_validation.md").read_text() == text


def test_sweep_refuses_unknown_variants_and_mixed_splits(tmp_path):
    import pytest

    sys.path.insert(0, str(ROOT))
    from study.sweep import run_sweep, write_sweep_report

    with pytest.raises(ValueError, match="unknown variants \\['tau=9'\\]"):
        run_sweep(tmp_path, ["elvis", "tau=9"], [1], [0])
    records = [{"step": "locality", "variant": "elvis", "epochs": 1, "seed": 0, "split": s} for s in ("validation", "test")]
    with pytest.raises(ValueError, match="come from \\['test', 'validation'\\]"):
        write_sweep_report(records, tmp_path)


def test_paired_bootstrap_intervals():
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from study.stats import mean_auc, paired_bootstrap

    rng = np.random.default_rng(1)
    b = [rng.random(50) for _ in range(3)]
    shifted = paired_bootstrap([x + 0.1 for x in b], b)  # the same items, 0.1 higher each: no doubt about it
    assert shifted.value == pytest.approx(0.1) and shifted.low == pytest.approx(0.1) and shifted.high == pytest.approx(0.1)
    assert shifted.significant and str(shifted) == "+0.100 [+0.100, +0.100]"
    same = paired_bootstrap(b, b)
    assert same.value == 0 and same.low == 0 and same.high == 0 and not same.significant
    noisy = paired_bootstrap([x + rng.normal(0, 1, 50) for x in b], b)  # pure noise around 0: interval spans it
    assert noisy.low < noisy.value < noisy.high and noisy.high - noisy.low > 0.2
    with_nan = [x.copy() for x in b]
    with_nan[0][0] = np.nan  # an item that could not be scored is left out, not counted as 0
    assert paired_bootstrap([x + 0.5 for x in with_nan], with_nan).value == pytest.approx(0.5)
    # AUC by hand: positives scored 0.9, 0.4, negatives 0.5, 0.1 -> 3 of 4 pairs ordered: 0.75; a tie counts half
    scores, labels = np.array([[0.9], [0.4], [0.5], [0.1]]), np.array([[1], [1], [0], [0]])
    assert mean_auc(scores[None], labels[None])[0] == pytest.approx(0.75)
    assert mean_auc(np.array([[[0.9], [0.5], [0.5], [0.1]]]), labels[None])[0] == pytest.approx(0.875)
    perfect = (np.arange(40.0)[:, None], (np.arange(40) >= 20)[:, None].astype(float))
    reversed_ = (-perfect[0], perfect[1])
    d = paired_bootstrap([perfect] * 2, [reversed_] * 2, statistic="auc", resamples=200)
    assert d.value == pytest.approx(1.0) and d.low == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same test items"):
        paired_bootstrap([b[0]], [b[0][:10]])
    with pytest.raises(ValueError, match="same number"):
        paired_bootstrap(b, b[:2])


def test_why_elvis_does_not_beat_one_hot_is_computed_from_the_measures():
    sys.path.insert(0, str(ROOT))
    from study.report import one_hot_reasons
    from study.stats import Difference

    # locality per item by hand: each seed's mean is its value; one-hot 0.89, random 0.95, ELVIS 0.96 on average
    locality = {"one_hot": (0.88, 0.90), "random": (0.95, 0.95), "elvis": (0.95, 0.97)}
    pointing = {"one_hot": (0.2, 0.4), "elvis": (0.3, 0.4), "random": (0.0, 0.0)}  # std 0.1414 / 0.0707
    items = {f"easy_{o}_s{s}_e6": {"validate": {"metrics": {"val_locality": [locality[o][s]] * 4}},
                                   "grounding": {"metrics": {"pointing": [pointing[o][s]] * 4}}}
             for o in locality for s in (0, 1)}  # fmt: skip
    records = [{"step": "pretrain", "objective": o, "seed": s, "epochs": 6, "phantom": "easy"}
               for o in locality for s in (0, 1)]  # fmt: skip
    unclear = Difference(0.05, -0.2, 0.3, 2, 8)
    sweep = [{"step": "grounding", "variant": v, "seed": s, "epochs": 3,
              "table": [{"category": "all", "pointing": p, "cnr": 1.0}]}
             for v, ps in {"one_hot": (0.2, 0.3), "elvis": (0.3, 0.4), "tau_intra=0.3": (0.4, 0.42)}.items()
             for s, p in enumerate(ps)]  # fmt: skip
    text = one_hot_reasons(records, items, {("one_hot", "pointing"): unclear}, sweep)
    assert text[0].startswith("One-hot local targets keep a locality of 0.890 after 6 epochs, against 0.950 for an "
                              "untrained encoder and 0.960 for ELVIS: they lose 0.060 of it.")  # fmt: skip
    assert "large at this length" in text[0]
    assert text[1] == ("Pointing varies between seeds (sample std 0.071 for ELVIS, 0.141 for one-hot) more than it "
                       "differs between the two (+0.050 [-0.200, +0.300]): 2 seeds cannot separate them.")  # fmt: skip
    # one-hot 0.25 ± 0.071 in the sweep: ELVIS's 0.35 is above by 0.10 > 0.071, tau 0.41 too
    assert text[2] == ("In the sweep (2 ELVIS settings, 3 epochs, validation split), pointing ranges 0.350 to 0.410 "
                       "(best: tau_intra=0.3) against one-hot's 0.250 ± 0.071; elvis, tau_intra=0.3 are above it by "
                       "more than one-hot's seed spread.")  # fmt: skip
    assert len(text) == 3  # CNR was not compared: nothing said of it
    # a clear difference needs no explanation
    assert one_hot_reasons(records, items, {("one_hot", "pointing"): Difference(0.2, 0.1, 0.3, 2, 8)}, sweep) == []


def test_schedule_summary_says_whether_the_segmentation_schedule_reaches_the_plateau():
    sys.path.insert(0, str(ROOT))
    from study.report import schedule_summary

    curve = {"step": "seg_curve", "seconds": 100.0,
             "curve": [{"iterations": i, "val_mean_dice": d} for i, d in ((10, 0.1), (20, 0.5), (30, 0.96), (40, 1.0))]}  # fmt: skip
    runs = [{"step": "segmentation", "seconds": 50.0}, {"step": "segmentation", "seconds": 60.0}]
    # 2.5 s a step; outside the 15 steps: 50 - 37.5 and 60 - 37.5, mean 17.5 s; 2 x (17.5 + 30 x 2.5) s = 3.08 min
    assert schedule_summary([curve] + runs, 15) == (
        "The curve's best validation Dice (each image's mean over its classes) is 1.000 (at 40 steps); it first "
        "reaches 95% of that at 30 steps. The best is the curve's last point: it has not levelled off, and a longer "
        "curve may find more. At 10 "
        "steps, the nearest point at or below the study's 15, it is 0.100. The study's schedule is short of "
        "the plateau: at 2.50 s a step (the curve's time, validations included), its 2 segmentation runs at 30 steps "
        "would take about 3 minutes of worker time, against 2 for 15 steps."
    )  # fmt: skip
    at_plateau = schedule_summary([curve] + runs, 30)
    assert at_plateau.endswith("At 30 steps, the nearest point at or below the study's 30, it is 0.960.")
    assert schedule_summary(runs, 15) == "" and schedule_summary([curve], None) == ""
    # a best before the last point: the curve has levelled off, nothing said of it
    curve["curve"].append({"iterations": 50, "val_mean_dice": 0.99})
    assert "levelled off" not in schedule_summary([curve] + runs, 15)


def test_classes_learnt_at_is_the_first_step_at_half_of_each_class_best():
    sys.path.insert(0, str(ROOT))
    from study.report import classes_learnt_at, schedule_summary

    # nodule: best 0.8, half 0.4 first reached at 30; effusion: best 0.6 at 10 (0.3 at 10 already); a class whose
    # best stays under 0.1 (opacity, 0.09) is one the model does not learn, left out; None (no validation image has
    # it) is skipped
    points = [{"iterations": 10, "val_mean_dice": 0.2, "per_class": {"nodule": 0.0, "effusion": 0.6, "opacity": 0.0}},
              {"iterations": 20, "val_mean_dice": 0.3, "per_class": {"nodule": 0.39, "effusion": None, "opacity": 0.0}},
              {"iterations": 30, "val_mean_dice": 0.6, "per_class": {"nodule": 0.4, "effusion": 0.2, "opacity": 0.0}},
              {"iterations": 40, "val_mean_dice": 0.7, "per_class": {"nodule": 0.8, "effusion": 0.5, "opacity": 0.09}}]  # fmt: skip
    assert classes_learnt_at(points) == {"effusion": 10, "nodule": 30}
    assert classes_learnt_at(points, share=1.0) == {"effusion": 10, "nodule": 40}
    assert classes_learnt_at([{"iterations": 5, "val_mean_dice": 0.1}]) == {}  # a curve of the mean alone
    assert classes_learnt_at(points, least=0.05) == {"effusion": 10, "nodule": 30, "opacity": 40}
    # a best of exactly ``least`` is learnt; half of it (0.05) first reached at 20
    edge = [{"iterations": 10, "per_class": {"x": 0.04}}, {"iterations": 20, "per_class": {"x": 0.05}},
            {"iterations": 30, "per_class": {"x": 0.1}}]  # fmt: skip
    assert classes_learnt_at(edge) == {"x": 20} and classes_learnt_at(edge, least=0.11) == {}
    curve = {"step": "seg_curve", "seconds": 40.0, "curve": points}
    assert schedule_summary([curve], 40).endswith(
        " Every class it learns reaches half its best Dice by 30 steps (effusion 10, nodule 30); opacity below 0.1 throughout, "
        "within the study's 40.")  # fmt: skip
    assert schedule_summary([curve], 20).endswith("(effusion 10, nodule 30); opacity below 0.1 throughout, after the study's 20.")


def test_per_class_dice_scores_each_class_channel_alone():
    """The study's per-class validation metrics, through MONAI's MeanDice as the bundle's evaluator runs them."""
    import torch
    from monai.bundle import ConfigParser

    sys.path.insert(0, str(ROOT))
    from study.runner import per_class_dice

    metrics = per_class_dice(["a", "b"])
    assert list(metrics) == ["val_dice_a", "val_dice_b"]
    parser = ConfigParser({"m": metrics})
    a, b = parser.get_parsed_content("m#val_dice_a"), parser.get_parsed_content("m#val_dice_b")
    # 3 channels (background, a, b) of a 1 x 4 image: a predicted on pixels 0-1, labelled on 1-2 -> 2*1/(2+2) = 0.5;
    # b predicted on pixel 3, labelled on pixel 3 -> 1.0
    pred = torch.tensor([[[0, 0, 1, 0]], [[1, 1, 0, 0]], [[0, 0, 0, 1]]], dtype=torch.float)
    label = torch.tensor([[[1, 0, 0, 0]], [[0, 1, 1, 0]], [[0, 0, 0, 1]]], dtype=torch.float)
    for metric, expected in ((a, 0.5), (b, 1.0)):
        y_pred, y = metric._output_transform([{"pred": pred, "label": label}])
        metric.reset()
        metric.update((y_pred, y))
        assert metric.compute() == pytest.approx(expected)


def test_a_moved_work_folder_resumes(tmp_path):
    """A work folder copied elsewhere is the same study: it resumes with its records, and its config then names
    where it is now; other settings are still refused there."""
    import shutil

    sys.path.insert(0, str(ROOT))
    from study.runner import StudyConfig, StudyRunner

    first = StudyRunner(StudyConfig(work_dir=str(tmp_path / "a"), seg_iterations=40))
    first.record(step="pretrain", objective="elvis", seed=0)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = StudyRunner(StudyConfig(work_dir=str(tmp_path / "b"), seg_iterations=40))
    assert moved.done(step="pretrain", objective="elvis", seed=0)
    assert not (tmp_path / "b" / "records_superseded.jsonl").exists()
    assert json.loads((tmp_path / "b" / "config.json").read_text())["work_dir"] == str(tmp_path / "b")
    with pytest.raises(ValueError, match=r"other settings \(pretrain_epochs\)"):
        StudyRunner(StudyConfig(work_dir=str(tmp_path / "b"), seg_iterations=40, pretrain_epochs=2))


def test_other_segmentation_settings_rerun_segmentation_alone(tmp_path):
    """A work dir whose seg_* settings change keeps its pre-training records and moves aside the segmentation records
    those settings made (records and per-item files, with the settings they ran with; nothing deleted); other
    settings are still refused."""
    sys.path.insert(0, str(ROOT))
    from study.runner import StudyConfig, StudyRunner

    def steps(name: str) -> list[str]:
        return [json.loads(line)["step"] for line in (tmp_path / name).read_text().splitlines()]

    first = StudyRunner(StudyConfig(work_dir=str(tmp_path), seg_iterations=40))
    first.record(step="pretrain", objective="elvis", seed=0)
    first.record(step="seg_curve", curve=[])
    first.record(step="segmentation", objective="elvis", seed=0, fraction=1.0, mode="frozen")
    (tmp_path / "items").mkdir()
    (tmp_path / "items" / "seg_elvis_s0_frozen_1.0.json").write_text("{}")
    (tmp_path / "items" / "easy_elvis_s0_e6.json").write_text("{}")
    again = StudyRunner(StudyConfig(work_dir=str(tmp_path), seg_iterations=40))
    assert again.done(step="segmentation", objective="elvis") and again.done(step="seg_curve")  # same: resumes
    # the curve's own settings: the curve alone runs again
    curve = StudyRunner(StudyConfig(work_dir=str(tmp_path), seg_iterations=40, seg_curve_epochs=3))
    assert curve.done(step="segmentation") and not curve.done(step="seg_curve")
    assert steps("records.jsonl") == ["pretrain", "segmentation"] and steps("records_superseded.jsonl") == ["seg_curve"]
    assert not (tmp_path / "items_superseded").exists()  # the curve has no per-item files
    # the runs' settings: the runs run again; their items and the settings they ran with go to items_superseded/2
    other = StudyRunner(StudyConfig(work_dir=str(tmp_path), seg_iterations=300, seg_curve_epochs=3, seg_seeds=1))
    assert other.done(step="pretrain", objective="elvis", seed=0) and not other.done(step="segmentation")
    assert steps("records.jsonl") == ["pretrain"] and steps("records_superseded.jsonl") == ["seg_curve", "segmentation"]
    superseded = [json.loads(line)["superseded"] for line in (tmp_path / "records_superseded.jsonl").read_text().splitlines()]
    assert superseded == [1, 2]
    assert sorted(p.name for p in (tmp_path / "items").iterdir()) == ["easy_elvis_s0_e6.json"]
    kept = tmp_path / "items_superseded" / "2"
    assert sorted(p.name for p in kept.iterdir()) == ["config.json", "seg_elvis_s0_frozen_1.0.json"]
    assert json.loads((kept / "config.json").read_text())["seg_iterations"] == 40
    # more seeds segmenting after the same ones add runs: nothing is superseded
    other.record(step="segmentation", objective="elvis", seed=0, fraction=1.0, mode="frozen")
    (tmp_path / "items" / "seg_elvis_s0_frozen_1.0.json").write_text("{}")
    more = StudyRunner(StudyConfig(work_dir=str(tmp_path), seg_iterations=300, seg_curve_epochs=3, seg_seeds=2))
    assert more.done(step="segmentation", seed=0) and len(steps("records_superseded.jsonl")) == 2
    # a run's items without its record (cut between the two) still move, to a folder of their own
    (tmp_path / "items" / "seg_elvis_s1_frozen_1.0.json").write_text("{}")
    StudyRunner(StudyConfig(work_dir=str(tmp_path), seg_iterations=20, seg_curve_epochs=3, seg_seeds=2))
    assert sorted(p.name for p in (tmp_path / "items_superseded" / "3").glob("seg_*")) == [
        "seg_elvis_s0_frozen_1.0.json", "seg_elvis_s1_frozen_1.0.json"]  # fmt: skip
    superseded = [json.loads(line)["superseded"] for line in (tmp_path / "records_superseded.jsonl").read_text().splitlines()]
    assert superseded == [1, 2, 3]  # the run's record under the number of its folder
    # a work folder from before seg_seeds and seg_learning_rate: every seed segmented, at the bundle's rate of 0.001
    legacy = tmp_path / "legacy"
    StudyRunner(StudyConfig(work_dir=str(legacy))).record(step="segmentation", objective="elvis", seed=0)
    written = json.loads((legacy / "config.json").read_text())
    (legacy / "config.json").write_text(json.dumps({k: v for k, v in written.items()
                                                    if k not in ("seg_seeds", "seg_learning_rate")}))  # fmt: skip
    assert StudyRunner(StudyConfig(work_dir=str(legacy), seg_seeds=None, seg_learning_rate=0.001)).done(seed=0)
    assert not StudyRunner(StudyConfig(work_dir=str(legacy))).done(step="segmentation")  # 3 seeds at 0.01: re-run
    moved = [json.loads(line) for line in (legacy / "records_superseded.jsonl").read_text().splitlines()]
    assert [(r["step"], r["seed"]) for r in moved] == [("segmentation", 0)]
    # ... and one run with the paper overlay: at the overlay's rate (5e-4), not the bundle's
    paper = tmp_path / "legacy_paper"
    overlay = "configs/segmentation/paper.json"
    StudyRunner(StudyConfig(work_dir=str(paper), segmentation_overlay=overlay)).record(step="segmentation", seed=0)
    written = json.loads((paper / "config.json").read_text())
    (paper / "config.json").write_text(json.dumps({k: v for k, v in written.items()
                                                   if k not in ("seg_seeds", "seg_learning_rate")}))  # fmt: skip
    assert StudyRunner(StudyConfig(work_dir=str(paper), segmentation_overlay=overlay, seg_seeds=None)).done(seed=0)
    # only the settings that are refused are named
    with pytest.raises(ValueError, match="other settings \\(pretrain_epochs\\): "):
        StudyRunner(StudyConfig(work_dir=str(tmp_path), seg_iterations=40, pretrain_epochs=2))
    with pytest.raises(ValueError, match="seg_seeds is the number of seeds"):
        StudyConfig(seg_seeds=0)


def test_segmentation_schedule_is_the_overlays_unless_given(tmp_path):
    """seg_batch_size and seg_learning_rate left unset are the segmentation overlay's (the paper scale's batch 16 at
    5e-4), else the tiny study's 8 at 0.01; a value given wins; every seg_* setting supersedes some records."""
    from dataclasses import asdict

    sys.path.insert(0, str(ROOT))
    from study.runner import SUPERSEDED_BY, StudyConfig, is_seg_setting

    paper = json.loads((ROOT / "configs" / "segmentation" / "paper.json").read_text())
    cfg = StudyConfig(segmentation_overlay="configs/segmentation/paper.json")
    assert (cfg.seg_batch_size, cfg.seg_learning_rate) == (paper["batch_size"], paper["learning_rate"]) == (16, 5e-4)
    assert (StudyConfig().seg_batch_size, StudyConfig().seg_learning_rate) == (8, 0.01)
    given = StudyConfig(segmentation_overlay="configs/segmentation/paper.json", seg_learning_rate=0.002)
    assert (given.seg_batch_size, given.seg_learning_rate) == (16, 0.002)
    partial = tmp_path / "overlay.json"
    partial.write_text(json.dumps({"batch_size": 4}))
    assert (StudyConfig(segmentation_overlay=str(partial)).seg_learning_rate, StudyConfig(
        segmentation_overlay=str(partial)).seg_batch_size) == (0.01, 4)  # fmt: skip
    with pytest.raises(ValueError, match="segmentation_overlay 'configs/none.json': no such file"):
        StudyConfig(segmentation_overlay="configs/none.json")
    # a reference or an expression cannot be recorded as the schedule that ran: refused, unless given
    partial.write_text(json.dumps({"batch_size": "@train_batch", "learning_rate": "$0.1 / 10"}))
    with pytest.raises(ValueError, match="batch_size must be a positive number .* got '@train_batch'; give "
                                         "--seg-batch-size"):  # fmt: skip
        StudyConfig(segmentation_overlay=str(partial))
    with pytest.raises(ValueError, match="learning_rate must be .* got '\\$0.1 / 10'; give --seg-learning-rate"):
        StudyConfig(segmentation_overlay=str(partial), seg_batch_size=4)
    given = StudyConfig(segmentation_overlay=str(partial), seg_batch_size=4, seg_learning_rate=0.02)
    assert (given.seg_batch_size, given.seg_learning_rate) == (4, 0.02)
    seg = {k for k in asdict(StudyConfig()) if is_seg_setting(k)}
    assert seg == set().union(*SUPERSEDED_BY.values()) and "seg_iterations" in seg


def test_an_interrupted_supersession_completes_under_its_number(tmp_path):
    """A supersession cut short (``superseding.json`` left behind: its per-item files moved but not its records,
    or its records copied but the records file not yet rewritten) is completed by the next invocation under the
    same number, whatever the settings are then: no second folder, no record copied twice."""
    sys.path.insert(0, str(ROOT))
    from study.runner import StudyConfig, StudyRunner

    def lines(name: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]

    before = StudyRunner(StudyConfig(work_dir=str(tmp_path), seg_iterations=40))
    before.record(step="pretrain", objective="elvis", seed=0)
    run = before.record(step="segmentation", objective="elvis", seed=0, fraction=1.0, mode="frozen")
    records = (tmp_path / "records.jsonl").read_text()
    journal = tmp_path / "superseding.json"
    # cut after the files moved (to folder 1, its settings not yet written), before the records
    (tmp_path / "items_superseded" / "1").mkdir(parents=True)
    (tmp_path / "items_superseded" / "1" / "seg_elvis_s0_frozen_1.0.json").write_text("{}")
    journal.write_text(json.dumps({"n": 1, "steps": ["segmentation"]}))
    StudyRunner(StudyConfig(work_dir=str(tmp_path), seg_iterations=20))
    assert lines("records_superseded.jsonl") == [{**run, "superseded": 1}] and not journal.exists()
    assert sorted(p.name for p in (tmp_path / "items_superseded").iterdir()) == ["1"]
    assert json.loads((tmp_path / "items_superseded" / "1" / "config.json").read_text())["seg_iterations"] == 40
    assert [r["step"] for r in lines("records.jsonl")] == ["pretrain"]
    # cut after the records were copied, before the records file was rewritten; resumed with the first settings
    (tmp_path / "records.jsonl").write_text(records)
    journal.write_text(json.dumps({"n": 1, "steps": ["segmentation"]}))
    again = StudyRunner(StudyConfig(work_dir=str(tmp_path), seg_iterations=40))
    assert lines("records_superseded.jsonl") == [{**run, "superseded": 1}] and not journal.exists()
    assert [r["step"] for r in lines("records.jsonl")] == ["pretrain"] and not again.done(step="segmentation")
    assert not list(tmp_path.glob("*.partial"))
    # the next change is the next supersession
    again.record(**run)
    StudyRunner(StudyConfig(work_dir=str(tmp_path), seg_iterations=30))
    assert [r["superseded"] for r in lines("records_superseded.jsonl")] == [1, 2]


def _runner_without_data(tmp_path, tasks):
    """A study runner whose :meth:`run` runs ``tasks`` alone (no phantom, no heatmaps)."""
    sys.path.insert(0, str(ROOT))
    from study.runner import StudyConfig, StudyRunner

    runner = StudyRunner(StudyConfig(work_dir=str(tmp_path), heatmap_phrases=0))
    runner.prepare = lambda: None
    runner.tasks = lambda phrases_file=None: list(tasks)
    return runner


def test_the_study_runs_its_steps_in_worker_processes_after_their_dependencies(tmp_path):
    sys.path.insert(0, str(ROOT))
    from study.runner import Task

    # "record" is a step that records its arguments: the parent writes what each worker recorded
    tasks = [Task("b", "record", {"step": "b"}, after="a"), Task("a", "record", {"step": "a"}),
             Task("c", "record", {"step": "c"}, after="b"), Task("d", "record", {"step": "d"})]  # fmt: skip
    records = _runner_without_data(tmp_path, tasks).run(processes=1)
    assert [r["step"] for r in records] == ["a", "b", "c", "d", "session"]  # b waits for a, then runs before d
    written = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert written == records and written[-1]["processes"] == 1
    many = _runner_without_data(tmp_path / "many", tasks).run(processes=3)
    steps = [r["step"] for r in many]
    assert sorted(steps[:-1]) == ["a", "b", "c", "d"] and steps.index("a") < steps.index("b") < steps.index("c")
    with pytest.raises(ValueError, match="at least 1"):
        _runner_without_data(tmp_path / "none", tasks).run(processes=0)
    # the study's own steps: a model's evaluation, grounding and segmentation wait for its pre-training; a value
    # given twice is one step
    from study.runner import StudyConfig, StudyRunner

    once = StudyRunner(StudyConfig(work_dir=str(tmp_path / "once"), seeds=(0,), seg_fractions=(1.0,))).tasks()
    twice = StudyRunner(StudyConfig(work_dir=str(tmp_path / "twice"), seeds=(0, 0), seg_fractions=(1, 1.0))).tasks()
    assert [t.name for t in twice] == [t.name for t in once] and len({t.name for t in once}) == len(once)
    elvis = [t for t in once if "elvis seed 0, easy phantom, 6 epochs" in t.name or t.name.startswith("segmentation elvis")]
    assert [t.method for t in elvis] == ["pretrain", "evaluate_pretrain", "grounding", "segmentation", "segmentation"]
    assert all(t.after == "pre-training elvis seed 0, easy phantom, 6 epochs" for t in elvis[1:])


def test_two_steps_of_one_model_keep_both_their_item_values(tmp_path):
    """A model's evaluation and its grounding end in different workers, each with values for the same
    ``items/<name>.json``: a worker leaves its merge to the parent, which makes both (a file each worker read,
    changed and wrote back could keep only one part)."""
    sys.path.insert(0, str(ROOT))
    from study.runner import StudyConfig, StudyRunner, Task

    parts = {"validate": {"val_locality": [0.5, 0.25]}, "grounding": {"metrics": {"side": [1.0]}}}
    sources = {}
    for part, values in parts.items():
        sources[part] = tmp_path / f"{part}_items.json"
        sources[part].write_text(json.dumps(values))
    work = tmp_path / "work"
    worker = StudyRunner.worker(StudyConfig(work_dir=str(work)))
    worker._keep_items("easy_elvis_s0_e6", "validate", sources["validate"])
    assert worker.kept_items == [("easy_elvis_s0_e6", "validate", str(sources["validate"]))]
    assert not (work / "items").exists()  # nothing written by the worker
    tasks = [Task(part, "_keep_items", {"name": "easy_elvis_s0_e6", "part": part, "source": sources[part]})
             for part in parts]  # fmt: skip
    _runner_without_data(work, tasks).run(processes=2)
    assert json.loads((work / "items" / "easy_elvis_s0_e6.json").read_text()) == parts


def test_a_failing_step_stops_the_study_after_recording_the_steps_under_way(tmp_path):
    sys.path.insert(0, str(ROOT))
    from study.runner import Task

    tasks = [Task("fails", "no_such_step", {}), Task("under way", "record", {"step": "under way"}),
             Task("after", "record", {"step": "after"}, after="fails"), Task("last", "record", {"step": "last"})]  # fmt: skip
    runner = _runner_without_data(tmp_path, tasks)
    with pytest.raises(RuntimeError, match="study step 'fails' failed \\(AttributeError.*running the study again"):
        runner.run(processes=2)
    written = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    # the step under way beside the one that failed is recorded; none starts after the failure, and no session ends
    assert [r["step"] for r in written] == ["under way"]


def test_the_figures_do_not_depend_on_how_many_steps_run_at_once(phantom, tmp_path):
    args = ["run", "--dataset-dir", str(phantom), "--phantom-num", "40", "--image-size", "64", "--objectives", "elvis",
            "--seeds", "0", "--pretrain-epochs", "1", "--length-objectives", "--hard-objectives", "--seg-objectives",
            "elvis", "--seg-iterations", "2", "--seg-fractions", "1.0", "--seg-modes", "finetune",
            "--seg-curve-epochs", "1", "--seg-curve-epoch-length", "2"]  # fmt: skip
    figures = []
    for processes in ("1", "2"):
        work = tmp_path / processes
        res = _study(*args, "--work-dir", str(work), "--out", str(tmp_path / f"out{processes}"), "--processes", processes)
        assert res.returncode == 0, res.stderr[-3000:]
        records = [json.loads(line) for line in (work / "records.jsonl").read_text().splitlines()]
        assert records[-1]["step"] == "session" and records[-1]["processes"] == int(processes)
        figures.append(sorted(json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True)
                              for r in records[:-1]))  # fmt: skip
    assert len(figures[0]) == 5 and figures[0] == figures[1]  # curve, pre-training, locality, grounding, segmentation


_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from study.runner import StudyConfig, StudyRunner, Task

runner = StudyRunner(StudyConfig(work_dir={work!r}, heatmap_phrases=0))
runner.prepare = lambda: None
runner.tasks = lambda phrases_file=None: [Task("a", "record", {{"step": "a"}}), Task("b", "record", {{"step": "b"}})]
print([r["step"] for r in runner.run(processes=2)])
"""


def test_a_script_without_a_main_guard_gets_an_error_and_stdin_runs_in_process(tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text(_SCRIPT.format(root=str(ROOT), work=str(tmp_path / "script")))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "if __name__ ==" in res.stderr and "study step" in res.stderr, res.stderr[-2000:]
    # read from stdin, workers cannot start: the steps run one at a time in the script's own process
    code = _SCRIPT.format(root=str(ROOT), work=str(tmp_path / "stdin"))
    res = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "['a', 'b', 'session']" in res.stdout, res.stderr[-2000:]
    assert "read from stdin" in res.stderr


def test_dice_by_class_is_each_class_mean_over_seeds_at_the_largest_fraction():
    sys.path.insert(0, str(ROOT))
    from study.report import dice_by_class_table

    def run(objective, seed, mode, fraction, nodule, effusion):
        return {"step": "segmentation", "objective": objective, "seed": seed, "mode": mode, "fraction": fraction,
                "test_mean_dice": 0.0, "test_dice_per_class": {"nodule": nodule, "effusion": effusion}}  # fmt: skip

    records = [run("random", 0, "finetune", 1.0, 0.5, 0.7), run("random", 1, "finetune", 1.0, 0.7, 0.8),
               run("elvis", 0, "finetune", 1.0, 0.2, 0.8), run("elvis", 1, "finetune", 1.0, 0.4, None),
               run("elvis", 0, "frozen", 1.0, 0.1, 0.6), run("elvis", 0, "finetune", 0.1, 0.0, 0.0)]  # fmt: skip
    # elvis finetune nodule: 0.2, 0.4 -> 0.300 ± 0.141 (sample std sqrt(0.02)); effusion: 0.8 alone (None skipped);
    # random nodule 0.5, 0.7 -> 0.600 ± 0.141, effusion 0.7, 0.8 -> 0.750 ± 0.071; the 10% run is not in the table;
    # rows in the usual objective order (ELVIS first), frozen before fine-tuned
    assert dice_by_class_table(records).splitlines() == [
        "| objective (100% of the labels) | nodule | effusion |",
        "| --- | ---: | ---: |",
        "| ELVIS (intra-modal), frozen | 0.100 (1 seed) | 0.600 (1 seed) |",
        "| ELVIS (intra-modal), finetune | 0.300 ± 0.141 | 0.800 (1 seed) |",
        "| random init, finetune | 0.600 ± 0.141 | 0.750 ± 0.071 |",
    ]
    # the largest fraction's runs without per-class values: no table, not a smaller fraction's
    bare = [dict(r, test_dice_per_class=None) if r["fraction"] == 1.0 else r for r in records]
    assert dice_by_class_table(bare) == ""
    assert dice_by_class_table([{"step": "seg_curve", "curve": []}]) == ""  # no segmentation run, no table
