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
