"""Datalist builders for the public chest X-ray datasets.

Each builder reads a dataset in its published layout and returns a MONAI datalist
``{"training": [...], "validation": [...], "test": [...]}`` with paths relative to the dataset root (load
it with ``monai.data.load_decathlon_datalist(path, base_dir=root)``), and a :class:`BuildSummary` of what
was kept and what was skipped, with reasons.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import os
import random
import tarfile
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_elvis.keys import Keys
from monai_elvis.transforms.report import ExtractReportSections, ReportError, parse_iu_xray_xml

__all__ = [
    "BuildSummary",
    "DatasetFormatError",
    "read_csv_rows",
    "split_items",
    "subsample_training",
    "build_mimic_cxr",
    "build_ms_cxr",
    "build_siim",
    "build_rsna",
    "build_chexpert",
    "CHEXPERT_COMPETITION",
    "build_iu_xray",
    "load_grounding_datalist",
    "datalist_split",
    "list_images",
    "BUILDERS",
]

logger = logging.getLogger(__name__)
SPLITS = ("training", "validation", "test")


class DatasetFormatError(ValueError):
    """A dataset file is missing or not in the expected format; the message names it."""


@dataclass
class BuildSummary:
    """Counts of kept entries per split and of skipped items per reason."""

    name: str
    kept: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def skip(self, reason: str, item: Any) -> None:
        self.skipped[reason] += 1
        logger.debug("%s: skipped %s (%s)", self.name, item, reason)

    def __str__(self) -> str:
        kept = ", ".join(f"{s} {self.kept[s]}" for s in SPLITS)
        text = f"{self.name}: kept {sum(self.kept.values())} ({kept}), skipped {sum(self.skipped.values())}"
        if self.skipped:
            text += ": " + ", ".join(f"{n} {r}" for r, n in self.skipped.most_common())
        return text


# ------------------------------------------------------------------------------------------ helpers
def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    if path.suffix == ".zip":
        zf = zipfile.ZipFile(path)
        names = [n for n in zf.namelist() if n.endswith(".csv")]
        if len(names) != 1:
            raise DatasetFormatError(f"{path} must hold exactly one CSV file, it holds {names}.")
        return io.TextIOWrapper(zf.open(names[0]), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_csv_rows(path: str | os.PathLike, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV (plain, ``.gz`` or single-file ``.zip``) with stripped column names and values.

    Raises :class:`DatasetFormatError` naming the file when it is missing, unreadable or lacks a required column.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"CSV file not found: {path}")
    try:
        with _open_text(path) as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in required if c not in columns]
            if missing:
                raise DatasetFormatError(f"{path} lacks the column(s) {missing}; it has {columns}.")
            return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (UnicodeDecodeError, csv.Error, OSError, zipfile.BadZipFile) as e:
        raise DatasetFormatError(f"cannot read CSV {path}: {e}") from e


def _find(root: Path, names: Sequence[str], what: str) -> Path:
    for name in names:
        if (root / name).is_file():
            return root / name
    raise DatasetFormatError(f"no {what} in {root}: looked for {list(names)}.")


def split_items(keys: Iterable[str], seed: int, fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> dict[str, str]:
    """Seeded split of unique keys into training / validation / test (default 70/15/15): ``{key: split}``."""
    unique = sorted(set(keys))
    random.Random(seed).shuffle(unique)
    n = len(unique)
    n_train = round(fractions[0] * n)
    n_val = round(fractions[1] * n)
    return {k: SPLITS[0] if i < n_train else SPLITS[1] if i < n_train + n_val else SPLITS[2] for i, k in enumerate(unique)}


def subsample_training(datalist: dict[str, list], fraction: float, seed: int) -> dict[str, list]:
    """Keep a seeded ``fraction`` of the training entries (at least one) for label-efficiency runs."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    out = dict(datalist)
    train = list(datalist.get("training", []))
    if fraction < 1 and train:
        k = max(1, round(fraction * len(train)))
        idx = sorted(random.Random(seed).sample(range(len(train)), k))
        out["training"] = [train[i] for i in idx]
    return out


def _read_report(path: Path, summary: BuildSummary, extractor: ExtractReportSections) -> str | None:
    if not path.is_file():
        summary.skip("missing report", path)
        return None
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        summary.skip("report not UTF-8", path)
        return None
    try:
        return extractor(text, source=str(path))
    except ReportError:
        summary.skip("empty report", path)
        return None


