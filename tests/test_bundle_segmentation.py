"""The segmentation bundle through MONAI's bundle runner: phantom, SIIM-ACR and RSNA formats, inference and export."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle import run as bundle_run

from monai_elvis.errors import InputError, MissingInputError, find_usage_error
from monai_elvis.networks import CXRImageEncoder, ElvisUNet
from monai_elvis.transforms import LABEL_COLOURS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "elvis_cxr_segmentation" / "configs"
TRAIN, INFER = str(CONFIGS / "train.json"), str(CONFIGS / "inference.json")
META, LOGGING = str(CONFIGS / "metadata.json"), str(CONFIGS / "logging.conf")
TINY = dict(image_size=64, batch_size=4, num_workers=0, val_interval=1, cache_rate=0.0)


def _run(config_files, bundle_root, **overrides):
    files = [str(c) for c in (config_files if isinstance(config_files, (list, tuple)) else [config_files])]
    bundle_run(config_file=files, meta_file=META, logging_file=LOGGING, bundle_root=str(bundle_root),
               **{**TINY, **overrides})  # fmt: skip


def test_train_and_infer_workflow_properties(phantom, tmp_path):
    train = ConfigWorkflow(config_file=TRAIN, meta_file=META, workflow_type="train", bundle_root=str(tmp_path),
                           dataset_dir=str(phantom), **TINY)  # fmt: skip
    train.initialize()
    assert train.check_properties() == []
    infer = ConfigWorkflow(config_file=INFER, meta_file=META, workflow_type="infer", bundle_root=str(tmp_path),
                           input_dir=str(phantom / "images"))  # fmt: skip
    with pytest.raises(Exception) as info:
        infer.initialize()  # checked before anything is built
    assert isinstance(find_usage_error(info.value), MissingInputError)
    assert "no trained segmentation model at" in str(find_usage_error(info.value))
    (tmp_path / "models").mkdir(exist_ok=True)  # the train workflow made it
    torch.save(ElvisUNet(1, 7, "resnet18", 0.125, decoder_channels=(64, 32, 16, 16, 8)).state_dict(),
               tmp_path / "models" / "model.pt")  # fmt: skip
    infer = ConfigWorkflow(config_file=INFER, meta_file=META, workflow_type="infer", bundle_root=str(tmp_path),
                           input_dir=str(phantom / "images"))  # fmt: skip
    infer.initialize()
    assert infer.check_properties() == []
    # the labels MONAI Label shows come from metadata channel_def, and match the bundle's class names
    channel_def = json.loads(Path(META).read_text())["network_data_format"]["outputs"]["pred"]["channel_def"]
    names = ConfigParser.load_config_file(TRAIN)["class_names"]
    assert [channel_def[str(i)] for i in range(len(names))] == names
    assert ConfigParser.load_config_file(INFER)["class_names"] == names


def test_two_iterations_from_a_pretraining_checkpoint_with_a_frozen_encoder(phantom, pretrained_bundle, tmp_path):
    ckpt = pretrained_bundle / "models" / "model.pt"
    _run(TRAIN, tmp_path, dataset_dir=str(phantom), max_epochs=1, epoch_length=2, pretrained_ckpt=str(ckpt),
         freeze_encoder=True)  # fmt: skip
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    net = ElvisUNet(1, 7, "resnet18", 0.125, decoder_channels=(64, 32, 16, 16, 8))
    net.load_state_dict(state)  # a plain state dict of the network
    pretrained = torch.load(ckpt, map_location="cpu", weights_only=True)
    encoder = CXRImageEncoder("resnet18", 1, 0.125)
    encoder.load_state_dict_from(pretrained, "image_encoder.")
    # frozen: weights and batch-norm statistics are the pre-trained ones, bit for bit, after training
    for name, value in encoder.backbone.state_dict().items():
        assert torch.equal(net.encoder.state_dict()[name], value), name
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["metrics"]["val_mean_dice"] <= 1


def test_fine_tuning_changes_the_pretrained_encoder_and_evaluate_reports_per_class(phantom, pretrained_bundle, tmp_path):
    ckpt = pretrained_bundle / "models" / "model.pt"
    _run(TRAIN, tmp_path, dataset_dir=str(phantom), max_epochs=1, epoch_length=2, pretrained_ckpt=str(ckpt))
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    pretrained = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert not torch.equal(state["encoder.conv1.weight"], pretrained["image_encoder.backbone.conv1.weight"])
    _run([TRAIN, CONFIGS / "evaluate.json"], tmp_path, dataset_dir=str(phantom))
    test = json.loads((tmp_path / "eval" / "test_metrics.json").read_text())["metrics"]
    assert set(test["test_dice_per_class"]) == {"nodule", "opacity", "effusion", "pneumothorax", "cardiomegaly",
                                                "atelectasis"}  # fmt: skip
    assert 0 <= test["test_mean_dice"] <= 1
    with open(tmp_path / "eval" / "test_mean_dice_raw.csv") as f:
        rows = list(csv.DictReader(f))
    test_ids = {e["image"] for e in json.loads((phantom / "datalist.json").read_text())["test"]}
    assert {str(Path(r["filename"]).relative_to(phantom)) for r in rows} == test_ids


def test_inference_on_the_real_dicom_and_export_round_trip(phantom, tmp_path, rg1_dicom):
    _run(TRAIN, tmp_path, dataset_dir=str(phantom), max_epochs=1, epoch_length=1)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "RG1_UNCR.dcm").write_bytes(Path(rg1_dicom).read_bytes())
    (inputs / "phantom_00000.png").write_bytes((phantom / "images" / "phantom_00000.png").read_bytes())
    bundle_run(config_file=INFER, logging_file=LOGGING, bundle_root=str(tmp_path), input_dir=str(inputs),
               output_dir=str(tmp_path / "masks"), image_size=64)  # fmt: skip
    mask = np.asarray(Image.open(tmp_path / "masks" / "RG1_UNCR_mask.png"))
    assert mask.shape == (1955, 1841) and mask.dtype == np.uint8 and mask.max() < 7
    assert np.asarray(Image.open(tmp_path / "masks" / "phantom_00000_mask.png")).shape == (64, 64)
    # TorchScript export through MONAI's bundle CLI, then the same outputs as the eager model
    ts = tmp_path / "models" / "model.ts"
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file",
           str(tmp_path / "models" / "model.pt"), "--meta_file", META, "--config_file", INFER, "--bundle_root",
           str(tmp_path)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    scripted = torch.jit.load(str(ts), map_location="cpu")
    eager = ElvisUNet(1, 7, "resnet18", 0.125, decoder_channels=(64, 32, 16, 16, 8))
    eager.load_state_dict(torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True))
    eager.eval()
    x = torch.randn(2, 1, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x), atol=1e-4, rtol=1e-4)


def test_one_image_or_a_folder_with_progress_and_masks_a_viewer_shows(phantom, tmp_path, capfd):
    _run(TRAIN, tmp_path, dataset_dir=str(phantom), max_epochs=1, epoch_length=1)
    images = phantom / "images"
    # --image: that image only (it used to be ignored, and every image of the default folder segmented)
    bundle_run(config_file=INFER, logging_file=LOGGING, bundle_root=str(tmp_path), image=str(images / "phantom_00003.png"),
               output_dir=str(tmp_path / "one"), image_size=64)  # fmt: skip
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["phantom_00003_mask.png"]
    mask = Image.open(tmp_path / "one" / "phantom_00003_mask.png")
    # a palette PNG: the pixel values are the class numbers, the palette shows them in colour
    assert mask.mode == "P" and mask.size == (64, 64)
    assert np.asarray(mask).dtype == np.uint8 and np.asarray(mask).max() < 7
    rgb = np.asarray(mask.convert("RGB"))
    for k in np.unique(np.asarray(mask)):
        assert tuple(rgb[np.asarray(mask) == k][0]) == LABEL_COLOURS[k]
    assert len(set(LABEL_COLOURS)) == 7 and all(max(c) >= 200 for c in LABEL_COLOURS[1:])  # classes 1-6 visible
    # --input_dir: every image of the folder, with a progress bar
    folder = tmp_path / "studies"
    folder.mkdir()
    for i in (0, 1):
        (folder / f"phantom_{i:05d}.png").write_bytes((images / f"phantom_{i:05d}.png").read_bytes())
    capfd.readouterr()
    bundle_run(config_file=INFER, logging_file=LOGGING, bundle_root=str(tmp_path), input_dir=str(folder),
               output_dir=str(tmp_path / "many"), image_size=64)  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["phantom_00000_mask.png", "phantom_00001_mask.png"]
    progress = capfd.readouterr().err
    assert "segmenting" in progress and "2/2" in progress, progress
    # a file given as the folder says what to use instead
    with pytest.raises(Exception) as info:
        bundle_run(config_file=INFER, logging_file=LOGGING, bundle_root=str(tmp_path),
                   input_dir=str(folder / "phantom_00000.png"), output_dir=str(tmp_path / "x"), image_size=64)  # fmt: skip
    error = find_usage_error(info.value)
    assert isinstance(error, InputError), info.value
    assert str(error) == (f"--input_dir {folder / 'phantom_00000.png'} is a file: use --image "
                          f"{folder / 'phantom_00000.png'} for one image.")  # fmt: skip


def test_postprocessing_restores_the_input_geometry_and_orientation(tmp_path):
    """A prediction equal to the thresholded preprocessed image comes back, through Invertd and the PNG
    writer, as the thresholded original: same shape, rows and columns not swapped."""
    parser = ConfigParser()
    parser.read_config(INFER)
    parser.update({"bundle_root": str(tmp_path), "output_dir": str(tmp_path / "out"), "image_size": 64})
    (tmp_path / "out").mkdir()
    h, w = 90, 150  # not square: a transposition or a wrong un-padding would show
    image = np.zeros((h, w), np.uint8)
    image[10:40, 20:70] = 255  # upper left block
    image[60:85, 110:140] = 255  # lower right block
    Image.fromarray(image).save(tmp_path / "case.png")
    pre = parser.get_parsed_content("preprocessing")
    post = parser.get_parsed_content("postprocessing")
    d = pre({"image": str(tmp_path / "case.png")})
    fg = (d["image"] > 0.5).float()
    pred = torch.cat([1 - fg, fg]) * 10.0  # logits of 2 classes
    d["pred"] = d["image"].clone()
    d["pred"].set_array(pred)  # keeps the image's metadata, as the network output does
    out = post(d)
    # MONAI's (x, y) order, channel squeezed: [W, H], as MONAI Label's writer takes it
    assert tuple(out["pred"].shape) == (w, h) and out["pred"].dtype == torch.uint8
    saved = np.asarray(Image.open(tmp_path / "out" / "case_mask.png"))
    assert saved.shape == (h, w)  # the PNG as viewed, like the image
    agree = (saved == (image > 0)).mean()
    assert agree > 0.97, agree
    assert np.array_equal(saved, out["pred"].numpy().T)


def _siim_folder(root: Path, write_dicom) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        image_id = f"1.2.276.0.7230010.3.1.4.{i}"
        write_dicom(root / "dicom-images-train" / f"study{i}" / f"{image_id}.dcm",
                    rng.integers(0, 4096, (96, 80), dtype=np.uint16), bits=12)  # fmt: skip
        if i % 2:  # a pneumothorax run: pixels 100..149 in column-major order, as in the competition's file
            rows.append((image_id, "100 50"))
        else:
            rows.append((image_id, "-1"))
    with open(root / "train-rle.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", " EncodedPixels"])
        writer.writerows(rows)


def test_siim_overlay_end_to_end(tmp_path, write_dicom):
    data = tmp_path / "siim"
    _siim_folder(data, write_dicom)
    _run([TRAIN, ROOT / "configs" / "data" / "siim.json"], tmp_path / "bundle", dataset_dir=str(data),
         max_epochs=1, num_workers=0, cache_rate=0.0)  # fmt: skip
    assert (tmp_path / "bundle" / "models" / "model.pt").is_file()
    state = torch.load(tmp_path / "bundle" / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert state["head.0.weight"].shape[0] == 2  # background and pneumothorax
    assert json.loads((tmp_path / "bundle" / "eval" / "metrics.json").read_text())["epoch"] == 1


def test_rsna_overlay_end_to_end(tmp_path, write_dicom):
    data = tmp_path / "rsna"
    rng = np.random.default_rng(1)
    rows = []
    for i in range(8):
        pid = f"patient{i:02d}"
        write_dicom(data / "stage_2_train_images" / f"{pid}.dcm", rng.integers(0, 256, (80, 80), dtype=np.uint8))
        rows.append([pid, "10", "12", "30", "20", "1"] if i % 2 else [pid, "", "", "", "", "0"])
    with open(data / "stage_2_train_labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patientId", "x", "y", "width", "height", "Target"])
        writer.writerows(rows)
    _run([TRAIN, ROOT / "configs" / "data" / "rsna.json"], tmp_path / "bundle", dataset_dir=str(data),
         max_epochs=1, num_workers=0, cache_rate=0.0)  # fmt: skip
    assert (tmp_path / "bundle" / "models" / "model.pt").is_file()
    assert json.loads((tmp_path / "bundle" / "eval" / "metrics.json").read_text())["epoch"] == 1


def test_the_label_fraction_is_one_setting(phantom):
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"dataset_dir": str(phantom), "label_fraction": 0.25})
    data = parser.get_parsed_content("train#data")
    full = json.loads((phantom / "datalist.json").read_text())["training"]
    assert len(data) == round(0.25 * len(full))
    assert {str(Path(e["label"]).relative_to(phantom)) for e in data} <= {e["label"] for e in full}


def test_ddp_two_gloo_processes(phantom, tmp_path, run_torchrun):
    run_torchrun([TRAIN, CONFIGS / "multi_gpu_train.json"], META, LOGGING, 29518, bundle_root=tmp_path,
                 dataset_dir=phantom, max_epochs=1, epoch_length=2, **TINY)  # fmt: skip
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state)
    ElvisUNet(1, 7, "resnet18", 0.125, decoder_channels=(64, 32, 16, 16, 8)).load_state_dict(state)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["epoch"] == 1


def test_monai_label_training_path_has_no_side_effects_and_saves_model_pt(phantom, tmp_path, monkeypatch):
    """What the stock MONAI Label app's BundleTrainTask does, without the server: it runs ``train.json`` from the
    server's working directory with ``bundle_root``, ``train#dataset#data`` (the labelled images of its datastore),
    ``validate#dataset#data``, ``train#trainer#max_epochs``, ``device`` and ``train#handlers`` overridden.

    Nothing is written to the working directory (the bundle's own phantom is not rendered), the batch size follows
    the 2 images given (1 iteration per epoch, not 0), ``models/model.pt`` is saved at the end although no
    validation ran, and the resume files stay out of ``models/`` (which MONAI Label lists as selectable models)."""
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(ROOT / "bundles" / "elvis_cxr_segmentation", bundle, ignore=shutil.ignore_patterns("models", "eval"))
    server_cwd = tmp_path / "server"
    server_cwd.mkdir()
    monkeypatch.chdir(server_cwd)
    config = str(bundle / "configs" / "train.json")
    handlers = ConfigParser.load_config_file(config)["train"]["handlers"]

    def train_round(n_labelled: int) -> None:  # one training request, on the first n labelled images
        entries = json.loads((phantom / "datalist.json").read_text())["training"][:n_labelled]
        labelled = [{"image": str(phantom / e["image"]), "label": str(phantom / e["label"])} for e in entries]
        bundle_run(run_id="run", init_id=None, final_id=None, meta_file=str(bundle / "configs" / "metadata.json"),
                   config_file=config, bundle_root=str(bundle), **{"train#trainer#max_epochs": 2,
                   "train#dataset#data": labelled, "validate#dataset#data": [], "device": "cpu",
                   "train#handlers": handlers}, image_size=64, num_workers=0, cache_rate=0.0)  # fmt: skip

    train_round(2)
    assert list(server_cwd.iterdir()) == []  # no phantom, no logs, nothing
    assert not (bundle / "data").exists()
    assert sorted(p.name for p in (bundle / "models").iterdir()) == ["model.pt", "resume"]
    assert sorted(p.name for p in (bundle / "models" / "resume").iterdir()) == ["checkpoint_iteration=2.pt",
                                                                              "run_settings.json"]  # fmt: skip
    net = ElvisUNet(1, 7, "resnet18", 0.125, decoder_channels=(64, 32, 16, 16, 8))
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True))
    resumed = torch.load(bundle / "models" / "resume" / "checkpoint_iteration=2.pt", map_location="cpu",
                         weights_only=True)  # fmt: skip
    for name, value in resumed["model"].items():  # the final weights, those of the last checkpoint
        assert torch.equal(net.state_dict()[name], value), name

    # MONAI Label's next round, on 3 labelled images: a new run on them, not a "resume" of the finished round
    first_model = (bundle / "models" / "model.pt").read_bytes()
    train_round(3)
    settings = json.loads((bundle / "models" / "resume" / "run_settings.json").read_text())
    assert settings["data"]["training_items"]["items"] == 3
    second_model = (bundle / "models" / "model.pt").read_bytes()
    assert second_model != first_model  # trained on the 3 images
    again = torch.load(bundle / "models" / "resume" / "checkpoint_iteration=2.pt", map_location="cpu", weights_only=True)
    assert again["trainer"]["iteration"] == 2  # 2 epochs of 1 batch of 3, anew (not 4: the first round's 2 + 2)
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True))
    assert all(torch.equal(net.state_dict()[k], v) for k, v in again["model"].items())
    train_round(3)  # the same round again: the finished run is resumed, nothing is trained, the model stays
    assert (bundle / "models" / "model.pt").read_bytes() == second_model


def test_data_fingerprint_names_the_data_not_the_file():
    from monai_elvis.engines import data_fingerprint

    a = [{"image": "a.png", "label": "a_seg.png"}, {"image": "b.png", "label": "b_seg.png"}]
    fp = data_fingerprint(a)
    assert fp["items"] == 2 and len(fp["sha256"]) == 64
    assert data_fingerprint([dict(reversed(list(e.items()))) for e in a]) == fp  # key order is not data
    assert data_fingerprint(a[::-1]) != fp and data_fingerprint(a[:1])["items"] == 1  # order and items are
    assert data_fingerprint([]) == {"items": 0, "sha256": __import__("hashlib").sha256(b"[]").hexdigest()}


def test_only_recorded_changes_of_restart_settings_start_a_new_run(tmp_path):
    """``restart_on`` starts a new run when only the named settings changed, and refuses when the older run did
    not record them (a checkpoint of an earlier version is never deleted) or when anything else changed too."""
    from ignite.engine import Engine

    from monai_elvis.engines import ResumeSettingsError, attach_resume, data_fingerprint

    def attempt(stored: dict, current: dict) -> bool:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        (folder / "checkpoint_iteration=3.pt").write_bytes(b"")
        (folder / "run_settings.json").write_text(json.dumps(stored))
        net = torch.nn.Linear(1, 1)
        attach_resume(Engine(lambda e, b: None), folder, {"model": net}, settings=current,
                      restart_on=["data.training_items"])  # fmt: skip
        return not (folder / "checkpoint_iteration=3.pt").exists()  # cleared for a new run

    two, three = data_fingerprint([{"image": "a"}] * 2), data_fingerprint([{"image": "a"}] * 3)
    assert attempt({"data": {"training_items": two, "size": 64}}, {"data": {"training_items": three, "size": 64}})
    with pytest.raises(ResumeSettingsError, match="data.training_items: not set in the checkpoint's run"):
        attempt({"data": {"size": 64}}, {"data": {"training_items": three, "size": 64}})
    with pytest.raises(ResumeSettingsError, match="data.size: 64 in the checkpoint's run, 128 now"):
        attempt({"data": {"training_items": two, "size": 64}}, {"data": {"training_items": three, "size": 128}})
