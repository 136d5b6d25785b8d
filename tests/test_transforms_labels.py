"""Label conversion on the real SIIM-ACR and RSNA label files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose, Resized

from monai_elvis.data.builders import read_csv_rows
from monai_elvis.transforms import BoxesToMask, BoxesToMaskd, LoadCXRd, MaskToBoxes, MaskToBoxesd, RLEToMask, RLEToMaskd


def test_rle_hand_computed():
    # column-major pixels of a 4x4 image: run 1 covers pixels 1-2 (column 0, rows 1-2), run 2 pixel 6 (column 1,
    # row 2); the mask is [1, x, y]
    m = RLEToMask(4, 4)("1 2 3 1")
    assert m.shape == (1, 4, 4) and m.dtype == np.uint8
    assert np.argwhere(m[0]).tolist() == [[0, 1], [0, 2], [1, 2]]
    wide = RLEToMask(height=2, width=3)("3 2")  # 3 columns, 2 rows: pixels 3-4 are column 1 row 1, column 2 row 0
    assert wide.shape == (1, 3, 2) and np.argwhere(wide[0]).tolist() == [[1, 1], [2, 0]]
    assert RLEToMask(4, 4)(["1 2", "6 1"]).sum() == 3  # two rows of one image are merged
    assert RLEToMask(4, 4)(" -1").sum() == 0


def test_siim_rle_file_first_200_images(txv_file):
    rows = read_csv_rows(txv_file("siim-pneumothorax-train-rle.csv.gz"), ["ImageId", "EncodedPixels"])
    first: dict[str, list[str]] = {}
    for row in rows:
        if row["ImageId"] not in first and len(first) == 200:
            continue
        first.setdefault(row["ImageId"], []).append(row["EncodedPixels"])
    decode = RLEToMask(1024, 1024)
    n_empty = n_positive = 0
    for image_id, encs in first.items():
        for enc in encs:
            mask = decode(enc, source=image_id)
            assert mask.shape == (1, 1024, 1024)
            if enc == "-1":
                assert mask.sum() == 0
                n_empty += 1
            else:
                assert mask.sum() == sum(int(v) for v in enc.split()[1::2]), image_id
                n_positive += 1
    assert n_empty > 50 and n_positive > 20
    merged = RLEToMaskd()({"image": "x", "label": next(e for e in first.values() if len(e) > 1)})["label"]
    assert merged.shape == (1, 1024, 1024) and merged.sum() > 0


def test_rle_errors_name_the_image():
    with pytest.raises(ValueError, match="of 1.2.3 runs to pixel 20, past a 4x4 image"):
        RLEToMask(4, 4)("10 10", source="1.2.3")
    with pytest.raises(ValueError, match="of 1.2.3 must be pairs"):
        RLEToMask(4, 4)("1 2 3", source="1.2.3")
    with pytest.raises(ValueError, match=r"of img7 is not a list of integers"):
        RLEToMaskd(height=4, width=4)({"image": "img7", "label": "1 x"})


def test_rsna_boxes_and_masks(txv_file):
    rows = read_csv_rows(txv_file("kaggle_stage_2_train_labels.csv.zip"), ["patientId", "x", "y", "width", "height", "Target"])
    per_patient: dict[str, list] = {}
    for r in rows:
        per_patient.setdefault(r["patientId"], [])
        if r["Target"] == "1":
            per_patient[r["patientId"]].append([float(r[c]) for c in ("x", "y", "width", "height")])
    assert len(per_patient) == 26684
    assert per_patient["00436515-870c-4b36-a041-de91049b9ab4"] == [[264, 152, 213, 379], [562, 152, 256, 453]]
    checked = 0
    for boxes in list(per_patient.values())[:400]:
        mask = BoxesToMask((1024, 1024))(boxes)
        if not boxes:
            assert mask.sum() == 0
            continue
        if len(boxes) == 1:
            x, y, w, h = boxes[0]
            assert mask.sum() == min(w, 1024 - x) * min(h, 1024 - y)
        elif len(boxes) == 2:
            (x1, y1, w1, h1), (x2, y2, w2, h2) = boxes
            ix = max(0, min(x1 + w1, x2 + w2) - max(x1, x2))
            iy = max(0, min(y1 + h1, y2 + h2) - max(y1, y2))
            assert mask.sum() == w1 * h1 + w2 * h2 - ix * iy
        checked += 1
    assert checked > 50


def test_boxes_mask_round_trip_and_following_a_resize(tmp_path, write_dicom):
    boxes = [[10, 20, 30, 40], [60, 5, 20, 10]]
    mask = BoxesToMask((120, 100))(boxes)  # 120 wide, 100 high: [1, x, y]
    assert mask.shape == (1, 120, 100) and mask[0, 10:40, 20:60].all() and mask.sum() == 30 * 40 + 20 * 10
    assert MaskToBoxes()(mask).tolist() == [[60, 5, 20, 10], [10, 20, 30, 40]]  # ordered by (y, x)
    assert MaskToBoxesd()({"label": torch.from_numpy(mask)})["boxes"].shape == (2, 4)
    path = write_dicom(tmp_path / "img.dcm", np.zeros((100, 120), dtype=np.uint16))  # 100 rows, 120 columns
    pipeline = Compose([LoadCXRd("image"), BoxesToMaskd(), Resized(["image", "label"], (60, 50), mode=["area", "nearest"])])
    out = pipeline({"image": str(path), "boxes": boxes})
    assert out["label"].shape == (1, 60, 50)
    assert MaskToBoxes()(out["label"]).tolist() == [[30, 3, 10, 5], [5, 10, 15, 20]]
    # boxes given in original pixels also land right when painted on an already resized image
    late = Compose([LoadCXRd("image"), Resized("image", (60, 50)), BoxesToMaskd()])({"image": str(path), "boxes": boxes})
    assert torch.equal(torch.as_tensor(late["label"]), torch.as_tensor(out["label"]))
    with pytest.raises(ValueError, match="negative width"):
        BoxesToMask((10, 10))([[1, 1, -2, 3]])


def test_load_label_map_keeps_values_and_orientation(tmp_path):
    from PIL import Image

    from monai_elvis.transforms import LoadLabelMap, LoadLabelMapd

    labels = np.zeros((5, 7), np.uint8)
    labels[0, 6] = 3  # top right
    labels[4, 0] = 6  # bottom left
    Image.fromarray(labels).save(tmp_path / "l.png")
    out = LoadLabelMapd("label", num_classes=7)({"label": str(tmp_path / "l.png")})["label"]
    assert out.shape == (1, 7, 5) and out.dtype == torch.int64  # (x, y), as LoadCXR and MONAI's LoadImage
    assert out[0, 6, 0] == 3 and out[0, 0, 4] == 6 and int(out.sum()) == 9
    assert out.meta["original_size"] == (7, 5)
    with pytest.raises(ValueError, match="l.png holds class 6, but there are only 4 classes"):
        LoadLabelMap(num_classes=4)(tmp_path / "l.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="rgb.png"):
        LoadLabelMap()(tmp_path / "rgb.png")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        LoadLabelMap()(tmp_path / "nope.png")


def test_rle_mask_takes_the_reference_image_size(tmp_path, write_dicom):
    path = write_dicom(tmp_path / "x.dcm", np.arange(12 * 10, dtype=np.uint16).reshape(12, 10))
    d = LoadCXRd("image")({"image": str(path), "label": ["3 4", "-1"]})
    out = RLEToMaskd("label", ref_key="image")(d)["label"]
    assert out.shape == (1, 10, 12)  # 10 columns (x), 12 rows (y)
    # column-major pixels 3..6: column 0, rows 3 to 6
    expected = np.zeros((10, 12), np.uint8)
    expected[0, 3:7] = 1
    assert np.array_equal(out[0].numpy(), expected)
    assert torch.equal(out.affine, d["image"].affine)
    with pytest.raises(ValueError, match="x.dcm"):
        RLEToMaskd("label", ref_key="image")({**d, "label": "200 5"})  # runs past a 12x10 image


def test_box_on_the_patients_left_lands_where_loadimage_puts_it(tmp_path):
    """A box on the image's right (the patient's left on a PA film) of a 256 x 192 PNG: BoxesToMaskd's mask is
    where MONAI's LoadImage puts the box's bright pixels, and MaskToBoxes gives the box back."""
    from monai.transforms import LoadImage
    from PIL import Image

    pixels = np.zeros((192, 256), np.uint8)
    box = [180, 40, 50, 30]  # x, y, w, h in pixels as viewed
    pixels[40:70, 180:230] = 255
    Image.fromarray(pixels).save(tmp_path / "pa.png")
    d = BoxesToMaskd("boxes", ref_key="image", mask_key="label")(LoadCXRd("image")({"image": str(tmp_path / "pa.png"), "boxes": [box]}))
    theirs = LoadImage(image_only=True, ensure_channel_first=True)(tmp_path / "pa.png")
    assert d["label"].shape == theirs.shape == (1, 256, 192)
    assert np.array_equal(np.asarray(d["label"][0]) > 0, np.asarray(theirs[0]) > 0)
    assert np.array_equal(np.asarray(d["label"][0]) > 0, np.asarray(d["image"][0]) > 0)
    assert d["label"][0, 128:].sum() == 50 * 30  # all in the right half of the first axis (x)
    assert MaskToBoxes()(d["label"]).tolist() == [box]