def _datalist(entries: Iterable[tuple[str, dict]], summary: BuildSummary) -> dict[str, list]:
    out: dict[str, list] = {s: [] for s in SPLITS}
    for split, entry in entries:
        out[split].append(entry)
        summary.kept[split] += 1
    return out


# ------------------------------------------------------------------------------------------ MIMIC-CXR-JPG
def build_mimic_cxr(
    root: str | os.PathLike,
    reports: str | os.PathLike | None = None,
    views: Sequence[str] = ("PA", "AP"),
    sections: Sequence[str] = ("findings", "impression"),
    seed: int = 0,
) -> tuple[dict[str, list], BuildSummary]:
    """MIMIC-CXR-JPG: the official split CSV, the metadata CSV (view filter) and the free-text reports.

    ``root`` holds ``mimic-cxr-2.0.0-split.csv(.gz)``, ``mimic-cxr-2.0.0-metadata.csv(.gz)`` and
    ``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg``; the reports (``files/pXX/pSUBJECT/sSTUDY.txt`` from MIMIC-CXR)
    are under ``reports`` (default ``root/mimic-cxr-reports``, else ``root``). Entries: ``image``, ``report``
    (the chosen sections), ``report_file``, ``subject_id``, ``study_id``, ``dicom_id``, ``view``.
    """
    root = Path(root)
    summary = BuildSummary("mimic-cxr")
    split_csv = _find(root, ["mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-split.csv"], "split CSV")
    meta_csv = _find(root, ["mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv"], "metadata CSV")
    split_rows = read_csv_rows(split_csv, ["dicom_id", "study_id", "subject_id", "split"])
    views_of = {r["dicom_id"]: r["ViewPosition"] for r in read_csv_rows(meta_csv, ["dicom_id", "ViewPosition"])}
    report_root = Path(reports) if reports else (root / "mimic-cxr-reports" if (root / "mimic-cxr-reports").is_dir() else root)
    split_names = {"train": "training", "validate": "validation", "validation": "validation", "test": "test"}
    extractor = ExtractReportSections(sections, fallback="last")
    report_cache: dict[Path, str | None] = {}

    def entries() -> Iterator[tuple[str, dict]]:
        for row in split_rows:
            subject, study, dicom = row["subject_id"], row["study_id"], row["dicom_id"]
            split = split_names.get(row["split"].lower())
            if split is None:
                summary.skip(f"unknown split {row['split']!r}", dicom)
                continue
            view = views_of.get(dicom)
            if view is None:
                summary.skip("not in metadata CSV", dicom)
                continue
            if views and view not in views:
                summary.skip(f"view not {'/'.join(views)}", dicom)
                continue
            rel_dir = Path("files") / f"p{subject[:2]}" / f"p{subject}"
            image = rel_dir / f"s{study}" / f"{dicom}.jpg"
            if not (root / image).is_file():
                summary.skip("missing image", image)
                continue
            report_file = report_root / rel_dir / f"s{study}.txt"
            if report_file not in report_cache:
                report_cache[report_file] = _read_report(report_file, summary, extractor)
            elif report_cache[report_file] is None:
                summary.skip("report already rejected", report_file)
            text = report_cache[report_file]
            if text is None:
                continue
            yield split, {
                Keys.IMAGE: str(image), Keys.REPORT: text, "report_file": str(report_file), "subject_id": subject,
                "study_id": study, "dicom_id": dicom, "view": view,
            }  # fmt: skip

    return _datalist(entries(), summary), summary


# ------------------------------------------------------------------------------------------ MS-CXR
MS_CXR_COLUMNS = ("dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height")


