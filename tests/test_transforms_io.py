"""LoadCXR on a real DICOM radiograph and on DICOM/PNG files written by the tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from monai_elvis.transforms import CXRLoadError, LoadCXR, LoadCXRd


def test_real_dicom_rg1_uncr(rg1_dicom):
    img = LoadCXR()(rg1_dicom)
    assert img.shape == (1, 1841, 1955) and img.dtype == torch.float32  # (x, y): 1841 columns, 1955 rows
    assert float(img.min()) == 0.0 and float(img.max()) == 1.0
    assert img.meta["view_position"] == "PA"
    assert img.meta["photometric_interpretation"] == "MONOCHROME1"
    assert np.isnan(img.meta["spacing"]).all()  # the file's PixelSpacing is 0\0: unknown, not zero
    assert img.meta["original_size"] == (1841, 1955)
    a = img[0].numpy().T  # as viewed: rows, columns
    h, w = a.shape
    rows = slice(int(0.3 * h), int(0.6 * h))
    spine = a[rows, int(0.47 * w) : int(0.53 * w)].mean()
    lungs = (a[rows, int(0.2 * w) : int(0.35 * w)].mean() + a[rows, int(0.65 * w) : int(0.8 * w)].mean()) / 2
    assert spine > lungs + 0.1  # bone bright (MONOCHROME1 inverted)
    heart_rows = slice(int(0.55 * h), int(0.72 * h))
    image_right = a[heart_rows, int(0.56 * w) : int(0.7 * w)].mean()
    image_left = a[heart_rows, int(0.3 * w) : int(0.44 * w)].mean()
    assert image_right > image_left + 0.02  # the heart's density lies on the image's right


def test_dicom_window_modality_lut_and_photometric(tmp_path, write_dicom):
    pixels = np.array([[0, 100, 150], [200, 300, 125]], dtype=np.uint16)
    tags = dict(WindowCenter=150, WindowWidth=101, RescaleSlope=1, RescaleIntercept=0, ViewPosition="AP",
                PixelSpacing=[0.2, 0.25])  # fmt: skip
    mono2 = LoadCXR()(write_dicom(tmp_path / "m2.dcm", pixels, **tags))
    # DICOM linear window, c=150, w=101: y = (x - 149.5) / 100 + 0.5 inside [99.5, 199.5], clipped outside
    expected = np.clip((pixels - 149.5) / 100 + 0.5, 0, 1).T  # (x, y)
    assert np.allclose(mono2[0].numpy(), expected, atol=1e-6)
    # PixelSpacing is (row spacing, column spacing) = (y, x): reversed into the array's (x, y)
    assert mono2.meta["view_position"] == "AP" and mono2.meta["spacing"] == (0.25, 0.2)
    mono1 = LoadCXR()(write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1", **tags))
    assert np.allclose(mono1[0].numpy(), 1 - expected, atol=1e-6)
    raw = LoadCXR(voi_lut=False)(write_dicom(tmp_path / "raw.dcm", pixels, RescaleSlope=2, RescaleIntercept=-100))
    assert np.allclose(raw[0].numpy(), pixels.T / 300.0, atol=1e-6)  # the modality LUT is linear: min-max unchanged


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_dicom_bit_depths(tmp_path, write_dicom, bits):
    top = 2**bits - 1
    pixels = np.array([[0, top // 2], [top, top // 4]], dtype=np.uint8 if bits == 8 else np.uint16)
    img = LoadCXR()(write_dicom(tmp_path / "x.dcm", pixels, bits=bits))
    assert np.allclose(img[0].numpy(), pixels.T / top, atol=1e-6)


def test_png_8_and_16_bit_and_rgb(tmp_path):
    g8 = np.array([[0, 51], [255, 102]], dtype=np.uint8)
    Image.fromarray(g8).save(tmp_path / "g8.png")
    g16 = np.array([[0, 65535], [13107, 0]], dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 255, 255)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(g8).save(tmp_path / "g8.jpg", quality=100)
    assert np.allclose(LoadCXR()(tmp_path / "g8.png")[0].numpy(), g8.T / 255)
    assert np.allclose(LoadCXR()(tmp_path / "g16.png")[0].numpy(), g16.T / 65535)
    c = LoadCXR()(tmp_path / "rgb.png")  # 3 columns, 2 rows
    assert c.shape == (1, 3, 2) and c[0, 0, 0] == 1.0 and c[0, 2, 1] == 0.0
    assert np.allclose(LoadCXR()(tmp_path / "g8.jpg")[0].numpy(), g8.T / 255, atol=0.03)


def test_axis_order_is_monai_loadimage_order(tmp_path, write_dicom):
    """A 256 wide x 192 high image loads as [1, 256, 192], value for value what MONAI's LoadImage gives (PNG through
    PILReader, DICOM through PydicomReader), and a bright spot at column 200, row 30 is at [0, 200, 30]."""
    from monai.transforms import LoadImage

    pixels = np.zeros((192, 256), np.uint8)  # as stored: rows, columns
    pixels[30, 200] = 255  # top right as viewed: the patient's left on a PA film
    pixels[150:160, 10:40] = 128
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    ours = LoadCXR()(tmp_path / "wide.png")
    theirs = LoadImage(image_only=True, ensure_channel_first=True, reader="PILReader")(tmp_path / "wide.png")
    assert ours.shape == tuple(theirs.shape) == (1, 256, 192)
    assert ours.meta["original_size"] == (256, 192) == tuple(int(v) for v in theirs.meta["spatial_shape"])
    assert np.array_equal(ours[0].numpy() * 255, np.asarray(theirs[0], dtype=np.float32))
    assert ours[0, 200, 30] == 1.0 and np.isclose(float(ours[0, 10:40, 150:160].mean()), 128 / 255)
    dcm = LoadCXR()(write_dicom(tmp_path / "wide.dcm", pixels.astype(np.uint16) * 4))
    theirs = LoadImage(image_only=True, ensure_channel_first=True, reader="PydicomReader")(tmp_path / "wide.dcm")
    assert dcm.shape == tuple(theirs.shape) == (1, 256, 192)
    theirs = np.asarray(theirs[0], dtype=np.float32)
    assert np.allclose(dcm[0].numpy(), (theirs - theirs.min()) / (theirs.max() - theirs.min()))


def test_load_dict_form_and_errors(tmp_path, write_dicom, rg1_dicom):
    path = write_dicom(tmp_path / "a.dcm", np.arange(16, dtype=np.uint16).reshape(4, 4))
    d = LoadCXRd("image")({"image": str(path), "report": "x"})
    assert d["image"].shape == (1, 4, 4) and d["report"] == "x"
    assert np.allclose(d["image"][0].numpy(), np.arange(16).reshape(4, 4).T / 15)
    assert d["image"].meta["filename_or_obj"] == str(path)
    with pytest.raises(FileNotFoundError, match="missing.dcm"):
        LoadCXR()(tmp_path / "missing.dcm")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(rg1_dicom.read_bytes()[:100_000])
    with pytest.raises(CXRLoadError, match="truncated.dcm"):
        LoadCXR()(truncated)
    png = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(png)
    cut = tmp_path / "cut.png"
    cut.write_bytes(png.read_bytes()[:200])
    with pytest.raises(CXRLoadError, match="cut.png"):
        LoadCXR()(cut)
    garbage = tmp_path / "notes.txt.dcm"
    garbage.write_text("not a dicom")
    with pytest.raises(CXRLoadError, match="notes.txt.dcm"):
        LoadCXR()(garbage)
