"""Classification transfer: the bundle (linear probe and fine-tuning), AUROC, label fractions, the RSNA and CheXpert
overlays, inference with TorchScript export, and the linear-probe table."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export
from monai.bundle import run as bundle_run
from monai.metrics import ROCAUCMetric

from monai_elvis.data import build_chexpert, datalist_split, split_items
from monai_elvis.errors import MissingInputError, find_usage_error
from monai_elvis.losses import MultiLabelBCEWithLogitsLoss
from monai_elvis.metrics import MultiLabelROCAUCMetric
from monai_elvis.networks import CXRImageEncoder, ElvisClassifier
from monai_elvis.transforms import LabelsFromKeysd, UncertainLabels, UncertainLabelsd

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "elvis_cxr_classification" / "configs"
TRAIN, EVALUATE, INFER = str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json"), str(CONFIGS / "inference.json")
META, LOGGING = str(CONFIGS / "metadata.json"), str(CONFIGS / "logging.conf")
TINY = dict(image_size=64, batch_size=4, num_workers=0, cache_rate=0.0)
KINDS = ["nodule", "opacity", "effusion", "pneumothorax", "cardiomegaly", "atelectasis"]


def _run(config_files, bundle_root, **overrides):
    files = [str(c) for c in (config_files if isinstance(config_files, (list, tuple)) else [config_files])]
    bundle_run(config_file=files, meta_file=META, logging_file=LOGGING, bundle_root=str(bundle_root),
               **{**TINY, **overrides})  # fmt: skip


def _tiny_net(**kwargs) -> ElvisClassifier:
    return ElvisClassifier(1, len(KINDS), "resnet18", 0.125, output_stride=16, global_pool="max", **kwargs)


def test_workflow_properties_and_the_class_names_monai_label_shows(phantom, tmp_path):
    train = ConfigWorkflow(config_file=TRAIN, meta_file=META, workflow_type="train", bundle_root=str(tmp_path),
                           dataset_dir=str(phantom), **TINY)  # fmt: skip
    train.initialize()
    assert train.check_properties() == []
    infer = ConfigWorkflow(config_file=INFER, meta_file=META, workflow_type="infer", bundle_root=str(tmp_path),
                           input_dir=str(phantom / "images"))  # fmt: skip
    with pytest.raises(Exception) as info:
        infer.initialize()  # checked before anything is built
    assert "no trained classification model at" in str(find_usage_error(info.value))
    assert isinstance(find_usage_error(info.value), MissingInputError)
    (tmp_path / "models").mkdir(exist_ok=True)
    torch.save(_tiny_net().state_dict(), tmp_path / "models" / "model.pt")
    infer = ConfigWorkflow(config_file=INFER, meta_file=META, workflow_type="infer", bundle_root=str(tmp_path),
                           input_dir=str(phantom / "images"))  # fmt: skip
    infer.initialize()
    assert infer.check_properties() == []
    # one output per class: the metadata's channel_def (what MONAI Label names the scores by) is the class list
    channel_def = json.loads(Path(META).read_text())["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert [channel_def[str(i)] for i in range(len(channel_def))] == KINDS
    assert ConfigParser.load_config_file(TRAIN)["class_names"] == KINDS
    assert ConfigParser.load_config_file(INFER)["class_names"] == KINDS


def test_two_iterations_from_a_pretraining_checkpoint_with_a_frozen_encoder(phantom, pretrained_bundle, tmp_path):
    ckpt = pretrained_bundle / "models" / "model.pt"
    workflow = ConfigWorkflow(config_file=TRAIN, meta_file=META, logging_file=LOGGING, workflow_type="train",
                              bundle_root=str(tmp_path), dataset_dir=str(phantom), max_epochs=1, epoch_length=2,
                              pretrained_ckpt=str(ckpt), freeze_encoder=True, **TINY)  # fmt: skip
    workflow.initialize()
    net = workflow.network_def
    head_before = {k: v.clone() for k, v in net.head.state_dict().items()}
    workflow.run()
    assert workflow.trainer.state.iteration == 2
    encoder = CXRImageEncoder("resnet18", 1, 0.125)
    encoder.load_state_dict_from(torch.load(ckpt, map_location="cpu", weights_only=True), "image_encoder.")
    saved = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    # frozen: weights and batch-norm statistics are the pre-trained ones, bit for bit, in memory and as saved
    for name, value in encoder.backbone.state_dict().items():
        assert torch.equal(net.encoder.state_dict()[name], value), name
        assert torch.equal(saved[f"encoder.{name}"], value), name
    assert not torch.equal(net.head.weight, head_before["weight"])  # the head learnt
    assert not torch.equal(net.head.bias, head_before["bias"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert set(metrics["val_auroc_per_class"]) == set(KINDS)
    assert metrics["val_mean_auroc"] is None or 0 <= metrics["val_mean_auroc"] <= 1


def test_fine_tuning_changes_the_encoder_and_evaluate_writes_auroc_and_probabilities(phantom, pretrained_bundle,
                                                                                      tmp_path):  # fmt: skip
    ckpt = pretrained_bundle / "models" / "model.pt"
    _run(TRAIN, tmp_path, dataset_dir=str(phantom), max_epochs=1, epoch_length=2, pretrained_ckpt=str(ckpt),
         freeze_encoder="false")  # fmt: skip
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    pretrained = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert not torch.equal(state["encoder.conv1.weight"], pretrained["image_encoder.backbone.conv1.weight"])
    _run([TRAIN, EVALUATE], tmp_path, dataset_dir=str(phantom))
    test = json.loads((tmp_path / "eval" / "test_metrics.json").read_text())["metrics"]
    assert set(test["test_auroc_per_class"]) == set(KINDS)
    scored = [v for v in test["test_auroc_per_class"].values() if v is not None]
    assert test["test_mean_auroc"] == pytest.approx(np.mean(scored), abs=1e-6)
    with open(tmp_path / "eval" / "test_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    test_ids = {e["image"] for e in json.loads((phantom / "datalist.json").read_text())["test"]}
    assert {str(Path(r["image"]).relative_to(phantom)) for r in rows} == test_ids
    assert all(0 <= float(r[k]) <= 1 for r in rows for k in KINDS)


def test_auroc_by_hand_on_a_known_ranking():
    # class 0: positives scored 0.35 and 0.8, negatives 0.1 and 0.4: 3 of the 4 (positive, negative) pairs are
    # ordered right, AUC 0.75; class 1 is ranked perfectly (1.0); class 2 exactly backwards (0.0); the mean is 7/12
    y_pred = torch.tensor([[0.1, 0.1, 0.9], [0.4, 0.2, 0.8], [0.35, 0.7, 0.2], [0.8, 0.9, 0.1]])
    y = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.float)
    per_class = MultiLabelROCAUCMetric("none")
    mean = MultiLabelROCAUCMetric("macro")
    for m in (per_class, mean):
        m(list(y_pred), list(y))  # as the ignite handler feeds it: one [K] tensor per image
    torch.testing.assert_close(per_class.aggregate(), torch.tensor([0.75, 1.0, 0.0], dtype=torch.float64))
    assert float(mean.aggregate()) == pytest.approx(7 / 12)
    monai_auc = ROCAUCMetric(average="none")
    monai_auc(y_pred, y)
    assert monai_auc.aggregate() == pytest.approx([0.75, 1.0, 0.0])  # MONAI's own metric agrees
    # a class without positives is left out of the mean (MONAI's macro mean would be NaN)
    y_absent = y.clone()
    y_absent[:, 2] = 0
    m = MultiLabelROCAUCMetric("macro")
    m(y_pred, y_absent)
    with pytest.warns(UserWarning, match="1 of 3 classes lack positives or negatives"):
        assert float(m.aggregate()) == pytest.approx(0.875)
    # ignored labels (-1) are left out of their class only: class 0 without image 1 is 2 of 2 pairs... AUC 1.0
    y_ignored = y.clone()
    y_ignored[1, 0] = -1
    m = MultiLabelROCAUCMetric("none", ignore_value=-1)
    m(y_pred, y_ignored)
    torch.testing.assert_close(m.aggregate(), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    # a binary task ([B, 1]) gives one number
    b = MultiLabelROCAUCMetric("none")
    b(y_pred[:, :1], y[:, :1])
    assert float(b.aggregate()) == pytest.approx(0.75)


def test_the_loss_leaves_out_ignored_labels():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    target = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    loss = MultiLabelBCEWithLogitsLoss(ignore_value=-1)(logits, target)
    keep = torch.tensor([0, 2, 3])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits.flatten()[keep], target.flatten()[keep])
    torch.testing.assert_close(loss, expected)
    plain = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = torch.nn.BCEWithLogitsLoss()(logits, plain)
    torch.testing.assert_close(MultiLabelBCEWithLogitsLoss()(logits, plain), expected)
    assert float(MultiLabelBCEWithLogitsLoss()(logits, torch.full((2, 2), -1.0))) == 0.0


def test_the_label_fraction_is_seeded_and_exact(phantom):
    datalist = {"training": [{"image": f"images/{i:05d}.png", "findings": []} for i in range(1600)]}
    for fraction, n in ((0.01, 16), (0.1, 160), (1.0, 1600)):
        kept = datalist_split(datalist, "training", fraction=fraction, seed=3)
        assert len(kept) == n
        assert kept == datalist_split(datalist, "training", fraction=fraction, seed=3)  # same seed, same subset
        assert len({e["image"] for e in kept}) == n
    assert datalist_split(datalist, "training", fraction=0.1, seed=3) != datalist_split(datalist, "training",
                                                                                          fraction=0.1, seed=4)
    assert len(datalist_split({"training": datalist["training"][:10]}, "training", fraction=0.01)) == 1  # at least 1
    # through the bundle: one setting, on the phantom's own training split
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"dataset_dir": str(phantom), "label_fraction": 0.25, "seed": 1})
    data = parser.get_parsed_content("train#data")
    full = json.loads((phantom / "datalist.json").read_text())["training"]
    assert len(data) == round(0.25 * len(full))
    assert {str(Path(e["image"]).relative_to(phantom)) for e in data} <= {e["image"] for e in full}
    labels = parser.get_parsed_content("label_transforms")[0](data[0])["label"]
    assert labels.tolist() == [float(k in data[0]["findings"]) for k in KINDS]


def _rsna_folder(root: Path, labels_zip: Path, write_dicom) -> list[str]:
    """Synthetic DICOMs for real RSNA patients (labels from the torchxrayvision wheel's CSV): in each split of the
    builder's seeded split, two with pneumonia and two without."""
    from monai_elvis.data import read_csv_rows

    rows = read_csv_rows(labels_zip, ["patientId", "Target"])
    target = {}
    for r in rows:
        target[r["patientId"]] = max(target.get(r["patientId"], 0), int(r["Target"]))
    splits = split_items(target, seed=0)
    chosen = []
    for split in ("training", "validation", "test"):
        for label in (0, 1):
            chosen += [p for p in sorted(target) if splits[p] == split and target[p] == label][:2]
    rng = np.random.default_rng(0)
    for pid in chosen:
        image = rng.integers(0, 120, (96, 96), dtype=np.uint8)
        if target[pid]:
            image[30:70, 20:50] += 100  # an opacity where the boxes say, roughly
        write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", image)
    (root / labels_zip.name).write_bytes(labels_zip.read_bytes())
    return chosen


def test_rsna_overlay_end_to_end_on_synthetic_dicoms(tmp_path, txv_file, write_dicom):
    data = tmp_path / "rsna"
    chosen = _rsna_folder(data, txv_file("kaggle_stage_2_train_labels.csv.zip"), write_dicom)
    overlay = ROOT / "configs" / "classification" / "rsna.json"
    _run([TRAIN, overlay], tmp_path / "bundle", dataset_dir=str(data), max_epochs=2, epoch_length=2)
    state = torch.load(tmp_path / "bundle" / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert state["head.weight"].shape == (1, 64)  # binary: one logit
    val = json.loads((tmp_path / "bundle" / "eval" / "metrics.json").read_text())
    assert val["epoch"] == 2 and 0 <= val["metrics"]["val_mean_auroc"] <= 1
    _run([TRAIN, overlay, EVALUATE], tmp_path / "bundle", dataset_dir=str(data))
    test = json.loads((tmp_path / "bundle" / "eval" / "test_metrics.json").read_text())["metrics"]
    assert 0 <= test["test_mean_auroc"] <= 1 and test["test_auroc_per_class"] == test["test_mean_auroc"]
    with open(tmp_path / "bundle" / "eval" / "test_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and set(rows[0]) == {"image", "pneumonia"}
    assert {Path(r["image"]).stem for r in rows} <= set(chosen)
    assert LabelsFromKeysd(["pneumonia"])({"pneumonia": 1})["label"].tolist() == [1.0]


CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Cardiomegaly", "Edema",
                   "Consolidation", "Atelectasis", "Pleural Effusion"]  # fmt: skip


def _chexpert_folder(root: Path, n_patients: int = 10) -> None:
    """CheXpert's layout: ``CheXpert-v1.0-small/{train,valid}.csv`` whose paths start with that folder's name."""
    from PIL import Image

    rng = random.Random(0)
    values = ["1.0", "0.0", "-1.0", ""]
    for split, n in (("train", n_patients), ("valid", 4)):
        rows = []
        for p in range(n):
            for view in ("frontal", "lateral"):
                rel = f"CheXpert-v1.0-small/{split}/patient{p:05d}/study1/view1_{view}.jpg"
                path = root.parent / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((40, 32), 40 * (p % 5), np.uint8)).save(path)
                labels = [rng.choice(values) if split == "train" else rng.choice(["1.0", "0.0"]) for _ in range(5)]
                if split == "valid":
                    labels[p % 5], labels[(p + 1) % 5] = "1.0", "0.0"
                rows.append([rel, "Female", "60", view.capitalize(), "PA", "", *labels])
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([CHEXPERT_HEADER, *rows])


def test_chexpert_csv_and_the_uncertain_label_policies(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([
            CHEXPERT_HEADER,
            ["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "F", "70", "Frontal", "AP", "",
             "1.0", "-1.0", "", "0.0", "-1.0"],
            ["CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg", "F", "70", "Lateral", "", "",
             "1.0", "-1.0", "", "0.0", "-1.0"],
            ["CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg", "M", "50", "Frontal", "PA", "1.0",
             "", "", "", "", ""],
            ["CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg", "M", "40", "Frontal", "PA", "",
             "0.0", "0.0", "1.0", "1.0", "0.0"],
        ])  # fmt: skip
    for p in (1, 2):  # patient 3's image is missing
        path = tmp_path / f"CheXpert-v1.0-small/train/patient0000{p}/study1/view1_frontal.jpg"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"jpg")
    datalist, summary = build_chexpert(root)
    entries = {e["patient"]: e for v in datalist.values() for e in v}
    # the competition's order: Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion; blank is 0
    assert entries["patient00001"]["label"] == [0.0, 1.0, 0.0, -1.0, -1.0]
    assert entries["patient00002"]["label"] == [0.0, 0.0, 0.0, 0.0, 0.0]
    assert entries["patient00001"]["image"] == "train/patient00001/study1/view1_frontal.jpg"
    assert (root / entries["patient00001"]["image"]).is_file()
    assert summary.skipped == {"lateral view": 1, "missing image": 1}
    # no valid.csv: 70/15/15 by patient, the builders' seeded split
    splits = split_items(["patient00001", "patient00002", "patient00003"], seed=0)
    assert {e["patient"]: split for split, v in datalist.items() for e in v} == {p: splits[p] for p in entries}
    # the policies: U-Ones, U-Zeros, U-Ignore (kept as -1, left out by the loss and the AUROC)
    label = entries["patient00001"]["label"]
    assert UncertainLabels("ones")(label).tolist() == [0, 1, 0, 1, 1]
    assert UncertainLabels("zeros")(label).tolist() == [0, 1, 0, 0, 0]
    assert UncertainLabelsd("label", "ignore")({"label": label})["label"].tolist() == [0, 1, 0, -1, -1]
    with pytest.raises(ValueError, match="policy must be one of"):
        UncertainLabels("maybe")
    with pytest.raises(ValueError, match="label: labels must be 0, 1 or -1"):
        UncertainLabelsd("label")({"label": [2.0]})


def test_chexpert_overlay_end_to_end_with_ignored_uncertain_labels(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    _chexpert_folder(root)
    datalist, summary = build_chexpert(root)
    assert {k: len(v) for k, v in datalist.items()} == {"training": 8, "validation": 2, "test": 4}  # valid.csv: test
    assert summary.skipped == {"lateral view": 14}
    overlay = ROOT / "configs" / "classification" / "chexpert.json"
    _run([TRAIN, overlay], tmp_path / "bundle", dataset_dir=str(root), uncertain="ignore", max_epochs=1,
         epoch_length=2)  # fmt: skip
    _run([TRAIN, overlay, EVALUATE], tmp_path / "bundle", dataset_dir=str(root), uncertain="ignore")
    test = json.loads((tmp_path / "bundle" / "eval" / "test_metrics.json").read_text())["metrics"]
    names = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    assert list(test["test_auroc_per_class"]) == names
    assert 0 <= test["test_mean_auroc"] <= 1


def test_inference_gives_per_class_probabilities_and_the_export_matches(phantom, tmp_path, rg1_dicom):
    (tmp_path / "models").mkdir()
    net = _tiny_net().eval()
    torch.nn.init.normal_(net.head.weight, std=0.5)
    torch.save(net.state_dict(), tmp_path / "models" / "model.pt")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "RG1_UNCR.dcm").write_bytes(Path(rg1_dicom).read_bytes())
    (inputs / "phantom_00000.png").write_bytes((phantom / "images" / "phantom_00000.png").read_bytes())
    bundle_run(config_file=INFER, logging_file=LOGGING, bundle_root=str(tmp_path), input_dir=str(inputs),
               output_dir=str(tmp_path / "out"), image_size=64)  # fmt: skip
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [Path(p["image"]).name for p in predictions] == ["RG1_UNCR.dcm", "phantom_00000.png"]
    for p in predictions:
        assert list(p["probabilities"]) == KINDS and all(0 <= v <= 1 for v in p["probabilities"].values())
    # the probabilities are the network's sigmoid on the bundle's preprocessing
    parser = ConfigParser()
    parser.read_config(INFER)
    parser.update({"bundle_root": str(tmp_path), "image_size": 64})
    image = parser.get_parsed_content("preprocessing")({"image": str(inputs / "phantom_00000.png")})["image"]
    with torch.no_grad():
        expected = torch.sigmoid(net(image[None].as_tensor()))[0]
    torch.testing.assert_close(torch.tensor(list(predictions[1]["probabilities"].values())), expected, atol=1e-5,
                               rtol=1e-5)  # fmt: skip
    # TorchScript export through MONAI's bundle API, then the same outputs as the eager model
    ts = tmp_path / "models" / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(tmp_path / "models" / "model.pt"),
                meta_file=META, config_file=INFER, bundle_root=str(tmp_path))  # fmt: skip
    scripted = torch.jit.load(str(ts), map_location="cpu")
    x = torch.randn(3, 1, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), atol=1e-5, rtol=1e-5)


