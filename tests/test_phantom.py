"""The phantom dataset: determinism, anatomical correctness of findings, reports, files and errors."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from monai_elvis.data import build_ms_cxr
from monai_elvis.data.phantom import (
    FINDING_TYPES,
    AnatomyError,
    PhantomAnatomy,
    PhantomGenerator,
    default_ct_files,
    draw_contact_sheet,
    write_phantom,
)
from monai_elvis.data.phantom.__main__ import main
from monai_elvis.transforms import LoadCXRd, parse_report_sections

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def anatomy():
    return PhantomAnatomy.default()


@pytest.fixture(scope="session")
def studies(anatomy):
    gen = PhantomGenerator(anatomy, size=128, seed=7)
    return [gen(i) for i in range(60)]


def test_anatomy_orientation(anatomy):
    """The heart projects on the image's right (the patient's left) and the lungs' apices are at the top."""
    heart = anatomy.structure_projection("heart")
    assert np.flatnonzero(heart.any(0)).mean() > heart.shape[1] / 2
    right = anatomy.structure_projection("lung_upper_lobe_right")
    left = anatomy.structure_projection("lung_upper_lobe_left")
    assert np.flatnonzero(right.any(0)).mean() < heart.shape[1] / 2 < np.flatnonzero(left.any(0)).mean()
    lower = anatomy.structure_projection("lung_lower_lobe_right")
    assert np.flatnonzero(right.any(1)).min() < np.flatnonzero(lower.any(1)).min()


def test_findings_lie_in_their_structures_and_reports_name_the_side(studies):
    kinds = set()
    for study in studies:
        sections = parse_report_sections(study.report)
        assert set(sections) == {"findings", "impression"}
        for k, f in enumerate(study.findings):
            kinds.add(f["kind"])
            mask, ref = study.masks[k], study.references[k]
            assert mask.sum() > 0
            assert (mask & ref).sum() >= 0.9 * mask.sum(), (f["kind"], f["structure"])
            assert f["sentence"] in sections["findings"]
            named = set(re.findall(r"\b(left|right)\b", f["sentence"].lower()))
            assert named == ({f["side"]} if f["side"] else set()), f["sentence"]
            if f["kind"] == "cardiomegaly":
                assert "enlarged" in f["sentence"]
    assert kinds == set(FINDING_TYPES)


def test_boxes_inside_the_image_and_normal_studies_empty(studies):
    normal = [s for s in studies if not s.findings]
    assert 5 <= len(normal) <= 30
    for s in normal:
        assert s.label.max() == 0 and s.masks.shape[0] == 0
        assert "No acute" in s.report or "Normal chest" in s.report
    for s in studies:
        assert s.image.shape == (128, 128) and 0 <= s.image.min() and s.image.max() <= 1
        for f in s.findings:
            assert f["boxes"]
            for x, y, w, h in f["boxes"]:
                assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 128 and y + h <= 128
        classes = {FINDING_TYPES.index(f["kind"]) + 1 for f in s.findings}
        assert set(np.unique(s.label)) - {0} <= classes


def test_lesions_change_the_image_where_they_are(anatomy):
    gen = PhantomGenerator(anatomy, size=128, seed=3, normal_fraction=0.0, max_findings=1, finding_types=["effusion"],
                           augment=False)  # fmt: skip
    study = gen(0)
    normal = PhantomGenerator(anatomy, size=128, seed=3, normal_fraction=1.0, augment=False)(0)
    inside = study.masks[0]
    diff = study.image - normal.image
    assert diff[inside].mean() > 0.05  # fluid is denser than the lung it replaces
    assert np.abs(diff[~inside]).mean() < 0.01


