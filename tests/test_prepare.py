"""The prepare step (python -m monai_elvis.data prepare) and the disk cache of SkippingCacheDataset."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from monai_elvis.data.__main__ import main as data_main
from monai_elvis.data.prepare import PREPARE_FILE, prepare_datalist, prepared_datalist, resized_shape
from monai_elvis.errors import InputError, MissingInputError
from monai_elvis.transforms import LoadCXR

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shape,size,side,expected", [
    ((1955, 1841), 512, "longest", (512, 482)),
    ((1841, 1955), 512, "longest", (482, 512)),
    ((3000, 2500), 512, "shortest", (614, 512)),
    ((300, 200), 512, "longest", (300, 200)),  # never enlarged
    ((600, 600), 512, "longest", (512, 512)),
])  # fmt: skip
def test_resized_shape(shape, size, side, expected):
    assert resized_shape(shape, size, side) == expected


def _tree(root: Path, write_dicom) -> dict:
    """Sources of every kind under ``root/src`` and a datalist over them (written to ``root/src/datalist.json``)."""
    src = root / "src"
    (src / "png").mkdir(parents=True)
    (src / "jpg").mkdir()
    # 8-bit gradient along the columns, 64 x 128: shrunk by exactly 2, column j becomes mean(4j, 4j + 2) = 4j + 1
    gradient = np.tile((2 * np.arange(128)).astype(np.uint8), (64, 1))
    Image.fromarray(gradient).save(src / "png" / "gradient.png")
    # asymmetric: a bright block in the top-left corner of a dark 90 x 120 image
    corner = np.full((90, 120), 30, np.uint8)
    corner[:30, :40] = 230
    Image.fromarray(corner).save(src / "jpg" / "corner.jpg", quality=95)
    # MONOCHROME1: the stored values are inverted on display; the corner block stores the highest value (black)
    mono1 = np.zeros((100, 80), np.uint16)
    mono1[:20, :20] = 1000
    write_dicom(src / "dcm" / "mono1.dcm", mono1, photometric="MONOCHROME1", bits=12)
    # MONOCHROME2 with a VOI window that clips: 0..1580 in 40 per column; window [500, 1500] -> 0 .. 1 (16-bit)
    ramp = np.tile((20 * np.arange(80)).astype(np.uint16), (100, 1))
    write_dicom(src / "dcm" / "window.dcm", ramp, bits=12, WindowCenter=1000.5, WindowWidth=1001)
    data = (src / "jpg" / "corner.jpg").read_bytes()
    (src / "jpg" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    entries = [
        {"image": "png/gradient.png", "report": "gradient", "id": 1},
        {"image": "jpg/corner.jpg", "report": "corner", "id": 2},
        {"image": "jpg/corner.jpg", "report": "the same image again", "id": 3},
        {"image": "dcm/mono1.dcm", "report": "monochrome one", "id": 4},
        {"image": "dcm/window.dcm", "report": "window", "id": 5},
        {"image": "jpg/truncated.jpg", "report": "truncated", "id": 6},
        {"image": "png/missing.png", "report": "missing", "id": 7},
    ]  # fmt: skip
    datalist = {"training": entries[:5] + entries[6:], "validation": [entries[5]]}
    (src / "datalist.json").write_text(json.dumps(datalist))
    return datalist


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_prepare_writes_sizes_intensities_orientation_and_counts_skips(tmp_path, write_dicom, caplog):
    _tree(tmp_path, write_dicom)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="monai_elvis.data.prepare"):
        summary = prepare_datalist(tmp_path / "src" / "datalist.json", out, size=64, workers=1)
    assert summary.images == 6 and summary.written == 4 and summary.already_done == 0
    assert dict(summary.skipped) == {"unreadable": 1, "missing": 1}
    assert summary.dropped_entries == 2 and summary.entries == {"training": 5, "validation": 0}
    # every skipped file is named in the log, with its reason
    log = caplog.text
    assert "truncated.jpg (unreadable)" in log and "missing.png (missing)" in log
    assert "2 skipped (1 unreadable, 1 missing)" in log or "2 skipped (1 missing, 1 unreadable)" in log

    datalist = json.loads((out / "datalist.json").read_text())
    assert [e["id"] for e in datalist["training"]] == [1, 2, 3, 4, 5] and datalist["validation"] == []
    entry = datalist["training"][0]
    assert entry == {"image": "images/png/gradient.png", "report": "gradient", "id": 1}  # other keys kept
    assert datalist["training"][1]["image"] == datalist["training"][2]["image"] == "images/jpg/corner.png"
    record = json.loads((out / PREPARE_FILE).read_text())
    assert record["complete"] and record["settings"] == {"size": 64, "bits": 8, "side": "longest", "voi_lut": True}
    assert {f["reason"] for f in record["summary"]["skipped_files"]} == {"unreadable", "missing"}

    # gradient: the exact area means, 8 bit
    g = _png(out / "images/png/gradient.png")
    assert g.dtype == np.uint8 and g.shape == (32, 64)
    np.testing.assert_array_equal(g, np.tile(4 * np.arange(64) + 1, (32, 1)))
    # JPEG: size, the bright corner stays top-left, and the values follow the original's
    c = _png(out / "images/jpg/corner.png").astype(float)
    assert c.shape == (48, 64)
    assert c[:14, :19].mean() > 200 and c[18:, 23:].mean() < 60 and c[:14, 23:].mean() < 60 and c[18:, :19].mean() < 60
    original = np.asarray(Image.open(tmp_path / "src/jpg/corner.jpg").convert("L").resize((64, 48), Image.BOX))
    assert np.corrcoef(c.ravel(), original.ravel().astype(float))[0, 1] > 0.99
    # MONOCHROME1 is inverted: the block of the highest stored value is black, the rest white
    m = _png(out / "images/dcm/mono1.png")
    assert m.shape == (64, 51)
    ref = LoadCXR()(tmp_path / "src/dcm/mono1.dcm")[0].numpy().T  # as stored: rows, columns
    assert ref[:20, :20].max() == 0 and ref[20:, 20:].min() == 1  # the loader's own inversion
    assert m[:12, :12].max() < 10 and m[14:, 14:].min() > 245 and m[14:, :12].min() > 245
    # the VOI window is applied: stored values below 500 are black, above 1500 white
    w = _png(out / "images/dcm/window.png")
    assert w.shape == (64, 51)
    assert (w[:, :14] == 0).all() and (w[:, -3:] == 255).all() and (np.diff(w[0].astype(int)) >= 0).all()
    assert 0 < w[0, 25] < 255
    # what the training loader reads back is the prepared file's values in [0, 1]
    np.testing.assert_allclose(LoadCXR()(out / "images/png/gradient.png")[0].numpy(), g.T / 255.0, atol=1e-7)


def test_prepare_16_bit_and_shortest_side(tmp_path, write_dicom):
    ramp = np.tile((40 * np.arange(80)).astype(np.uint16), (100, 1))  # 0 .. 3160: min-max scaled to c / 79
    write_dicom(tmp_path / "ramp.dcm", ramp, bits=12)
    summary = prepare_datalist([{"image": "ramp.dcm"}], tmp_path / "out", size=40, bits=16, side="shortest",
                               base_dir=tmp_path)  # fmt: skip
    assert summary.written == 1
    (entry,) = json.loads((tmp_path / "out" / "datalist.json").read_text())
    r = _png(tmp_path / "out" / entry["image"]).astype(np.int64)
    assert r.shape == (50, 40)  # the shortest side (columns) is 40, shrunk by exactly 2
    expected = np.rint((4 * np.arange(40) + 1) / 2 / 79 * 65535)  # the mean of columns 2j and 2j + 1
    np.testing.assert_allclose(r, np.tile(expected, (50, 1)), atol=1)
    assert Image.open(tmp_path / "out" / entry["image"]).mode.startswith("I;16")


def test_prepare_refuses_other_settings_and_its_own_folder(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    prepare_datalist([{"image": "a.png"}], tmp_path / "out", size=4, base_dir=tmp_path)
    with pytest.raises(InputError, match=r"other settings: size 4 \(wanted 8\).*another --out"):
        prepare_datalist([{"image": "a.png"}], tmp_path / "out", size=8, base_dir=tmp_path)
    with pytest.raises(InputError, match="datalist's own folder"):
        prepare_datalist([{"image": "a.png"}], tmp_path, size=4, base_dir=tmp_path)


def test_prepared_datalist_says_how_to_prepare(tmp_path):
    with pytest.raises(MissingInputError, match="not a prepared dataset.*python -m monai_elvis.data prepare"):
        prepared_datalist(tmp_path)
    (tmp_path / PREPARE_FILE).write_text(json.dumps({"settings": {}, "complete": False}))
    with pytest.raises(MissingInputError, match="did not finish: run the same prepare command again"):
        prepared_datalist(tmp_path)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    prepare_datalist([{"image": "a.png"}], tmp_path / "out", size=4, base_dir=tmp_path)
    assert prepared_datalist(tmp_path / "out") == str(tmp_path / "out" / "datalist.json")


def test_prepare_command_line(tmp_path, write_dicom, capsys):
    _tree(tmp_path, write_dicom)
    out = tmp_path / "out"
    assert data_main(["prepare", "--datalist", str(tmp_path / "src" / "datalist.json"), "--out", str(out),
                      "--size", "64", "--workers", "1"]) == 0  # fmt: skip
    assert f"--dataset_dir {out}" in capsys.readouterr().out
    assert len(json.loads((out / "datalist.json").read_text())["training"]) == 5
    assert data_main(["prepare", "--datalist", str(tmp_path / "none.json"), "--out", str(out)]) == 2
    assert "datalist not found" in capsys.readouterr().err


SLOW_PREPARE = """
import sys, time
import monai_elvis.data.prepare as prepare

