"""The phrase-grounding bundle: inference (datalist, one image + phrase, the MONAI Label call) and MS-CXR-style
evaluation with a per-category table, on a checkpoint made by the pre-training bundle."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle import run as bundle_run

from monai_elvis.engines import GroundingReportHandler, phrase_slug
from monai_elvis.errors import InputError, find_usage_error

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "elvis_grounding" / "configs"
INFER, EVALUATE, LOGGING = str(CONFIGS / "inference.json"), str(CONFIGS / "evaluate.json"), str(CONFIGS / "logging.conf")
META = str(CONFIGS / "metadata.json")
TINY = dict(image_size=64)


@pytest.fixture(scope="module")
def grounding_root(tmp_path_factory, pretrained_bundle) -> Path:
    """A grounding bundle root whose models/ holds the pre-training bundle's model.pt and tokenizer/ (no
    text_model/: the text encoder's architecture is in the bundle's config)."""
    root = tmp_path_factory.mktemp("grounding")
    (root / "models").mkdir()
    shutil.copy(pretrained_bundle / "models" / "model.pt", root / "models" / "model.pt")
    shutil.copytree(pretrained_bundle / "models" / "tokenizer", root / "models" / "tokenizer")
    return root


def test_infer_workflow_properties(grounding_root, phantom):
    wf = ConfigWorkflow(config_file=INFER, meta_file=META, workflow_type="infer", bundle_root=str(grounding_root),
                        image=str(phantom / "images" / "phantom_00000.png"), phrase="left pleural effusion", **TINY)  # fmt: skip
    wf.initialize()
    assert wf.check_properties() == []


def test_datalist_inference_writes_maps_overlays_masks_and_boxes(grounding_root, phantom, tmp_path):
    phrases = [{"image": str(phantom / "images" / "phantom_00000.png"), "phrase": "right upper lobe consolidation"},
               {"image": str(phantom / "images" / "phantom_00001.png"), "phrase": "enlarged cardiac silhouette"}]  # fmt: skip
    (tmp_path / "phrases.json").write_text(json.dumps(phrases))
    out = tmp_path / "out"
    bundle_run(config_file=INFER, logging_file=LOGGING, bundle_root=str(grounding_root), output_dir=str(out),
               datalist_file=str(tmp_path / "phrases.json"), map_format="nifti", **TINY)  # fmt: skip
    records = json.loads((out / "groundings.json").read_text())
    assert [r["phrase"] for r in records] == [p["phrase"] for p in phrases]
    import nibabel as nib

    for r in records:
        heat = np.asanyarray(nib.load(r["heatmap"]).dataobj)  # NIfTI keeps the (x, y) array
        assert heat.shape == (64, 64) and heat.min() >= 0 and heat.max() <= 1 and heat.max() > 0.9
        mask = np.asarray(Image.open(r["mask"]))  # the PNG as viewed: rows, columns
        assert np.array_equal(mask > 0, heat.T >= 0.5)
        assert np.asarray(Image.open(r["overlay"])).shape == (64, 64, 3)
        x, y, w, h = r["box"]
        assert mask[int(y) : int(y + h), int(x) : int(x + w)].any() and heat[r["peak"][0], r["peak"][1]] == heat.max()
    with open(out / "groundings.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


def test_one_image_and_phrase_on_the_real_dicom(grounding_root, tmp_path, rg1_dicom):
    out = tmp_path / "out"
    bundle_run(config_file=INFER, logging_file=LOGGING, bundle_root=str(grounding_root), output_dir=str(out),
               image=str(rg1_dicom), phrase="right lower lobe opacity", **TINY)  # fmt: skip
    (record,) = json.loads((out / "groundings.json").read_text())
    assert Path(record["heatmap"]).name == "RG1_UNCR_right_lower_lobe_opacity_heatmap.png"
    heat = np.asarray(Image.open(record["heatmap"]))
    assert heat.shape == (1955, 1841) and heat.dtype == np.uint16 and heat.max() > 60000
    assert np.asarray(Image.open(record["overlay"])).shape == (1955, 1841, 3)


def test_a_phrase_without_an_image_is_refused(grounding_root):
    """Not the example phrases grounded in its place, with exit status 0."""
    with pytest.raises(Exception) as info:
        bundle_run(config_file=INFER, logging_file=LOGGING, bundle_root=str(grounding_root),
                   phrase="right lower lobe opacity", **TINY)  # fmt: skip
    error = find_usage_error(info.value)
    assert isinstance(error, InputError), info.value
    assert str(error).startswith("--phrase 'right lower lobe opacity' needs an image to ground it on: add --image")


def test_records_accumulate_over_runs_with_whole_word_names_and_normalised_paths(grounding_root, phantom, tmp_path):
    """The README's one-phrase-per-command use: every run's record stays in groundings.json / .csv."""
    out = tmp_path / "out"
    image = f"{phantom}/images/../images/phantom_00001.png"
    long_phrase = "moderate right pleural effusion with adjacent compressive atelectasis"
    for phrase in ("enlarged cardiac silhouette", long_phrase, "enlarged cardiac silhouette"):
        bundle_run(config_file=INFER, logging_file=LOGGING, bundle_root=str(grounding_root), output_dir=str(out),
                   image=image, phrase=phrase, **TINY)  # fmt: skip
    records = json.loads((out / "groundings.json").read_text())
    assert [r["phrase"] for r in records] == [long_phrase, "enlarged cardiac silhouette"]  # the rerun replaced its own
    with open(out / "groundings.csv") as f:
        assert [r["phrase"] for r in csv.DictReader(f)] == [long_phrase, "enlarged cardiac silhouette"]
    assert all(".." not in r["image"] and ".." not in r["heatmap"] for r in records)
    assert records[1]["image"] == str(phantom / "images" / "phantom_00001.png")
    name = Path(records[0]["heatmap"]).name
    assert name == f"phantom_00001_{phrase_slug(long_phrase)}_heatmap.png" and Path(records[0]["heatmap"]).is_file()
    *words, digest = phrase_slug(long_phrase).split("_")
    assert words == long_phrase.split()[: len(words)] and len(words) >= 5 and len(digest) == 6  # no word cut


def test_a_folder_of_images_with_one_phrase(grounding_root, phantom, tmp_path):
    folder = tmp_path / "studies"
    folder.mkdir()
    for i in (0, 1):
        shutil.copy(phantom / "images" / f"phantom_{i:05d}.png", folder)
    out = tmp_path / "out"
    bundle_run(config_file=INFER, logging_file=LOGGING, bundle_root=str(grounding_root), output_dir=str(out),
               input_dir=str(folder), phrase="left pleural effusion", **TINY)  # fmt: skip
    records = json.loads((out / "groundings.json").read_text())
    assert [Path(r["image"]).name for r in records] == ["phantom_00000.png", "phantom_00001.png"]
    assert {r["phrase"] for r in records} == {"left pleural effusion"}


def _bundle_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("MONAI_ELVIS_TRACEBACK", None)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", INFER, "--logging_file", LOGGING, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_the_command_line_says_what_to_do_in_a_few_lines(grounding_root, phantom, tmp_path):
    """Grounding before any model exists, and a misspelt --phrase: one paragraph at the end, no traceback."""
    image = str(phantom / "images" / "phantom_00000.png")
    no_model = _bundle_cli("--bundle_root", str(tmp_path / "empty"), "--image", image, "--phrase", "effusion",
                           cwd=tmp_path)  # fmt: skip
    assert no_model.returncode == 1 and "Traceback (most recent call last)" not in no_model.stderr, no_model.stderr
    message, hint = no_model.stderr[no_model.stderr.index("\nerror: ") :].strip().splitlines()  # the last 2 lines
    assert message.startswith(f"error: no pre-trained model at {tmp_path / 'empty' / 'models'} (model.pt and "
                              "tokenizer missing)")  # fmt: skip
    assert "run `python -m monai.bundle run --config_file bundles/elvis_pretrain/configs/train.json` first" in message
    assert hint == "(the full traceback: set MONAI_ELVIS_TRACEBACK=1)"
    typo = _bundle_cli("--bundle_root", str(grounding_root), "--image", image, "--phrse", "effusion", cwd=tmp_path)
    assert typo.returncode == 1 and "Traceback (most recent call last)" not in typo.stderr, typo.stderr
    message = typo.stderr[typo.stderr.index("\nerror: ") :].strip().splitlines()[0]
    assert message.startswith("error: --phrse: not a setting of")
    assert message.endswith("Did you mean --phrase? The settings are the top-level keys of those files.")


def test_monai_label_call_grounds_the_request_phrase(grounding_root, phantom):
    """MONAI Label's bundle infer task runs preprocessing, then ``inferer(image[None], network)`` with the image
    alone, then postprocessing: the phrase of the request reaches the network through the image's metadata."""
    parser = ConfigParser()
    parser.read_config(INFER)
    parser.update({"bundle_root": str(grounding_root), **TINY})
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(grounding_root / "models" / "model.pt", map_location="cpu", weights_only=True))
    net.eval()
    pre, inferer = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("inferer")
    post = parser.get_parsed_content("postprocessing")
    image = str(phantom / "images" / "phantom_00001.png")
    heats = {}
    for phrase in ("moderate right pleural effusion", "enlarged cardiac silhouette"):
        data = pre({"image": image, "phrase": phrase})  # the request: image id resolved to a path, plus params
        with torch.no_grad():
            pred = inferer(data["image"][None], net)[0]
            explicit = inferer(data["image"][None], net, **{k: data[k][None] for k in ("input_ids", "attention_mask",
                                                                                     "sentence_index")})[0]  # fmt: skip
        torch.testing.assert_close(pred, explicit)
        data["pred"] = pred
        out = post(data)
        assert tuple(out["pred"].shape) == (64, 64) and out["pred"].dtype == torch.uint8
        assert set(out["pred"].unique().tolist()) <= {0, 1}
        heats[phrase] = out["heatmap"]
    assert not torch.equal(*heats.values())  # the phrase matters
    data = pre({"image": image, "phrase": "x"})
    data["image"].meta.pop("input_ids")
    with pytest.raises(ValueError, match="no phrase tokens"):
        inferer(data["image"][None], net)