def build_ms_cxr(
    root: str | os.PathLike, csv_path: str | os.PathLike | None = None, seed: int = 0, check_images: bool = True
) -> tuple[dict[str, list], BuildSummary]:
    """MS-CXR phrase grounding (v1.0.0 or v1.1.0 CSV) over a MIMIC-CXR-JPG tree at ``root``.

    Rows of the same image and phrase are merged into one entry with several boxes. The ``split`` column is
    used when present (v1.1.0), else a seeded 70/15/15 split by image. Entries: ``image`` (the CSV's ``path``),
    ``phrase``, ``category``, ``boxes`` ``[[x, y, w, h], ...]`` in original pixels, ``image_size`` ``[H, W]``,
    ``dicom_id``.
    """
    root = Path(root)
    summary = BuildSummary("ms-cxr")
    if csv_path is None:
        found = sorted(root.glob("MS_CXR_Local_Alignment_v1*.csv"))
        if not found:
            raise DatasetFormatError(f"no MS-CXR CSV (MS_CXR_Local_Alignment_v1*.csv) in {root}; pass csv_path.")
        csv_path = found[-1]
    rows = read_csv_rows(csv_path, MS_CXR_COLUMNS)
    groups: dict[tuple[str, str, str], dict] = {}
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        try:
            box = [float(row[c]) for c in ("x", "y", "w", "h")]
            size = [int(float(row["image_height"])), int(float(row["image_width"]))]
        except ValueError:
            summary.skip("bad box values", f"{csv_path} line {i}")
            continue
        if box[2] <= 0 or box[3] <= 0:
            summary.skip("empty box", f"{csv_path} line {i}")
            continue
        key = (row["dicom_id"], row["label_text"], row["category_name"])
        entry = groups.setdefault(key, {
            Keys.IMAGE: row["path"], Keys.PHRASE: row["label_text"], "category": row["category_name"],
            Keys.BOXES: [], "image_size": size, "dicom_id": row["dicom_id"], "split": row.get("split", ""),
        })  # fmt: skip
        entry[Keys.BOXES].append(box)
    has_split = all(e["split"] for e in groups.values()) and groups
    by_image = split_items((e["dicom_id"] for e in groups.values()), seed) if not has_split else {}
    names = {"train": "training", "training": "training", "val": "validation", "validation": "validation", "test": "test"}

    def entries() -> Iterator[tuple[str, dict]]:
        for entry in groups.values():
            split = names.get(entry.pop("split").lower()) if has_split else by_image[entry["dicom_id"]]
            if split is None:
                summary.skip("unknown split", entry["dicom_id"])
                continue
            if check_images and not (root / entry[Keys.IMAGE]).is_file():
                summary.skip("missing image", entry[Keys.IMAGE])
                continue
            entry.pop("split", None)
            yield split, entry

    return _datalist(entries(), summary), summary


# ------------------------------------------------------------------------------------------ SIIM-ACR
def build_siim(
    root: str | os.PathLike, rle_csv: str | os.PathLike | None = None, seed: int = 0
) -> tuple[dict[str, list], BuildSummary]:
    """SIIM-ACR pneumothorax: the RLE CSV (``ImageId``, ``EncodedPixels``) and the DICOM tree under ``root``.

    Rows of one image are merged; the split is the seeded 70/15/15 split by image used by GLoRIA and MGCA.
    Entries: ``image`` (the DICOM), ``label`` (list of RLE strings, ``["-1"]`` for none), ``pneumothorax`` (0/1).
    """
    root = Path(root)
    summary = BuildSummary("siim")
    csv_file = Path(rle_csv) if rle_csv else _find(
        root, ["train-rle.csv", "siim-pneumothorax-train-rle.csv.gz", "siim-pneumothorax-train-rle.csv",
               "stage_2_train.csv"], "RLE CSV")  # fmt: skip
    rows = read_csv_rows(csv_file, ["ImageId", "EncodedPixels"])
    rles: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        rles[row["ImageId"]].append(row["EncodedPixels"])
    dicoms = {p.stem: p for p in root.rglob("*.dcm")}
    splits = split_items(rles, seed)

    def entries() -> Iterator[tuple[str, dict]]:
        for image_id, encs in rles.items():
            path = dicoms.get(image_id)
            if path is None:
                summary.skip("missing image", image_id)
                continue
            positive = int(any(e not in ("-1", "") for e in encs))
            yield splits[image_id], {Keys.IMAGE: str(path.relative_to(root)), Keys.LABEL: encs, "pneumothorax": positive}

    return _datalist(entries(), summary), summary


