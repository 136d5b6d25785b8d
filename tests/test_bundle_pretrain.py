"""The pre-training bundle through MONAI's bundle runner, on a small phantom."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from monai.bundle import ConfigWorkflow
from monai.bundle import run as bundle_run

from monai_elvis.engines import ResumeSettingsError, describe_settings, settings_differences
from monai_elvis.errors import find_usage_error
from monai_elvis.losses import ElvisLoss, LocalAlignmentLoss
from monai_elvis.networks import CXRImageEncoder, ElvisNet, ReportTextEncoder

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "elvis_pretrain" / "configs"
TRAIN = str(CONFIGS / "train.json")
TINY = dict(phantom_num=40, phantom_size=64, image_size=64, batch_size=8, num_workers=0, val_interval=1,
            vocab_size=1000)  # fmt: skip


def _network(*overlays):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([TRAIN, *map(str, overlays)])
    parser.update({"vocab_size": TINY["vocab_size"]})
    return parser.get_parsed_content("network_def")


def _run(config_files, bundle_root, dataset_dir, **overrides):
    bundle_run(config_file=[str(c) for c in config_files], meta_file=str(CONFIGS / "metadata.json"),
               logging_file=str(CONFIGS / "logging.conf"), bundle_root=str(bundle_root),
               dataset_dir=str(dataset_dir), **{**TINY, **overrides})  # fmt: skip


def test_train_workflow_properties(phantom, tmp_path):
    workflow = ConfigWorkflow(config_file=TRAIN, meta_file=str(CONFIGS / "metadata.json"), workflow_type="train",
                              bundle_root=str(tmp_path), dataset_dir=str(phantom), **TINY)  # fmt: skip
    workflow.initialize()
    assert workflow.check_properties() == []
    assert workflow.max_epochs == 30 and workflow.dataset_dir == str(phantom)


@pytest.mark.parametrize("objective", ["elvis", "lovt", "gloria", "convirt"])
def test_two_iterations_per_objective(objective, phantom, tmp_path):
    overlay = ROOT / "configs" / "objective" / f"{objective}.json"
    _run([TRAIN, overlay], tmp_path, phantom, max_epochs=1, epoch_length=2)
    models = tmp_path / "models"
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    net = _network(overlay)  # the architecture as the bundle's configs define it
    net.load_state_dict(state)  # a plain state dict of the network
    assert ReportTextEncoder(models / "text_model").hidden_size == 64
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["epoch"] == 1
    figures = {"val_zero_shot_auc", "val_zero_shot_auc_per_class", "val_recall_at_10", "val_precision_at_10",
               "val_locality", "val_map_correlation", "val_grounding_cnr", "val_grounding_pointing",
               "val_grounding_side", "val_grounding_miou"}  # fmt: skip
    chances = {"val_zero_shot_auc", "val_recall_at_10", "val_precision_at_10", "val_map_correlation",
               "val_grounding_cnr", "val_grounding_pointing", "val_grounding_side"}  # fmt: skip
    assert set(metrics["metrics"]) == figures | {f"{k}_chance" for k in chances}
    m = metrics["metrics"]
    assert set(m["val_zero_shot_auc_per_class"]) == {"nodule", "opacity", "effusion", "pneumothorax", "cardiomegaly",
                                                     "atelectasis"}  # fmt: skip
    assert m["val_recall_at_10_chance"] == 1.0  # 4 validation pairs: any 10 hold the match
    assert m["val_zero_shot_auc_chance"] == 0.5 and m["val_grounding_side_chance"] == 0.5
    assert all(0 <= m[k] <= 1 for k in ("val_recall_at_10", "val_precision_at_10", "val_grounding_pointing"))
    assert -1 <= m["val_locality"] <= 1 and m["val_grounding_cnr"] >= 0
    history = (tmp_path / "eval" / "metrics_history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in history] == [1, 1]  # the retrieval and the grounding evaluators


def test_resume_continues_after_the_last_epoch_and_evaluate(phantom, tmp_path):
    _run([TRAIN], tmp_path, phantom, max_epochs=1, epoch_length=2)
    first = tmp_path / "models" / "resume" / "checkpoint_iteration=2.pt"  # epoch 1's end (out of models/ itself)
    ckpt = torch.load(first, map_location="cpu", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 2 and ckpt["trainer"]["epoch_length"] == 2  # one epoch done
    events_before = set((tmp_path / "eval").glob("events.out.tfevents.*"))
    _run([TRAIN], tmp_path, phantom, max_epochs=2, epoch_length=2)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = set()
    for f in set((tmp_path / "eval").glob("events.out.tfevents.*")) - events_before:
        acc = EventAccumulator(str(f))
        acc.Reload()
        if "train_loss" in acc.Tags()["scalars"]:
            steps |= {e.step for e in acc.Scalars("train_loss")}
    assert steps == {3, 4}  # the restarted run did only epoch 2: epoch 1 is not repeated
    assert not first.exists() and (tmp_path / "models" / "resume" / "checkpoint_iteration=4.pt").exists()
    assert not list((tmp_path / "models").glob("checkpoint*.pt"))  # MONAI Label lists models/*.pt as models
    ckpt = torch.load(tmp_path / "models" / "resume" / "checkpoint_iteration=4.pt", map_location="cpu", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 4
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["epoch"] == 2
    # evaluate.json on the saved model, on the test split
    _run([TRAIN, CONFIGS / "evaluate.json"], tmp_path, phantom)
    test_metrics = json.loads((tmp_path / "eval" / "test_metrics.json").read_text())
    assert {"val_zero_shot_auc", "val_recall_at_10", "val_grounding_cnr", "val_grounding_side"} <= set(
        test_metrics["metrics"])


def test_resume_refuses_a_checkpoint_of_other_settings_and_starts_over_on_request(phantom, tmp_path):
    """The README's second command (another objective) in the folder of a finished default run: it must not
    "resume" the ELVIS run and exit at once, leaving the ELVIS model in place."""
    lovt = ROOT / "configs" / "objective" / "lovt.json"
    _run([TRAIN], tmp_path, phantom, max_epochs=1, epoch_length=2)
    models = tmp_path / "models"
    elvis_model = (models / "model.pt").read_bytes()
    stored = json.loads((models / "resume" / "run_settings.json").read_text())
    assert stored["objective"]["local_loss"]["target"] == "intra_modal" and stored["data"]["image_size"] == 64
    with pytest.raises(Exception) as info:
        _run([TRAIN, lovt], tmp_path, phantom, max_epochs=2, epoch_length=2)
    error = find_usage_error(info.value)
    assert isinstance(error, ResumeSettingsError), info.value
    message = str(error)
    assert 'objective.local_loss.target: "intra_modal" in the checkpoint\'s run, "spatial" now' in message
    assert "objective.local_loss.temperature: 0.1 in the checkpoint's run, 0.3 now" in message
    assert "--bundle_root" in message and "--resume false" in message and "run_settings.json" in message
    assert (models / "model.pt").read_bytes() == elvis_model and (models / "resume" / "checkpoint_iteration=2.pt").is_file()
    # --resume false (the command line passes the string "false"): the old checkpoint goes, the new objective trains
    _run([TRAIN, lovt], tmp_path, phantom, max_epochs=1, epoch_length=2, resume="false")
    ckpt = torch.load(models / "resume" / "checkpoint_iteration=2.pt", map_location="cpu", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 2  # a fresh epoch 1, not the old one
    assert (models / "model.pt").read_bytes() != elvis_model
    assert json.loads((models / "resume" / "run_settings.json").read_text())["objective"]["local_loss"]["target"] == "spatial"


def test_settings_description_and_differences():
    def objective(**kw):
        return ElvisLoss(local_loss=LocalAlignmentLoss(**kw))

    a = describe_settings({"objective": objective(target="intra_modal"), "size": (128, 128), "data": list(range(100))})
    assert a["objective"]["_target_"] == "monai_elvis.losses.elvis_loss.ElvisLoss"
    assert a["objective"]["global_loss"]["initial_temperature"] == 0.1 and a["size"] == [128, 128]
    assert a["data"]["items"] == 100 and len(a["data"]["sha256"]) == 64  # a long list (a datalist) is digested
    assert settings_differences(a, describe_settings({"objective": objective(target="intra_modal"), "size": [128, 128],
                                                      "data": list(range(100))})) == []  # fmt: skip
    b = describe_settings({"objective": objective(target="one_hot"), "size": (128, 128), "data": list(range(101))})
    assert settings_differences(a, b) == [
        'objective.local_loss.target: "intra_modal" in the checkpoint\'s run, "one_hot" now',
        "data.items: 100 in the checkpoint's run, 101 now",
        f"data.sha256: \"{a['data']['sha256']}\" in the checkpoint's run, \"{b['data']['sha256']}\" now",
    ]
    assert settings_differences({"a": 1}, {"b": 2}) == ["a: 1 in the checkpoint's run, not set now",
                                                        "b: not set in the checkpoint's run, 2 now"]  # fmt: skip


def test_ddp_two_gloo_processes(phantom, tmp_path, run_torchrun):
    run_torchrun([TRAIN, CONFIGS / "multi_gpu_train.json"], CONFIGS / "metadata.json", CONFIGS / "logging.conf", 29517,
                 bundle_root=tmp_path, dataset_dir=phantom, max_epochs=1, epoch_length=2, **TINY)  # fmt: skip
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["epoch"] == 1


def test_bad_samples_are_skipped_up_to_the_limit(phantom, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantom, data)
    first = json.loads((data / "datalist.json").read_text())["training"][0]["image"]
    (data / first).write_bytes((data / first).read_bytes()[:60])  # a truncated PNG
    _run([TRAIN], tmp_path / "ok", data, max_epochs=1, max_bad_samples=1)
    assert (tmp_path / "ok" / "models" / "model.pt").is_file()
    with pytest.raises(Exception) as info:
        _run([TRAIN], tmp_path / "strict", data, max_epochs=1, max_bad_samples=0)
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    limit = [e for e in chain if type(e).__name__ == "BadSampleLimitError"]
    assert limit, chain
    assert re.search(r"1 bad samples, more than max_skips=0; the last, .*phantom_\d+\.png: CXRLoadError: cannot read",
                     str(limit[0]))


def test_a_default_command_line_run_logs_no_empty_summary_and_no_fresh_resume(phantom, tmp_path):
    """``python -m monai.bundle run`` given only config files (as the README's command): MONAI's empty
    ``--- input summary`` block and ignite's ``resuming from iteration 0`` are not in the console, the run's own
    lines are."""
    import os
    import subprocess
    import sys

    overlay = tmp_path / "tiny.json"
    overlay.write_text(json.dumps({"bundle_root": str(tmp_path / "run"), "dataset_dir": str(phantom), **TINY,
                                   "max_epochs": 1, "epoch_length": 2}))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"['{TRAIN}','{overlay}']"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "input summary" not in out
    assert "resuming from iteration 0" not in out
    assert "Writing model shards" not in out
    for line in ("Epoch[1] Complete", "Train completed, saved final checkpoint", "val_zero_shot_auc", "summary of"):
        assert line in out, line