def test_linear_probe_command_writes_the_table(phantom, pretrained_bundle, tmp_path, capsys):
    from study.__main__ import main

    out = tmp_path / "probe.md"
    argv = ["linear-probe", "--pretrained-ckpt", str(pretrained_bundle / "models" / "model.pt"), "--dataset-dir",
            str(phantom), "--work-dir", str(tmp_path / "work"), "--fractions", "0.1", "1.0", "--seeds", "0",
            "--epochs", "1", "--iterations", "1", "--batch-size", "4", "--image-size", "64",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "pretrained" in printed and "random" in printed and "10%" in printed and "100%" in printed
    records = [json.loads(x) for x in (tmp_path / "work" / "records.jsonl").read_text().splitlines()]
    assert sorted((r["encoder"], r["fraction"]) for r in records) == [("pretrained", 0.1), ("pretrained", 1.0),
                                                                      ("random", 0.1), ("random", 1.0)]  # fmt: skip
    n = len(json.loads((phantom / "datalist.json").read_text())["training"])
    assert {r["fraction"]: r["train_items"] for r in records} == {0.1: max(1, round(0.1 * n)), 1.0: n}
    text = out.read_text()
    assert "| encoder | 10% | 100% |" in text and "| pretrained |" in text and "| random |" in text
    assert main(argv) == 0  # everything recorded: nothing runs again
    assert len((tmp_path / "work" / "records.jsonl").read_text().splitlines()) == 4