_original = prepare.prepare_image


def _slow(*args, **kwargs):
    time.sleep(0.25)
    return _original(*args, **kwargs)


prepare.prepare_image = _slow
if __name__ == "__main__":
    prepare.prepare_datalist(sys.argv[1], sys.argv[2], size=32, workers=1)
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}  # fmt: skip


def test_prepare_killed_part_way_resumes_without_redoing_finished_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):
        Image.fromarray(rng.integers(0, 255, (48, 64), dtype=np.uint8)).save(src / f"{i:02d}.png")
    (src / "datalist.json").write_text(json.dumps({"training": [{"image": f"{i:02d}.png"} for i in range(48)]}))
    script = tmp_path / "slow_prepare.py"
    script.write_text(SLOW_PREPARE)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(src / "datalist.json"), str(out)], env=_env(),
                            cwd=tmp_path, start_new_session=True, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while len(list(out.glob("images/*.png"))) < 4:
            assert proc.poll() is None, f"the prepare run ended before it was killed: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no prepared image appeared within 600 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # mid-way
        proc.wait(timeout=30)
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("images/*.png")}
    assert 4 <= len(done) < 48, len(done)
    assert not (out / "datalist.json").exists()
    assert not json.loads((out / PREPARE_FILE).read_text())["complete"]
    with pytest.raises(MissingInputError, match="did not finish"):
        prepared_datalist(out)
    for p in out.glob("images/*.png"):  # every finished file is complete
        assert Image.open(p).size == (32, 24)

    summary = prepare_datalist(src / "datalist.json", out, size=32, workers=1)
    assert summary.already_done == len(done) and summary.written == 48 - len(done) and not summary.skipped
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("images/*.png")}
    assert len(after) == 48 and {k: after[k] for k in done} == done  # not one finished file was written again
    assert not list(out.rglob("*.partial"))
    assert prepared_datalist(out) == str(out / "datalist.json")
    for i in (0, 47):
        original = np.asarray(Image.open(src / f"{i:02d}.png").resize((32, 24), Image.BOX), dtype=float)
        assert np.abs(_png(out / f"images/{i:02d}.png") - original).max() <= 1