# ------------------------------------------------------------------------------------------ RSNA
def build_rsna(
    root: str | os.PathLike, labels_csv: str | os.PathLike | None = None, seed: int = 0
) -> tuple[dict[str, list], BuildSummary]:
    """RSNA pneumonia: ``stage_2_train_labels.csv`` (or its ``.zip``) and ``stage_2_train_images/*.dcm``.

    Boxes are grouped per patient; seeded 70/15/15 split by patient. Entries: ``image``, ``boxes``
    ``[[x, y, w, h], ...]`` (empty for no pneumonia), ``pneumonia`` (0/1).
    """
    root = Path(root)
    summary = BuildSummary("rsna")
    csv_file = Path(labels_csv) if labels_csv else _find(
        root, ["stage_2_train_labels.csv", "stage_2_train_labels.csv.zip", "kaggle_stage_2_train_labels.csv.zip"],
        "labels CSV")  # fmt: skip
    rows = read_csv_rows(csv_file, ["patientId", "x", "y", "width", "height", "Target"])
    boxes: dict[str, list] = {}
    bad: set[str] = set()
    for i, row in enumerate(rows, start=2):
        pid = row["patientId"]
        boxes.setdefault(pid, [])
        if row["Target"] == "1":
            try:
                boxes[pid].append([float(row[c]) for c in ("x", "y", "width", "height")])
            except ValueError:
                bad.add(pid)
                logger.debug("rsna: bad box at %s line %d", csv_file, i)
    image_dir = root / "stage_2_train_images" if (root / "stage_2_train_images").is_dir() else root
    splits = split_items(boxes, seed)

    def entries() -> Iterator[tuple[str, dict]]:
        for pid, bxs in boxes.items():
            if pid in bad:
                summary.skip("bad box values", pid)
                continue
            path = image_dir / f"{pid}.dcm"
            if not path.is_file():
                summary.skip("missing image", pid)
                continue
            yield splits[pid], {Keys.IMAGE: str(path.relative_to(root)), Keys.BOXES: bxs, "pneumonia": int(bool(bxs))}

    return _datalist(entries(), summary), summary


# ------------------------------------------------------------------------------------------ CheXpert
CHEXPERT_COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def _chexpert_value(value: str) -> float:
    """A CheXpert label cell: ``1.0`` positive, ``0.0`` negative, ``-1.0`` uncertain, blank (not mentioned) 0."""
    if value == "":
        return 0.0
    v = float(value)
    if v not in (1.0, 0.0, -1.0):
        raise ValueError(f"label {value!r} is not 1, 0, -1 or blank")
    return v


def build_chexpert(
    root: str | os.PathLike,
    train_csv: str | os.PathLike | None = None,
    valid_csv: str | os.PathLike | None = None,
    classes: Sequence[str] = CHEXPERT_COMPETITION,
    frontal_only: bool = True,
    seed: int = 0,
) -> tuple[dict[str, list], BuildSummary]:
    """CheXpert-style label CSVs (CheXpert's ``train.csv`` / ``valid.csv``, or any CSV with a ``Path`` column and
    one column per class).

    ``Path`` is taken relative to ``root`` or to its parent (CheXpert's paths start with the dataset folder's own
    name, ``CheXpert-v1.0-small/train/...``). Entries: ``image``, ``label`` (one value per class of ``classes``,
    in that order: ``1.0`` positive, ``0.0`` negative or not mentioned (blank), ``-1.0`` uncertain; the bundle's
    :class:`~monai_elvis.transforms.UncertainLabelsd` maps ``-1`` by a setting), ``patient``. ``train.csv`` is split
    by patient, seeded: 85/15 into training and validation when ``valid.csv`` exists (it becomes the test split, as
    CheXpert's radiologist-labelled validation set is used in the literature), 70/15/15 otherwise. With
    ``frontal_only`` (default), lateral views (``Frontal/Lateral`` = ``Lateral``) are skipped.
    """
    root = Path(root)
    summary = BuildSummary("chexpert")
    train_file = Path(train_csv) if train_csv else _find(root, ["train.csv"], "train.csv")
    valid_file = Path(valid_csv) if valid_csv else (root / "valid.csv" if (root / "valid.csv").is_file() else None)
    classes = list(classes)
    sources = [(train_file, None)] + ([(valid_file, SPLITS[2])] if valid_file is not None else [])
    rows: list[tuple[str | None, str, dict]] = []
    for csv_file, split in sources:
        for i, row in enumerate(read_csv_rows(csv_file, ["Path", *classes]), start=2):
            if frontal_only and row.get("Frontal/Lateral", "Frontal").lower() == "lateral":
                summary.skip("lateral view", row["Path"])
                continue
            try:
                label = [_chexpert_value(row[c]) for c in classes]
            except ValueError as e:
                raise DatasetFormatError(f"{csv_file} line {i}: {e}") from None
            parts = Path(row["Path"]).parts
            patient = next((p for p in parts if p.startswith("patient")), row["Path"])
            rows.append((split, row["Path"], {Keys.LABEL: label, "patient": patient}))
    train_patients = [r[2]["patient"] for r in rows if r[0] is None]
    fractions = (0.85, 0.15, 0.0) if valid_file is not None else (0.7, 0.15, 0.15)
    splits = split_items(train_patients, seed, fractions)

    def entries() -> Iterator[tuple[str, dict]]:
        for split, rel, entry in rows:
            path = next((base / rel for base in (root, root.parent) if (base / rel).is_file()), None)
            if path is None:
                summary.skip("missing image", rel)
                continue
            if split is None:  # a train.csv row: its patient's split (no test split beside valid.csv)
                split = splits[entry["patient"]]
                split = SPLITS[1] if split == SPLITS[2] and valid_file is not None else split
            try:  # CheXpert's own layout: the path under root, without the folder's name
                image = str(path.resolve().relative_to(root.resolve()))
            except ValueError:
                image = os.path.relpath(path, root)
            yield split, {Keys.IMAGE: image, **entry}

    return _datalist(entries(), summary), summary