def test_evaluation_on_the_phantom_ms_cxr_csv(grounding_root, phantom, tmp_path):
    eval_dir = tmp_path / "eval"
    bundle_run(config_file=[INFER, EVALUATE], logging_file=LOGGING, bundle_root=str(grounding_root),
               dataset_dir=str(phantom), eval_dir=str(eval_dir), split="validation", write_groundings=True, **TINY)  # fmt: skip
    metrics = json.loads((eval_dir / "grounding_metrics.json").read_text())["metrics"]
    assert set(metrics) == {"grounding_cnr", "grounding_miou", "grounding_pointing"}
    table = json.loads((eval_dir / "grounding_by_category.json").read_text())
    with open(phantom / "ms_cxr.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "val"]
    phrases = {(r["dicom_id"], r["label_text"], r["category_name"]) for r in rows}
    assert [r["category"] for r in table][-1] == "all" and table[-1]["n"] == len(phrases)
    assert {r["category"] for r in table[:-1]} == {p[2] for p in phrases}
    assert sum(r["n"] for r in table[:-1]) == len(phrases)
    assert table[-1]["cnr"] == pytest.approx(metrics["grounding_cnr"], rel=1e-5)
    assert table[-1]["pointing"] == pytest.approx(metrics["grounding_pointing"], rel=1e-5)
    assert (eval_dir / "grounding_by_category.md").read_text().startswith("| category | n | cnr | miou | pointing | side |")
    assert len(json.loads((eval_dir / "groundings" / "groundings.json").read_text())) == len(phrases)


def test_report_handler_aggregates_per_category(tmp_path):
    handler = GroundingReportHandler(tmp_path, metrics=("pointing", "iou"))
    box = torch.zeros(1, 4, 4, dtype=torch.bool)
    box[0, :2, :2] = True
    hit, miss = torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)
    hit[0, 0, 0], miss[0, 3, 3] = 1.0, 1.0
    handler.update(hit, box, "Nodule")  # pointing 1, IoU of {(0,0)} with the box: 1/4
    handler.update(miss, box, "Nodule")  # pointing 0, IoU 0
    handler.update(hit, box, "Effusion")
    handler.update(hit, torch.zeros(1, 4, 4, dtype=torch.bool), "Effusion")  # no box: counted, not scored
    handler.completed()
    rows = {r["category"]: r for r in json.loads((tmp_path / "grounding_by_category.json").read_text())}
    assert rows["Nodule"]["n"] == 2 and rows["Nodule"]["pointing"] == 0.5 and rows["Nodule"]["iou"] == 0.125
    assert rows["Nodule"]["pointing_std"] == 0.5
    assert rows["Effusion"]["n"] == 2 and rows["Effusion"]["n_scored"] == 1 and rows["Effusion"]["pointing"] == 1.0
    assert rows["all"]["n"] == 4 and rows["all"]["pointing"] == pytest.approx(2 / 3)
    assert list(rows) == ["Effusion", "Nodule", "all"]
    md = (tmp_path / "grounding_by_category.md").read_text().splitlines()
    assert md[2] == "| Effusion | 2 | 1.000 ± 0.000 | 0.250 ± 0.000 |"
    items = json.loads((tmp_path / "grounding_items.json").read_text())  # every item, in order, unscored as None
    assert items == {"category": ["Nodule", "Nodule", "Effusion", "Effusion"],
                     "metrics": {"pointing": [1.0, 0.0, 1.0, None], "iou": [0.25, 0.0, 0.25, None]}}


