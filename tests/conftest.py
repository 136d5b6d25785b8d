"""Shared fixtures: real public files fetched into a cache at test time (never committed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from monai_elvis.data.sources import TORCHXRAYVISION, fetch_wheel_member

TXV_DATA = "torchxrayvision/data/"


@pytest.fixture(scope="session")
def txv_file():
    """``txv_file(name)``: a data file of the torchxrayvision 1.5.7 wheel (downloaded once, sha256-checked)."""

    def get(name: str) -> Path:
        return fetch_wheel_member(TORCHXRAYVISION, TXV_DATA + name)

    return get


@pytest.fixture(scope="session")
def iu_reports_tgz(txv_file) -> Path:
    return txv_file("NLMCXR_reports.tgz")


@pytest.fixture(scope="session")
def rg1_dicom() -> Path:
    """``RG1_UNCR.dcm`` (CR, PA, MONOCHROME1) from the pydicom-data package."""
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("RG1_UNCR.dcm"))


@pytest.fixture(scope="session")
def iu_tokenizer(tmp_path_factory, iu_reports_tgz):
    """A small WordPiece tokenizer trained on the IU X-ray reports, saved to a folder."""
    from monai_elvis.data.builders import build_iu_xray
    from monai_elvis.transforms import train_wordpiece_tokenizer

    datalist, _ = build_iu_xray(iu_reports_tgz)
    texts = [e["report"] for e in datalist["training"]]
    out = tmp_path_factory.mktemp("tokenizer")
    train_wordpiece_tokenizer(texts, out, vocab_size=2000)
    return out


def _write_dicom(path, pixels, photometric: str = "MONOCHROME2", bits: int | None = None, **tags) -> Path:
    """Write a single-frame CR DICOM with pydicom (uncompressed, explicit VR little endian)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.asarray(pixels)
    bits_allocated = 8 if pixels.dtype == np.uint8 else 16
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint8 if bits_allocated == 8 else np.uint16).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="session")
def write_dicom():
    """``write_dicom(path, pixels, photometric="MONOCHROME2", bits=None, **tags)`` -> path."""
    return _write_dicom


# the bundles' own architecture (vocabulary size included): the grounding bundle served by MONAI Label, which takes
# no overrides, builds its network from its config and must find a model of that architecture
PRETRAIN_TINY = dict(phantom_num=40, phantom_size=64, image_size=64, batch_size=8, num_workers=0, val_interval=1)
BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


@pytest.fixture(scope="session")
def phantom(tmp_path_factory) -> Path:
    """A 40-study phantom at 64 px (training / validation / test splits)."""
    from monai_elvis.data.phantom import prepare_phantom

    out = tmp_path_factory.mktemp("phantom")
    prepare_phantom(out, num=PRETRAIN_TINY["phantom_num"], size=PRETRAIN_TINY["phantom_size"], workers=1)
    return out


@pytest.fixture(scope="session")
def pretrained_bundle(tmp_path_factory, phantom) -> Path:
    """The root of a pre-training bundle run (tiny model, 2 iterations) on :func:`phantom`: ``models/model.pt``,
    ``models/text_model``, ``models/tokenizer``."""
    from monai.bundle import run

    root = tmp_path_factory.mktemp("pretrain")
    configs = BUNDLES / "elvis_pretrain" / "configs"
    run(config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"), bundle_root=str(root), dataset_dir=str(phantom),
        **{**PRETRAIN_TINY, "max_epochs": 1, "epoch_length": 2, "validate_grounding": False})  # fmt: skip
    return root


@pytest.fixture(scope="session")
def run_torchrun():
    """``run_torchrun(config_files, meta, logging, port, **overrides)``: ``monai.bundle run`` under
    ``torch.distributed.run`` with 2 CPU processes (gloo); asserts it succeeded."""
    import os
    import subprocess
    import sys

    def run(config_files, meta, logging, port: int, **overrides) -> None:
        files = "[" + ",".join(f"'{c}'" for c in config_files) + "]"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m",
               "monai.bundle", "run", "--config_file", files, "--meta_file", str(meta), "--logging_file", str(logging)]  # fmt: skip
        cmd += [x for k, v in overrides.items() for x in (f"--{k}", str(v))]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=BUNDLES.parent)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    return run