# ------------------------------------------------------------------------------------------ IU X-ray
def iter_iu_xray_xml(source: str | os.PathLike) -> Iterator[tuple[str, bytes]]:
    """``(name, xml bytes)`` of every report in a folder of ``*.xml`` (searched recursively) or a ``.tgz``."""
    source = Path(source)
    if source.is_dir():
        for p in sorted(source.rglob("*.xml")):
            yield str(p), p.read_bytes()
    elif source.is_file() and source.name.endswith((".tgz", ".tar.gz")):
        with tarfile.open(source, "r:gz") as tf:
            for m in sorted(tf.getmembers(), key=lambda m: m.name):
                if m.isfile() and m.name.endswith(".xml"):
                    f = tf.extractfile(m)
                    if f is not None:
                        yield m.name, f.read()
    else:
        raise DatasetFormatError(f"IU X-ray reports must be a folder of XML files or a .tgz, got {source}.")


def build_iu_xray(
    root: str | os.PathLike,
    images: str | os.PathLike | None = None,
    sections: Sequence[str] = ("findings", "impression"),
    seed: int = 0,
) -> tuple[dict[str, list], BuildSummary]:
    """Indiana University chest X-ray reports (``ecgen-radiology`` XML, a folder or ``NLMCXR_reports.tgz``).

    Where the data comes from: the 3,955 reports, as ``NLMCXR_reports.tgz``, ship inside the
    ``torchxrayvision==1.5.7`` wheel on PyPI; :func:`monai_elvis.data.sources.fetch_wheel_member` fetches and
    sha256-checks it (``python -m monai_elvis.data iu-xray`` without ``--root`` does so). The radiographs are not
    in the wheel: they are the Open-i collection's ``<image id>.png`` files, downloaded separately.

    ``root`` is the folder or the ``.tgz`` (or a folder holding ``NLMCXR_reports.tgz``). Without ``images``, the
    datalist holds **reports without images**, one entry per report (``report``, ``report_id``, ``image_ids``):
    text to train a tokenizer on or to benchmark report transforms with, not an input of the pre-training
    bundle, which needs images. With an ``images`` folder of ``<image id>.png``, one entry per image found
    (``image`` absolute, ``report``, ``report_id``), an image-report datalist for pre-training. Seeded 70/15/15
    split by report; reports with neither findings nor impression are skipped (counted in the summary).

    Used by the tests (the report parser and the tokenizer fixture) and by
    ``python -m monai_elvis.benchmarks transforms`` (its reports).
    """
    root = Path(root)
    if root.is_dir() and not any(root.rglob("*.xml")) and (root / "NLMCXR_reports.tgz").is_file():
        root = root / "NLMCXR_reports.tgz"
    summary = BuildSummary("iu-xray")
    extractor = ExtractReportSections(sections, fallback=None)
    parsed = []
    for name, xml in iter_iu_xray_xml(root):
        try:
            rep = parse_iu_xray_xml(xml)
        except ReportError:
            summary.skip("unparsable XML", name)
            continue
        try:
            parsed.append((rep, extractor(rep["sections"], source=name)))
        except ReportError:
            summary.skip("no findings or impression", name)
    splits = split_items((r["id"] for r, _ in parsed), seed)
    image_dir = Path(images) if images else None

    def entries() -> Iterator[tuple[str, dict]]:
        for rep, text in parsed:
            if image_dir is None:
                yield splits[rep["id"]], {Keys.REPORT: text, "report_id": rep["id"], "image_ids": rep["images"]}
                continue
            found = [image_dir / f"{i}.png" for i in rep["images"] if (image_dir / f"{i}.png").is_file()]
            if not found:
                summary.skip("no image", rep["id"])
            for path in found:
                yield splits[rep["id"]], {Keys.IMAGE: str(path), Keys.REPORT: text, "report_id": rep["id"]}

    return _datalist(entries(), summary), summary