def test_writer_files_line_up_with_a_non_square_radiograph(tmp_path):
    """GroundingWriter takes a heatmap in MONAI's (x, y) order ([1, W, H], as LoadCXR gives the image) and writes
    PNGs as viewed: a hot spot at the top right of a 256 wide x 192 high image is at the top right of the map,
    mask and overlay files, and the record's box and peak are (x, y) in that image's pixels."""
    from monai_elvis.engines import GroundingWriter
    from monai_elvis.transforms import LoadCXR

    pixels = np.zeros((192, 256), np.uint8)
    pixels[20:50, 180:240] = 200
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image = LoadCXR()(tmp_path / "wide.png")
    heat = image.clone()
    heat.set_array(torch.zeros(1, 256, 192))
    heat[0, 180:240, 20:50] = 0.8
    heat[0, 200, 30] = 1.0
    record = GroundingWriter(tmp_path / "out").write(heat, "left upper lobe nodule")
    mask = np.asarray(Image.open(record["mask"])) > 0
    assert mask.shape == (192, 256) and np.array_equal(mask, pixels > 0)
    assert np.asarray(Image.open(record["heatmap"])).shape == (192, 256)
    overlay = np.asarray(Image.open(record["overlay"]))
    assert overlay.shape == (192, 256, 3) and overlay[30, 200, 0] > overlay[150, 50, 0]
    assert record["box"] == [180.0, 20.0, 60.0, 30.0] and record["peak"] == [200, 30]


