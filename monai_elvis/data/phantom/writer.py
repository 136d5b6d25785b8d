"""Writing a phantom dataset: PNG images and masks, report files, datalist, MS-CXR style CSV, audit JSON,
and a contact sheet to look at."""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing as mp
import os
import pickle
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from monai_elvis.data.builders import split_items
from monai_elvis.data.phantom.findings import warm_up
from monai_elvis.data.phantom.generator import PhantomGenerator
from monai_elvis.data.workers import in_spawned_main, spawn_can_run_main
from monai_elvis.keys import Keys
from monai_elvis.transforms.report import ExtractReportSections

__all__ = ["write_phantom", "draw_contact_sheet", "MS_CXR_COLUMNS", "PhantomWorkerError"]

logger = logging.getLogger(__name__)
MS_CXR_COLUMNS = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width",
                  "image_height", "split"]  # fmt: skip
_SPLIT_NAMES = {"training": "train", "validation": "val", "test": "test"}
_GENERATOR: PhantomGenerator | None = None  # set in each worker process by _init_worker
_OUT: Path | None = None


_WORKER_HELP = (
    "The render workers are started with 'spawn': each one runs the main script again first, so a script that "
    "calls prepare_phantom / write_phantom at its top level (without an `if __name__ == \"__main__\":` guard) "
    "cannot start them. Put the call under `if __name__ == \"__main__\":`, or pass workers=1 (one process), or "
    "run `python -m monai_elvis.data.phantom --out DIR` instead."
)


class PhantomWorkerError(RuntimeError):
    """A phantom render worker process died (or could not start): raised instead of waiting for it forever."""


def _refuse_in_spawned_main() -> None:
    """Fail at once inside a new worker that is re-running the caller's main script (see
    :func:`monai_elvis.data.workers.in_spawned_main`)."""
    if in_spawned_main():
        raise PhantomWorkerError("a phantom render worker is running the main script again. " + _WORKER_HELP)


def _init_worker(generator: PhantomGenerator | str, out: Path) -> None:
    """Set the worker's generator: the object, or the path of its pickle (see :func:`write_phantom`)."""
    import pickle

    import torch

    torch.set_num_threads(1)
    if isinstance(generator, str):
        with open(generator, "rb") as f:
            generator = pickle.load(f)
    global _GENERATOR, _OUT
    _GENERATOR, _OUT = generator, out


