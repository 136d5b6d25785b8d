"""Datalist builders driven end to end on trees in the real formats, written by the tests."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, load_decathlon_datalist
from monai.transforms import Compose
from PIL import Image

from monai_elvis.data import (
    DatasetFormatError,
    build_iu_xray,
    build_mimic_cxr,
    build_ms_cxr,
    build_rsna,
    build_siim,
    collate_reports,
    split_items,
    subsample_training,
)
from monai_elvis.data.__main__ import main
from monai_elvis.transforms import LoadCXRd, RLEToMaskd, SplitSentencesd, TokenizeReportd, cxr_spatial_intensity

REPORT = " FINAL REPORT\n EXAMINATION: CHEST\n FINDINGS: Heart size is normal. No effusion.\n IMPRESSION: No acute process.\n"


def _write_csv_gz(path, header, rows):
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture()
def mimic_tree(tmp_path):
    """A MIMIC-CXR-JPG tree: 4 studies, 6 images, with a lateral view and broken reports."""
    root = tmp_path / "mimic"
    studies = {  # (subject, study): (split, [(dicom, view)], report bytes or None)
        ("10000032", "50414267"): ("train", [("d1", "PA"), ("d2", "LATERAL")], REPORT.encode()),
        ("10000764", "57375967"): ("validate", [("d3", "AP")], REPORT.encode()),
        ("11000011", "51000001"): ("test", [("d4", "PA")], " FINDINGS: \n IMPRESSION: \n".encode()),
        ("12000012", "52000002"): ("train", [("d5", "PA"), ("d6", "AP")], "Lungs clear \xe9.".encode("latin-1")),
        ("13000013", "53000003"): ("train", [("d7", "PA")], None),
    }
    split_rows, meta_rows = [], []
    for (subject, study), (split, images, report) in studies.items():
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True)
        for dicom, view in images:
            Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(folder / f"{dicom}.jpg")
            split_rows.append([dicom, study, subject, split])
            meta_rows.append([dicom, subject, study, view])
        if report is not None:
            rep = root / "mimic-cxr-reports" / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
            rep.parent.mkdir(parents=True, exist_ok=True)
            rep.write_bytes(report)
    split_rows.append(["d9", "59999999", "19999999", "train"])  # listed but no image on disk
    meta_rows.append(["d9", "19999999", "59999999", "PA"])
    _write_csv_gz(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    _write_csv_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "subject_id", "study_id", "ViewPosition"], meta_rows)
    return root


def test_mimic_cxr_builder(mimic_tree):
    datalist, summary = build_mimic_cxr(mimic_tree)
    assert [e["dicom_id"] for e in datalist["training"]] == ["d1"]
    assert [e["dicom_id"] for e in datalist["validation"]] == ["d3"]
    assert datalist["test"] == []
    e = datalist["training"][0]
    assert e["image"] == "files/p10/p10000032/s50414267/d1.jpg"
    assert e["report"] == "Heart size is normal. No effusion. No acute process."
    assert e["view"] == "PA"
    assert dict(summary.skipped) == {
        "view not PA/AP": 1, "empty report": 1, "report not UTF-8": 1, "report already rejected": 1,
        "missing report": 1, "missing image": 1,
    }  # fmt: skip
    assert str(summary).startswith("mimic-cxr: kept 2 (training 1, validation 1, test 0), skipped 6")


def test_mimic_cxr_datalist_drives_the_pipeline(mimic_tree, tmp_path, iu_tokenizer, capsys):
    out = tmp_path / "datalist.json"
    assert main(["mimic-cxr", "--root", str(mimic_tree), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kept 2" in printed and "1 missing report" in printed
    files = load_decathlon_datalist(out, data_list_key="training", base_dir=mimic_tree)
    pipeline = Compose([LoadCXRd("image"), *cxr_spatial_intensity(32), SplitSentencesd(), TokenizeReportd(tokenizer=iu_tokenizer)])
    batch = next(iter(DataLoader(Dataset(files * 3, pipeline), batch_size=3, collate_fn=collate_reports)))
    assert batch["image"].shape == (3, 1, 32, 32)
    assert batch["input_ids"].shape[0] == 3 and batch["sentence_index"].max() == 2
    assert batch["report"][0] == ["Heart size is normal.", "No effusion.", "No acute process."]


def test_wrong_columns_and_missing_files_name_the_file(mimic_tree, tmp_path):
    _write_csv_gz(mimic_tree / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "View"], [["d1", "PA"]])
    with pytest.raises(DatasetFormatError, match=r"mimic-cxr-2.0.0-metadata.csv.gz lacks the column\(s\) \['ViewPosition'\]"):
        build_mimic_cxr(mimic_tree)
    with pytest.raises(DatasetFormatError, match="no split CSV"):
        build_mimic_cxr(tmp_path / "empty")
    assert main(["rsna", "--root", str(tmp_path), "--out", str(tmp_path / "x.json")]) == 2


MS_HEADER = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height"]


@pytest.mark.parametrize("version", ["v1.0.0", "v1.1.0"])
def test_ms_cxr_builder_merges_boxes(mimic_tree, version):
    rows = [
        ["d1", "Pneumonia", "left lower lobe opacity", "files/p10/p10000032/s50414267/d1.jpg", 10, 20, 30, 40, 8, 8],
        ["d1", "Pneumonia", "left lower lobe opacity", "files/p10/p10000032/s50414267/d1.jpg", 50, 60, 5, 5, 8, 8],
        ["d3", "Pneumothorax", "right apical pneumothorax", "files/p10/p10000764/s57375967/d3.jpg", 1, 2, 3, 4, 8, 8],
        ["d8", "Edema", "edema", "files/p18/p18/s8/d8.jpg", 1, 2, 3, 4, 8, 8],  # image not on disk
        ["d3", "Atelectasis", "bad row", "files/p10/p10000764/s57375967/d3.jpg", "x", 2, 3, 4, 8, 8],
    ]
    header = MS_HEADER + (["split"] if version == "v1.1.0" else [])
    if version == "v1.1.0":
        rows = [r + [s] for r, s in zip(rows, ["train", "train", "test", "val", "val"])]
    with open(mimic_tree / f"MS_CXR_Local_Alignment_{version}.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    datalist, summary = build_ms_cxr(mimic_tree)
    entries = [e for split in datalist.values() for e in split]
    assert len(entries) == 2
    lll = next(e for e in entries if e["dicom_id"] == "d1")
    assert lll["boxes"] == [[10, 20, 30, 40], [50, 60, 5, 5]] and lll["phrase"] == "left lower lobe opacity"
    assert lll["image_size"] == [8, 8] and "split" not in lll
    assert dict(summary.skipped) == {"missing image": 1, "bad box values": 1}
    if version == "v1.1.0":
        assert [e["dicom_id"] for e in datalist["training"]] == ["d1"]
        assert [e["dicom_id"] for e in datalist["test"]] == ["d3"]


def test_siim_builder_with_real_format_files(tmp_path, write_dicom):
    root = tmp_path / "siim"
    ids = [f"1.2.276.0.{i}" for i in range(20)]
    for i, image_id in enumerate(ids[:-1]):  # the last one has no DICOM
        write_dicom(root / "dicom-images-train" / f"s{i}" / f"r{i}" / f"{image_id}.dcm", np.zeros((16, 16), np.uint8))
    with open(root / "train-rle.csv", "w") as f:
        f.write("ImageId, EncodedPixels\n")
        for i, image_id in enumerate(ids):
            f.write(f"{image_id}, {'-1' if i % 2 else '3 4 10 2'}\n")
        f.write(f"{ids[0]}, 40 3\n")  # a second region of the first image
    datalist, summary = build_siim(root, seed=1)
    counts = {k: len(v) for k, v in datalist.items()}
    assert counts == {"training": 13, "validation": 3, "test": 3}
    assert summary.skipped == {"missing image": 1}
    first = next(e for v in datalist.values() for e in v if ids[0] in e["image"])
    assert first["label"] == ["3 4 10 2", "40 3"] and first["pneumothorax"] == 1
    mask = RLEToMaskd(height=16, width=16)(dict(first))["label"]
    assert mask.sum() == 4 + 2 + 3
    again, _ = build_siim(root, seed=1)
    assert again == datalist
    other, _ = build_siim(root, seed=2)
    assert other != datalist


def test_rsna_builder(tmp_path, write_dicom):
    root = tmp_path / "rsna"
    rows = [["p1", "", "", "", "", "0"], ["p2", "10", "20", "30", "40", "1"], ["p2", "50", "60", "5", "6", "1"],
            ["p3", "1", "1", "1", "1", "1"]]  # fmt: skip
    for pid in ("p1", "p2"):
        write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", np.zeros((8, 8), np.uint8))
    with open(root / "stage_2_train_labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["patientId", "x", "y", "width", "height", "Target"], *rows])
    datalist, summary = build_rsna(root)
    entries = {e["image"]: e for v in datalist.values() for e in v}
    assert entries["stage_2_train_images/p2.dcm"]["boxes"] == [[10, 20, 30, 40], [50, 60, 5, 6]]
    assert entries["stage_2_train_images/p1.dcm"] == {"image": "stage_2_train_images/p1.dcm", "boxes": [], "pneumonia": 0}
    assert summary.skipped == {"missing image": 1}


def test_iu_xray_builder_on_the_real_reports(iu_reports_tgz, tmp_path):
    datalist, summary = build_iu_xray(iu_reports_tgz)
    assert sum(len(v) for v in datalist.values()) == 3927
    assert summary.skipped == {"no findings or impression": 28}
    cxr1 = next(e for v in datalist.values() for e in v if e["report_id"] == "CXR1")
    assert cxr1["report"].startswith("The cardiac silhouette") and cxr1["report"].endswith("Normal chest x-XXXX.")
    images = tmp_path / "png"
    images.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(images / "CXR1_1_IM-0001-3001.png")
    with_images, summary = build_iu_xray(iu_reports_tgz, images=images)
    assert [e["report_id"] for v in with_images.values() for e in v] == ["CXR1"]
    assert summary.skipped["no image"] == 3926


def test_iu_xray_command_reads_the_reports_from_the_wheel_and_says_they_have_no_images(iu_reports_tgz, tmp_path,
                                                                                        capsys):  # fmt: skip
    out = tmp_path / "iu.json"
    assert main(["iu-xray", "--out", str(out)]) == 0  # no --root: the torchxrayvision wheel's reports
    printed = capsys.readouterr().out
    assert f"IU X-ray reports from the torchxrayvision 1.5.7 wheel: {iu_reports_tgz}" in printed
    assert "no --images: one entry per report, without images" in printed
    entries = [e for v in json.loads(out.read_text()).values() for e in v]
    assert len(entries) == 3927 and not any("image" in e for e in entries)
    with pytest.raises(SystemExit):
        main(["siim", "--out", str(out)])  # the other datasets still need --root
    assert "siim needs --root" in capsys.readouterr().err


def test_split_and_fraction_are_seeded():
    splits = split_items((str(i) for i in range(100)), seed=0)
    assert sum(s == "training" for s in splits.values()) == 70
    assert split_items((str(i) for i in range(100)), seed=0) == splits
    datalist = {"training": list(range(100)), "validation": [1], "test": [2]}
    tenth = subsample_training(datalist, 0.1, seed=3)
    assert len(tenth["training"]) == 10 and tenth["validation"] == [1]
    assert subsample_training(datalist, 0.1, seed=3) == tenth
    assert len(subsample_training(datalist, 0.001, seed=3)["training"]) == 1
    with pytest.raises(ValueError, match="fraction"):
        subsample_training(datalist, 0.0, seed=0)


def test_collate_pads_text():
    batch = [
        {"image": torch.zeros(1, 2, 2), "input_ids": torch.tensor([2, 7, 3]), "attention_mask": torch.ones(3, dtype=torch.long),
         "sentence_index": torch.tensor([-1, 0, -1]), "report": ["a."], "findings": []},
        {"image": torch.ones(1, 2, 2), "input_ids": torch.tensor([2, 7, 8, 9, 3]), "attention_mask": torch.ones(5, dtype=torch.long),
         "sentence_index": torch.tensor([-1, 0, 1, 1, -1]), "report": ["b.", "c."], "findings": ["nodule"]},
    ]  # fmt: skip
    out = collate_reports(batch)
    assert out["image"].shape == (2, 1, 2, 2)
    assert out["input_ids"].tolist() == [[2, 7, 3, 0, 0], [2, 7, 8, 9, 3]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["sentence_index"].tolist() == [[-1, 0, -1, -1, -1], [-1, 0, 1, 1, -1]]
    assert out["report"] == [["a."], ["b.", "c."]]
    assert out["findings"] == [[], ["nodule"]]
    assert collate_reports(batch, pad_values={"input_ids": 5})["input_ids"][0, -1] == 5
    for sample, words in zip(batch, ([0, 1, -1], [0, 1, 2, 2, -1])):
        sample["word_index"] = torch.tensor(words)
    assert collate_reports(batch)["word_index"].tolist() == [[0, 1, -1, -1, -1], [0, 1, 2, 2, -1]]
    with pytest.raises(ValueError, match="empty batch"):
        collate_reports([])


def test_datalist_json_round_trip(tmp_path, mimic_tree):
    out = tmp_path / "d.json"
    assert main(["mimic-cxr", "--root", str(mimic_tree), "--out", str(out), "--views", "PA,AP,LATERAL"]) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"training", "validation", "test"}
    assert sorted(e["dicom_id"] for e in data["training"]) == ["d1", "d2"]


def test_bad_samples_are_skipped_counted_and_limited(tmp_path, iu_tokenizer):
    from monai_elvis.data import BadSampleLimitError, SkippingCacheDataset

    good = tmp_path / "good.png"
    Image.fromarray(np.full((16, 16), 100, np.uint8)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:40])
    items = [{"image": str(good), "report": "Lungs are clear."}, {"image": str(cut), "report": "Heart normal."},
             {"image": str(good), "report": "   "}, {"image": str(good), "report": "No effusion."}]  # fmt: skip
    pipeline = Compose([LoadCXRd("image"), SplitSentencesd(), TokenizeReportd(tokenizer=iu_tokenizer)])
    ds = SkippingCacheDataset(items, pipeline, max_skips=2)
    batch = collate_reports([ds[i] for i in range(4)])
    assert batch["image"].shape[0] == 2 and ds.skipped == 2
    assert ds[0] is not None and ds.skipped == 2  # cached good samples are not re-counted
    strict = SkippingCacheDataset(items, pipeline, max_skips=1)
    strict[1]
    with pytest.raises(BadSampleLimitError, match=r"2 bad samples, more than max_skips=1; the last, .*good.png: ReportError"):
        strict[2]
    with pytest.raises(ValueError, match="every sample of this batch was skipped"):
        collate_reports([None, None])


def test_datalist_split_paths_fraction_and_errors(tmp_path):
    from monai_elvis.data import datalist_split, list_images

    entries = [{"image": f"images/{i}.png", "label": ["-1"], "id": i} for i in range(20)]
    (tmp_path / "d.json").write_text(json.dumps({"training": entries, "validation": entries[:2]}))
    out = datalist_split(tmp_path / "d.json", "training", fraction=0.25, seed=3)
    assert len(out) == 5 and out[0]["image"] == str(tmp_path / "images" / f"{out[0]['id']}.png")
    assert out[0]["label"] == ["-1"]  # not a path key: left alone
    ids = [e["id"] for e in out]
    assert ids == sorted(ids) and ids == [e["id"] for e in datalist_split(tmp_path / "d.json", "training", fraction=0.25, seed=3)]
    assert ids != [e["id"] for e in datalist_split(tmp_path / "d.json", "training", fraction=0.25, seed=4)]
    assert len(datalist_split({"test": entries}, "test", "/data")) == 20
    with pytest.raises(KeyError, match="d.json has no 'test' split; it has \\['training', 'validation'\\]"):
        datalist_split(tmp_path / "d.json", "test")
    with pytest.raises(ValueError, match="entry 0 of 'training' has no 'mask'"):
        datalist_split(tmp_path / "d.json", "training", path_keys=["mask"])
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("b.png", "sub/a.dcm", "notes.txt"):
        (tmp_path / "in" / name).write_bytes(b"x")
    assert [Path(e["image"]).name for e in list_images(tmp_path / "in")] == ["b.png", "a.dcm"]
    with pytest.raises(FileNotFoundError, match="no .png"):
        list_images(tmp_path / "in" / "sub", suffixes=(".png",))