def test_same_seed_same_files_different_seed_different_images(anatomy, tmp_path):
    a = write_phantom(tmp_path / "a", PhantomGenerator(anatomy, 64, seed=1), 6, workers=1)
    write_phantom(tmp_path / "b", PhantomGenerator(anatomy, 64, seed=1), 6, workers=2)
    write_phantom(tmp_path / "c", PhantomGenerator(anatomy, 64, seed=2), 6, workers=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 6 * 3 + 3
    for rel in files:
        if rel.name == "phantom.json":  # holds the paths only; compare the studies
            ja, jb = (json.loads((tmp_path / d / rel).read_text())["studies"] for d in "ab")
            assert ja == jb
            continue
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert a["num"] == 6 and a["pairs_per_s"] > 0
    images = lambda d: [(tmp_path / d / "images" / f"phantom_{i:05d}.png").read_bytes() for i in range(6)]  # noqa: E731
    assert all(x != y for x, y in zip(images("a"), images("c")))


def test_written_dataset_is_usable(anatomy, tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["--out", str(out), "--num", "12", "--size", "64", "--seed", "5", "--workers", "1",
                 "--contact-sheet", str(tmp_path / "sheet.png")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "pairs/s at 64x64" in printed and "contact sheet" in printed
    datalist = json.loads((out / "datalist.json").read_text())
    assert sum(len(v) for v in datalist.values()) == 12
    files = load_decathlon_datalist(out / "datalist.json", data_list_key="training", base_dir=out)
    item = LoadCXRd(["image", "label"])(files[0])
    assert item["image"].shape == (1, 64, 64) and 0 <= float(item["image"].min()) <= float(item["image"].max()) <= 1
    assert files[0]["report"] and "FINDINGS" not in files[0]["report"]
    meta = json.loads((out / "phantom.json").read_text())
    assert meta["settings"]["seed"] == 5 and len(meta["studies"]) == 12
    with open(out / "ms_cxr.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    n_boxes = sum(len(f["boxes"]) for s in meta["studies"] for f in s["findings"])
    assert len(rows) == n_boxes
    # the phantom folder is an MS-CXR root for the grounding builder
    grounding, summary = build_ms_cxr(out, out / "ms_cxr.csv")
    assert sum(len(v) for v in grounding.values()) == sum(len(s["findings"]) for s in meta["studies"])
    assert not summary.skipped
    from PIL import Image

    assert Image.open(tmp_path / "sheet.png").size[0] > 4 * 256


def test_other_ct_and_bad_files(anatomy, tmp_path):
    ct, labels, structures = default_ct_files()
    # a different CT: the same study resampled to 1.5x coarser in-plane and cropped, saved anew
    img, lab = nib.load(str(ct)), nib.load(str(labels))
    data, ldata = np.asarray(img.dataobj)[::2, ::2, 10:], np.asarray(lab.dataobj)[::2, ::2, 10:]
    affine = img.affine @ np.diag([2, 2, 1, 1])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(ldata, affine), tmp_path / "labels.nii.gz")
    other = PhantomAnatomy.from_files(tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz", structures)
    assert other.mu.shape[2] == anatomy.mu.shape[2] - 10
    study = PhantomGenerator(other, 64, seed=0, normal_fraction=0.0)(1)
    assert study.findings and study.image.shape == (64, 64)
    with pytest.raises(AnatomyError, match="missing.nii.gz"):
        PhantomAnatomy.from_files(tmp_path / "missing.nii.gz", labels, structures)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(ct.read_bytes()[:50_000])
    with pytest.raises(AnatomyError, match="broken.nii.gz"):
        PhantomAnatomy.from_files(broken, labels, structures)
    nib.save(nib.Nifti1Image(ldata[:, :, :50], affine), tmp_path / "short.nii.gz")
    with pytest.raises(AnatomyError, match="has shape"):
        PhantomAnatomy.from_files(tmp_path / "ct.nii.gz", tmp_path / "short.nii.gz", structures)
    empty = np.zeros_like(ldata)
    nib.save(nib.Nifti1Image(empty, affine), tmp_path / "empty.nii.gz")
    with pytest.raises(AnatomyError, match="no voxel of"):
        PhantomAnatomy.from_files(tmp_path / "ct.nii.gz", tmp_path / "empty.nii.gz", structures)
    assert main(["--out", str(tmp_path / "x"), "--ct", str(broken), "--labels", str(labels)]) == 2


@pytest.mark.parametrize("kind", ["nodule", "opacity", "pneumothorax", "atelectasis"])
def test_difficulty_changes_the_measured_contrast_as_it_says(anatomy, kind):
    """The easy phantom's lesions stand out more from their surroundings than the realistic ones (an air lesion
    is darker: its contrast is more negative)."""
    from monai_elvis.data.phantom import lesion_contrast

    def median_contrast(difficulty):
        gen = PhantomGenerator(anatomy, size=128, seed=5, normal_fraction=0.0, max_findings=1, finding_types=[kind],
                               difficulty=difficulty)  # fmt: skip
        return float(np.nanmedian([lesion_contrast(s.image, s.masks[0]) for s in (gen(i) for i in range(8))]))

    easy, realistic = median_contrast("easy"), median_contrast("realistic")
    sign = -1 if kind == "pneumothorax" else 1
    assert sign * easy > sign * realistic + 0.2, (easy, realistic)
    assert sign * easy > 0.3


def test_nodule_min_mm_sets_the_smallest_solid_nodule(anatomy):
    from monai_elvis.data.phantom import FindingSettings, sample_finding
    from monai_elvis.data.phantom.findings import NODULE_MAX_MM

    def diameters(settings):
        rng = np.random.default_rng(3)
        found = [sample_finding("nodule", anatomy, rng, settings).attributes for _ in range(30)]
        return np.array([a["diameter_mm"] for a in found if not a["mass"]])

    default = diameters(FindingSettings())
    assert default.min() < 15 and default.max() <= NODULE_MAX_MM  # 8 to 28 mm
    lifted = diameters(FindingSettings(nodule_min_mm=20.0, size_scale=1.5))
    assert len(lifted) > 10 and lifted.min() >= 20.0 * 1.5 - 0.1 and lifted.max() <= NODULE_MAX_MM * 1.5 + 0.1
    for bad in (0.0, 30.0):
        with pytest.raises(ValueError, match="nodule_min_mm"):
            FindingSettings(nodule_min_mm=bad)


def test_lesion_contrast_by_hand():
    from monai_elvis.data.phantom import lesion_contrast

    image = np.zeros((9, 9), np.float32)
    image[::2, :] = 1.0  # the surroundings alternate 0 / 1 by row: mean 0.5, std 0.5
    mask = np.zeros((9, 9), bool)
    mask[4, 4] = True
    image[4, 4] = 2.0
    # ring of one pixel: the 4-neighbours (cross dilation): rows 3 and 5 are 0, columns of row 4 are 1 -> mean 0.5
    assert lesion_contrast(image, mask, ring=1) == pytest.approx((2.0 - 0.5) / 0.5)
    assert np.isnan(lesion_contrast(image, np.zeros_like(mask)))


def test_framing_fills_the_image_with_the_lungs(anatomy):
    from monai_elvis.data.phantom import RenderSettings
    from monai_elvis.data.phantom.anatomy import LOBES

    def lung_share(framing):
        gen = PhantomGenerator(anatomy, size=64, seed=0, normal_fraction=1.0, augment=False,
                               settings=RenderSettings(framing=framing))  # fmt: skip
        lungs = np.zeros(anatomy.base_projection.shape, bool)
        for name in LOBES:
            lungs |= anatomy.structure_projection(name)
        from monai_elvis.data.phantom import render

        _, warped = render(anatomy, [], [lungs], 64, np.random.default_rng(0), gen.settings, augment=False)
        return warped[0].mean()

    assert lung_share("thorax") > 1.3 * lung_share("full")
    assert lung_share("thorax") > 0.45


def test_prepare_phantom_refuses_a_folder_made_with_other_settings(tmp_path):
    from monai_elvis.data.phantom import prepare_phantom

    (tmp_path / "datalist.json").write_text("{}")
    (tmp_path / "phantom.json").write_text(json.dumps({"settings": {"size": 64, "seed": 0, "difficulty": "realistic",
                                                                    "render": {"framing": "thorax"}},
                                                       "studies": [{}] * 10}))  # fmt: skip
    with pytest.raises(ValueError, match=r"difficulty 'realistic' \(wanted 'easy'\).*Delete"):
        prepare_phantom(tmp_path, num=10, size=64)
    assert prepare_phantom(tmp_path, num=10, size=64, difficulty="realistic") == {"existing": True}
    # another size of the same kind of phantom is used, and said so
    assert prepare_phantom(tmp_path, num=12, size=64, difficulty="realistic")["differs"] == "num 10 (wanted 12)"
    # an easy phantom written by an earlier version, whose findings were drawn otherwise (no nodule_min_mm)
    old_easy = {"contrast": 4.0, "size_scale": 2.0, "texture": 0.5, "lung_field": 0.6}
    (tmp_path / "phantom.json").write_text(json.dumps({"settings": {"size": 64, "seed": 0, "difficulty": "easy",
                                                                    "render": {"framing": "thorax"}, "findings": old_easy},
                                                       "studies": [{}] * 10}))  # fmt: skip
    with pytest.raises(ValueError, match=r"findings .*'nodule_min_mm': 8\.0.*\(wanted .*'nodule_min_mm': 15\.0.*Delete"):
        prepare_phantom(tmp_path, num=10, size=64)


PREPARE_SCRIPT = ("from monai_elvis.data.phantom import prepare_phantom\n"
                  "prepare_phantom({out!r}, num=4, size=32, workers=2)\n")  # no main guard


def _run_script(tmp_path, text: str, stdin: bool) -> subprocess.CompletedProcess:
    """Run ``text`` as a plain script (a file, or ``python -`` reading it from stdin) with this checkout first on the
    path, in a fresh interpreter, under a time limit: a hang fails the test instead of stalling the suite."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    script = tmp_path / "make_phantom.py"
    script.write_text(text)
    cmd = [sys.executable, "-"] if stdin else [sys.executable, str(script)]
    return subprocess.run(cmd, input=text if stdin else None, capture_output=True, text=True, timeout=240,
                          cwd=tmp_path, env=env)  # fmt: skip


def test_phantom_from_a_script_without_a_main_guard_fails_at_once(tmp_path):
    """Each spawned render worker re-runs an unguarded script and dies: that must stop the call with a message
    saying what to do, not hang while the pool replaces the worker (or the parent waits on a pipe)."""
    res = _run_script(tmp_path, PREPARE_SCRIPT.format(out=str(tmp_path / "ph")), stdin=False)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("monai_elvis.data.phantom.writer.PhantomWorkerError: a phantom render worker died"), last
    assert 'if __name__ == "__main__":' in last and "workers=1" in last
    assert not (tmp_path / "ph" / "datalist.json").exists()


def test_phantom_from_a_script_read_from_stdin_renders_in_process(tmp_path):
    res = _run_script(tmp_path, PREPARE_SCRIPT.format(out=str(tmp_path / "ph")), stdin=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rendering the phantom in this process" in res.stderr
    assert sum(len(v) for v in json.loads((tmp_path / "ph" / "datalist.json").read_text()).values()) == 4


def test_progress_logger_logs_every_n_studies_and_the_last(caplog):
    from monai_elvis.data.phantom import progress_logger

    progress = progress_logger(every=2)
    with caplog.at_level("INFO", logger="monai_elvis.phantom"):
        for done in range(1, 6):
            progress(done, 5, done * 0.5)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" studies")[0] for line in lines] == ["phantom: 2/5", "phantom: 4/5", "phantom: 5/5"]
    assert "2.0 per s" in lines[0] and "about 2 s left" in lines[0]