def _write_study(index: int) -> dict[str, Any]:
    assert _GENERATOR is not None and _OUT is not None
    study = _GENERATOR(index)
    name = f"phantom_{index:05d}"
    files = {"image": f"images/{name}.png", "label": f"labels/{name}.png", "report": f"reports/{name}.txt"}
    Image.fromarray(np.round(study.image * 65535).astype(np.uint16)).save(_OUT / files["image"])
    Image.fromarray(study.label).save(_OUT / files["label"])
    (_OUT / files["report"]).write_text(study.report, encoding="utf-8")
    for k, (finding, mask) in enumerate(zip(study.findings, study.masks)):
        finding["mask"] = f"masks/{name}_{k}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(_OUT / finding["mask"])
    return {"id": name, "index": index, "files": files, "report": study.report, "findings": study.findings}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_phantom(
    out: str | os.PathLike,
    generator: PhantomGenerator,
    num: int,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    workers: int = 2,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Render ``num`` studies into ``out`` and write the index files; returns a summary with the rate.

    Layout: ``images/*.png`` (16-bit), ``labels/*.png`` (finding classes), ``masks/*_K.png`` (one per finding),
    ``reports/*.txt``, ``datalist.json`` (entries with ``image``, ``label``, ``report``), ``ms_cxr.csv``
    (the MS-CXR columns, one row per finding box), ``phantom.json`` (settings and every study's findings).
    The index files are written last and atomically, so a folder with ``datalist.json`` is complete.

    ``workers > 1`` renders in that many worker processes (started with "spawn"). A worker that dies stops the
    call with a :class:`PhantomWorkerError` saying why and what to do (never a hang: a dead worker is not
    replaced). Call it from a script under ``if __name__ == "__main__":``, or pass ``workers=1``; a script read
    from stdin (``python -``), where workers cannot start, renders in its own process.
    """
    if workers > 1:
        _refuse_in_spawned_main()
        if not spawn_can_run_main():
            logger.warning("the main script was read from stdin, where worker processes cannot start: rendering the "
                           "phantom in this process (workers=1)")  # fmt: skip
            workers = 1
    out = Path(out)
    for sub in ("images", "labels", "masks", "reports"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    warm_up(generator.anatomy, generator.settings)  # the workers receive the filled caches with the generator
    start = time.perf_counter()
    studies: list[dict] = []
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        # spawn, not fork: a forked child of a process that has used torch's OpenMP pool can hang. An executor,
        # not multiprocessing.Pool: the Pool replaces a dead worker and waits forever for its lost results
        # The generator (about 100 MB with its caches) reaches the workers through a file: sent through the spawn
        # pipe, it blocks the parent forever when a worker dies before reading it all (CPython closes its copy of
        # the pipe's read end only after the write), and the death is never noticed.
        ctx = mp.get_context("spawn")
        try:
            with tempfile.TemporaryDirectory(prefix="monai_elvis_phantom_") as tmp:
                state = os.path.join(tmp, "generator.pkl")
                with open(state, "wb") as f:
                    pickle.dump(generator, f, protocol=pickle.HIGHEST_PROTOCOL)
                pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(state, out))
                with pool:
                    for record in pool.map(_write_study, range(num), chunksize=8):
                        studies.append(record)
                        if progress:
                            progress(len(studies), num, time.perf_counter() - start)
        except BrokenProcessPool as e:
            raise PhantomWorkerError(f"a phantom render worker died after {len(studies)} of {num} studies "
                                     f"(its error, if any, is printed above). {_WORKER_HELP}") from e
    else:
        _init_worker(generator, out)
        for i in range(num):
            studies.append(_write_study(i))
            if progress:
                progress(len(studies), num, time.perf_counter() - start)
    elapsed = time.perf_counter() - start

    splits = split_items((s["id"] for s in studies), generator.seed, split_fractions)
    extract = ExtractReportSections()
    datalist: dict[str, list] = {"training": [], "validation": [], "test": []}
    rows = []
    size = generator.size
    for s in studies:
        split = splits[s["id"]]
        datalist[split].append({
            Keys.IMAGE: s["files"]["image"], Keys.LABEL: s["files"]["label"], Keys.REPORT: extract(s["report"]),
            "report_file": s["files"]["report"], "id": s["id"], "findings": [f["kind"] for f in s["findings"]],
        })  # fmt: skip
        for f in s["findings"]:
            for x, y, w, h in f["boxes"]:
                rows.append([s["id"], f["category"], f["phrase"], s["files"]["image"], x, y, w, h, size, size,
                             _SPLIT_NAMES[split]])  # fmt: skip
        s["split"] = split
    with open(out / "ms_cxr.csv.tmp", "w", newline="") as fh:
        csv.writer(fh).writerows([MS_CXR_COLUMNS, *rows])
    os.replace(out / "ms_cxr.csv.tmp", out / "ms_cxr.csv")
    _atomic_write(out / "phantom.json", json.dumps({"settings": generator.settings_dict(), "studies": studies}, indent=1))
    _atomic_write(out / "datalist.json", json.dumps(datalist, indent=1))
    summary = {
        "num": num, "seconds": round(elapsed, 2), "pairs_per_s": round(num / max(elapsed, 1e-9), 1),
        "findings": sum(len(s["findings"]) for s in studies), "normal": sum(not s["findings"] for s in studies),
        "splits": {k: len(v) for k, v in datalist.items()}, "boxes": len(rows),
    }  # fmt: skip
    return summary


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


CONTACT_SHEET_COLOURS = {
    "nodule": (255, 80, 80), "opacity": (255, 200, 0), "effusion": (80, 160, 255), "pneumothorax": (0, 230, 120),
    "cardiomegaly": (230, 80, 230), "atelectasis": (255, 140, 40),
}  # fmt: skip


def draw_contact_sheet(data_dir: str | os.PathLike, out_png: str | os.PathLike, n: int = 16, columns: int = 4,
                       tile: int = 256) -> Path:  # fmt: skip
    """A PNG of ``n`` studies of a phantom folder: each image with its finding boxes, coloured by kind (a legend
    heads the sheet), and under it the report's sentence for each finding in the same colour, wrapped in full."""
    data_dir, out_png = Path(data_dir), Path(out_png)
    meta = json.loads((data_dir / "phantom.json").read_text())
    studies = meta["studies"][:n]
    colours = CONTACT_SHEET_COLOURS
    font, line_h, chars = _font(11), 13, max(20, tile // 6)
    captions = []
    for s in studies:
        lines = [(f"{s['id']} ({s['split']})", (235, 235, 235))]
        for f in s["findings"]:
            colour = colours.get(f["kind"], (255, 255, 255))
            lines += [(("- " if j == 0 else "  ") + part, colour) for j, part in enumerate(_wrap(f["sentence"], chars - 2))]
        if not s["findings"]:
            lines.append(("no finding", (160, 160, 160)))
        captions.append(lines)
    text_h = line_h * max(len(c) for c in captions) + 6
    legend_h = 24
    rows = (len(studies) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (tile + 8) + 8, legend_h + rows * (tile + text_h + 8) + 8), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    x = 8
    for kind, colour in colours.items():
        draw.rectangle([x, 8, x + 12, 20], outline=colour, width=2)
        draw.text((x + 16, 7), kind, fill=(235, 235, 235), font=font)
        x += 22 + int(draw.textlength(kind, font=font)) + 12
    for k, (s, lines) in enumerate(zip(studies, captions)):
        ox = 8 + (k % columns) * (tile + 8)
        oy = legend_h + 8 + (k // columns) * (tile + text_h + 8)
        img = np.asarray(Image.open(data_dir / s["files"]["image"]), dtype=np.float32) / 65535.0
        size = img.shape[0]
        rgb = Image.fromarray((img * 255).astype(np.uint8)).convert("RGB").resize((tile, tile))
        sheet.paste(rgb, (ox, oy))
        scale = tile / size
        for f in s["findings"]:
            for bx, by, bw, bh in f["boxes"]:
                draw.rectangle([ox + bx * scale, oy + by * scale, ox + (bx + bw) * scale, oy + (by + bh) * scale],
                               outline=colours.get(f["kind"], (255, 255, 255)), width=2)  # fmt: skip
        for j, (line, colour) in enumerate(lines):
            draw.text((ox, oy + tile + 3 + line_h * j), line, fill=colour, font=font)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png