def test_prepare_in_worker_processes_writes_the_same_files(tmp_path, write_dicom):
    _tree(tmp_path, write_dicom)
    datalist = tmp_path / "src" / "datalist.json"
    one = prepare_datalist(datalist, tmp_path / "one", size=64, workers=1)
    two = prepare_datalist(datalist, tmp_path / "two", size=64, workers=2)  # 6 images: one batch, no pool
    assert (one.written, dict(one.skipped)) == (two.written, dict(two.skipped))
    many = [{"image": f"png/{i}.png"} for i in range(40)]
    for i in range(40):
        Image.fromarray(np.full((20, 30), 5 * i, np.uint8)).save(tmp_path / "src" / "png" / f"{i}.png")
    pooled = prepare_datalist(many, tmp_path / "pool", size=16, workers=2, base_dir=tmp_path / "src")
    assert pooled.written == 40 and not pooled.skipped
    for i in (0, 39):
        assert (_png(tmp_path / "pool" / "images" / "png" / f"{i}.png") == 5 * i).all()


UNGUARDED = ("import json, sys\nfrom monai_elvis.data.prepare import prepare_datalist\n"
             "prepare_datalist({src!r}, {out!r}, size=16, workers=2)\n")  # fmt: skip


@pytest.mark.parametrize("stdin", [False, True])
def test_prepare_workers_from_a_plain_script(tmp_path, stdin):
    """Without a main guard, each spawned worker re-runs the script and dies: an error, not a hang; from stdin
    (``python -``) the images are prepared in the process itself."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        Image.fromarray(np.full((20, 20), i, np.uint8)).save(src / f"{i}.png")
    (src / "datalist.json").write_text(json.dumps([{"image": f"{i}.png"} for i in range(40)]))
    text = UNGUARDED.format(src=str(src / "datalist.json"), out=str(tmp_path / "out"))
    script = tmp_path / "unguarded.py"
    script.write_text(text)
    cmd = [sys.executable, "-"] if stdin else [sys.executable, str(script)]
    res = subprocess.run(cmd, input=text if stdin else None, capture_output=True, text=True, timeout=240,
                         cwd=tmp_path, env=_env())  # fmt: skip
    if stdin:
        assert res.returncode == 0, res.stderr[-3000:]
        assert "preparing the images in this process" in res.stderr
        assert len(json.loads((tmp_path / "out" / "datalist.json").read_text())) == 40
    else:
        assert res.returncode != 0
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("monai_elvis.data.prepare.PrepareWorkerError: a prepare worker died"), last
        assert 'if __name__ == "__main__":' in last and "continues where it stopped" in last


# ------------------------------------------------------------------------------------------ disk cache
def _pipeline(size: int = 32):
    from monai.transforms import Compose

    from monai_elvis.transforms import LoadCXRd, SplitSentencesd, cxr_augmentation, cxr_spatial_intensity

    pipeline = Compose([LoadCXRd("image"), *cxr_spatial_intensity(size), *cxr_augmentation(size, prob=1.0),
                        SplitSentencesd("report")])  # fmt: skip
    pipeline.set_random_state(0)
    return pipeline


def _items(folder: Path, n: int = 6) -> list[dict]:
    rng = np.random.default_rng(1)
    items = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40 + i, 50), dtype=np.uint8)).save(folder / f"{i}.png")
        items.append({"image": str(folder / f"{i}.png"), "report": f"Finding {i}. No effusion."})
    return items


def test_disk_cache_yields_the_same_items_as_the_memory_cache(tmp_path):
    from monai.data import MetaTensor

    from monai_elvis.data import SkippingCacheDataset

    items = _items(tmp_path)
    memory = SkippingCacheDataset(items, _pipeline(), cache_rate=1.0)
    disk = SkippingCacheDataset(items, _pipeline(), cache_dir=tmp_path / "cache", cache_rate=1.0)
    assert disk.disk_cache is not None and disk.cache_num == 0  # nothing held in memory
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a cache file that fails to load is recomputed, with a warning
        for epoch in range(2):
            for i in range(len(items)):
                a, b = memory[i], disk[i]
                assert isinstance(b["image"], MetaTensor) and b["image"].meta["filename_or_obj"] == items[i]["image"]
                assert torch.equal(a["image"].as_tensor(), b["image"].as_tensor()), (epoch, i)
                assert a["report"] == b["report"]
            if epoch == 0:
                files = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.pt")}
                assert len(files) == len(items)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.pt")} == files  # read, not rewritten
    assert not [w for w in caught if "cache" in str(w.message).lower()]
    # another image size is another cache entry, not a stale hit
    other = SkippingCacheDataset(items, _pipeline(24), cache_dir=tmp_path / "cache")
    assert other[0]["image"].shape == (1, 24, 24)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == len(items) + 1


def test_disk_cache_skips_bad_samples(tmp_path):
    from monai_elvis.data import BadSampleLimitError, SkippingCacheDataset

    items = _items(tmp_path, 2) + [{"image": str(tmp_path / "missing.png"), "report": "x."}]
    ds = SkippingCacheDataset(items, _pipeline(), cache_dir=tmp_path / "cache", max_skips=1)
    assert ds[2] is None and ds.skipped == 1 and ds[0] is not None
    with pytest.raises(BadSampleLimitError):
        ds[2]


def test_bundle_disk_cache_and_the_mimic_overlay(tmp_path):
    """The pre-training bundle builds its datasets on the disk cache when cache_dir is set, and the MIMIC-CXR
    overlay reads a prepared folder (and says how to make one when it is not)."""
    from monai.bundle import ConfigParser

    from monai_elvis.data import SkippingCacheDataset

    src = tmp_path / "src"
    src.mkdir()
    items = [{**e, "image": Path(e["image"]).name} for e in _items(src, 4)]
    (src / "datalist.json").write_text(json.dumps({"training": items[:3], "validation": items[3:]}))
    prepare_datalist(src / "datalist.json", tmp_path / "prepared", size=32)
    parser = ConfigParser()
    parser.read_config([str(ROOT / "bundles/elvis_pretrain/configs/train.json"), str(ROOT / "configs/data/mimic_cxr.json")])
    parser.update({"dataset_dir": str(tmp_path / "prepared"), "bundle_root": str(tmp_path / "bundle"),
                   "num_workers": 0, "image_size": 32})  # fmt: skip
    parser.parse()
    assert parser.get_parsed_content("datalist") == str(tmp_path / "prepared" / "datalist.json")
    assert parser.get_parsed_content("cache_dir") == str(tmp_path / "prepared" / "cache")
    data = parser.get_parsed_content("train#dataset#data")
    assert [Path(d["image"]).parent for d in data] == [tmp_path / "prepared" / "images"] * 3
    for section in ("train", "validate"):
        assert parser.get(f"{section}#dataset#cache_dir") == "@cache_dir"
    # the bundle's transforms need a tokenizer: the dataset on its image transforms, from the parsed settings
    from monai.transforms import Compose

    from monai_elvis.transforms import LoadCXRd, cxr_spatial_intensity

    pipeline = Compose([LoadCXRd("image"), *cxr_spatial_intensity(parser.get_parsed_content("image_size"))])
    ds = SkippingCacheDataset(data, pipeline, cache_dir=parser.get_parsed_content("cache_dir"))
    assert ds[0]["image"].shape == (1, 32, 32) and len(list((tmp_path / "prepared" / "cache").glob("*.pt"))) == 1
    assert parser.get_parsed_content("validate_grounding") is False
    assert parser.get_parsed_content("grounding#dataset#data") == []  # no MS-CXR CSV is looked for

    unprepared = ConfigParser()
    unprepared.read_config([str(ROOT / "bundles/elvis_pretrain/configs/train.json"),
                            str(ROOT / "configs/data/mimic_cxr.json")])  # fmt: skip
    unprepared.update({"dataset_dir": str(src)})
    unprepared.parse()
    with pytest.raises(Exception) as info:
        unprepared.get_parsed_content("datalist")
    from monai_elvis.errors import find_usage_error

    assert "python -m monai_elvis.data prepare" in str(find_usage_error(info.value))