def test_network_instantiates_without_a_trained_model_and_a_request_needs_a_phrase(tmp_path, phantom):
    """network_def is built from the bundle's own architecture record (no models/ folder at all: MONAI Label
    instantiates it when it loads the bundle), the phrase is a displayable config (what MONAI Label lists in /info
    and fills in for a request that has none) and a request without one is refused before anything is loaded."""
    from monai_elvis.errors import InputError, RequestInputError
    from monai_elvis.networks import ElvisNet

    parser = ConfigParser()
    parser.read_config(INFER)
    parser.update({"bundle_root": str(tmp_path / "empty")})
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, ElvisNet) and net.text_encoder.hidden_size == 64
    assert net.text_encoder.model.config.vocab_size == parser.get_parsed_content("vocab_size") == 4096
    assert not (tmp_path / "empty").exists()
    assert parser.get_parsed_content("displayable_configs") == {"phrase": ""}
    first = parser.get_parsed_content("preprocessing#transforms#0")  # (the tokenizer of a trained model is not here)
    image = str(phantom / "images" / "phantom_00000.png")
    for phrase in ("", "   ", None):
        with pytest.raises(RequestInputError, match=r"grounding needs a 'phrase' parameter: .* \(got .* for image "
                                                    r".*phantom_00000.png\)") as info:  # fmt: skip
            first({"image": image, "phrase": phrase})
        assert isinstance(info.value, InputError) and info.value.status_code == 400
    assert first({"image": image, "phrase": " left effusion "})["phrase"] == "left effusion"