def load_grounding_datalist(root: str | os.PathLike, csv_path: str | os.PathLike | None = None,
                            split: str = "validation", seed: int = 0) -> list[dict]:  # fmt: skip
    """The ``split`` entries of :func:`build_ms_cxr` with absolute image paths, ready for transforms."""
    datalist, _ = build_ms_cxr(root, csv_path, seed=seed)
    return [{**e, Keys.IMAGE: str(Path(root) / e[Keys.IMAGE])} for e in datalist[split]]


def datalist_split(
    datalist: dict[str, list] | str | os.PathLike,
    split: str,
    base_dir: str | os.PathLike | None = None,
    path_keys: Sequence[str] = (Keys.IMAGE,),
    fraction: float = 1.0,
    seed: int = 0,
) -> list[dict]:
    """One split of a datalist, with the paths under ``path_keys`` made absolute, and a seeded ``fraction`` of
    it kept (for label-efficiency runs; :func:`subsample_training` with the same seed keeps the same entries).

    Args:
        datalist: a datalist dict (as the builders return) or the path of a datalist JSON file.
        split: ``"training"``, ``"validation"`` or ``"test"``.
        base_dir: the folder relative paths refer to (default: the JSON file's folder).
        path_keys: keys whose string values are file paths; other values (RLE strings, boxes) are left alone.
        fraction: in ``(0, 1]``.

    Raises ``KeyError`` naming the datalist and its splits when ``split`` is absent, ``ValueError`` for an entry
    without a path key.
    """
    import json

    source = "datalist"
    if not isinstance(datalist, dict):
        source = str(datalist)
        path = Path(datalist)
        if not path.is_file():
            raise FileNotFoundError(f"datalist not found: {path}")
        try:
            datalist = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetFormatError(f"datalist {path} is not valid JSON: {e}") from e
        base_dir = path.parent if base_dir is None else base_dir
    if split not in datalist:
        raise KeyError(f"{source} has no {split!r} split; it has {sorted(datalist)}.")
    entries = subsample_training({"training": list(datalist[split])}, fraction, seed)["training"]
    out = []
    for i, entry in enumerate(entries):
        entry = dict(entry)
        for key in path_keys:
            if key not in entry:
                raise ValueError(f"{source}: entry {i} of {split!r} has no {key!r}: {entry}")
            if base_dir is not None and isinstance(entry[key], str):
                entry[key] = str(Path(base_dir) / entry[key])
        out.append(entry)
    return out


def list_images(folder: str | os.PathLike, suffixes: Sequence[str] = (".png", ".jpg", ".jpeg", ".dcm")) -> list[dict]:
    """``[{"image": path}, ...]`` for every file under ``folder`` (recursively) with one of ``suffixes``, sorted.

    Raises ``FileNotFoundError`` when the folder is missing or holds no such file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files in {folder}.")
    return [{Keys.IMAGE: str(p)} for p in files]


BUILDERS = {
    "mimic-cxr": build_mimic_cxr,
    "ms-cxr": build_ms_cxr,
    "siim": build_siim,
    "rsna": build_rsna,
    "chexpert": build_chexpert,
    "iu-xray": build_iu_xray,
}
