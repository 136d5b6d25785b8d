"""Prepare a datalist's radiographs once, offline, for training at scale.

``python -m monai_elvis.data prepare --datalist IN --out DIR --size 512`` decodes every image of a datalist once
with :class:`~monai_elvis.transforms.LoadCXR` (DICOM with its modality and VOI LUT, MONOCHROME1 inverted; PNG;
JPEG), shrinks it so that its longest side is ``size`` (aspect ratio kept; never enlarged), and writes an 8- or
16-bit grayscale PNG under ``DIR/images/`` and a datalist ``DIR/datalist.json`` pointing at it. Every other key
of each entry is kept as it is.

Why the longest side: the training pipeline (:func:`~monai_elvis.transforms.cxr_spatial_intensity`) resizes the
longest side to the training size and pads, so an image whose longest side is 512 holds all the pixels any
training size up to 512 uses, and nothing it would throw away. A shortest-side resize (``side="shortest"``)
suits pipelines that crop a square instead; its files are larger (a 2500 x 3000 radiograph becomes 512 x 614).

Resumable: each image is written to ``NAME.png.partial`` and renamed when complete, and images whose output
exists are not done again, so a run that was stopped (even killed) continues where it was when started again with
the same command. ``DIR/prepare.json`` records the settings (a rerun with other settings into the same folder is
refused) and, at the end, the counts and every skipped file with its reason. An image that cannot be read (missing,
truncated, corrupt) is skipped, named in the log and counted by reason; the entries that use it are left out of
the new datalist.

Intensities: the loader's ``[0, 1]`` image is area-averaged (Pillow's box filter on float32 values) and rounded
to 0..255 (8 bit) or 0..65535 (16 bit); :class:`~monai_elvis.transforms.LoadCXR` reads them back as the same
``[0, 1]`` values.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monai_elvis.data.workers import in_spawned_main, spawn_can_run_main
from monai_elvis.errors import InputError, MissingInputError
from monai_elvis.keys import Keys

__all__ = ["prepare_datalist", "prepare_image", "prepared_datalist", "resized_shape", "PrepareSummary",
           "PrepareWorkerError", "PREPARE_FILE", "PREPARE_COMMAND"]  # fmt: skip

logger = logging.getLogger(__name__)

PREPARE_FILE = "prepare.json"
PREPARE_COMMAND = "python -m monai_elvis.data prepare --datalist IN.json --out DIR --size 512"
SIDES = ("longest", "shortest")
_PARTIAL = ".partial"
_GEOMETRIC_KEYS = (Keys.LABEL, Keys.BOXES, "mask")
_SETTINGS: dict[str, Any] = {}  # set in each worker process by _init_worker
_WORKER_HELP = (
    "The prepare workers are started with 'spawn': each one runs the main script again first, so a script that "
    "calls prepare_datalist at its top level (without an `if __name__ == \"__main__\":` guard) cannot start them. "
    "Put the call under `if __name__ == \"__main__\":`, or pass workers=1, or run `python -m monai_elvis.data "
    "prepare` instead. Images already written are kept: the same command continues where it stopped."
)


class PrepareWorkerError(RuntimeError):
    """A prepare worker process died (or could not start): raised instead of waiting for it forever."""


def resized_shape(shape: Sequence[int], size: int, side: str = "longest") -> tuple[int, int]:
    """``(rows, columns)`` of an image of ``shape`` whose ``side`` (longest or shortest) is shrunk to ``size``,
    the aspect ratio kept (the other side rounded); images already within ``size`` keep their shape."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}.")
    h, w = (int(s) for s in shape)
    ref = max(h, w) if side == "longest" else min(h, w)
    if ref <= size:
        return h, w
    scale = size / ref
    return (size if h == ref else max(1, round(h * scale))), (size if w == ref else max(1, round(w * scale)))


def prepare_image(src: str | os.PathLike, dst: str | os.PathLike, size: int = 512, bits: int = 8,
                  side: str = "longest", voi_lut: bool = True) -> tuple[tuple[int, int], tuple[int, int]]:  # fmt: skip
    """Read ``src`` with :class:`~monai_elvis.transforms.LoadCXR`, shrink it (see :func:`resized_shape`) and write
    it to ``dst`` as a ``bits``-bit grayscale PNG, atomically (``dst.partial`` then a rename). Returns the
    original and the written ``(rows, columns)``.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        CXRLoadError: ``src`` is truncated, corrupt or not a grayscale radiograph.
    """
    from PIL import Image

    from monai_elvis.transforms.io import LoadCXR

    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}.")
    image = np.ascontiguousarray(LoadCXR(voi_lut=voi_lut)(src)[0].numpy().T)  # (x, y) -> the file's (rows, columns)
    original = (int(image.shape[0]), int(image.shape[1]))
    shape = resized_shape(original, size, side)
    if shape != original:  # box filter = the mean over each output pixel's footprint (area interpolation)
        image = np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), Image.Resampling.BOX))
    top = 255 if bits == 8 else 65535
    pixels = np.clip(np.rint(image * np.float32(top)), 0, top).astype(np.uint8 if bits == 8 else np.uint16)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(dst.name + _PARTIAL)
    Image.fromarray(pixels).save(partial, format="PNG")
    os.replace(partial, dst)
    return original, shape


def _init_worker(settings: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(1)
    _SETTINGS.clear()
    _SETTINGS.update(settings)


def _skip_reason(error: BaseException) -> str:
    return "missing" if isinstance(error, FileNotFoundError) else "unreadable"


def _prepare_batch(tasks: Sequence[tuple[str, str]]) -> list[tuple[str, str | None, str]]:
    """Prepare each ``(source, destination)``; one ``(source, reason or None, message)`` per task. Only reading
    errors are caught (the file is skipped); a failure to write stops the run."""
    from monai_elvis.transforms.io import CXRLoadError

    results = []
    for src, dst in tasks:
        try:
            prepare_image(src, dst, **_SETTINGS)
            results.append((src, None, ""))
        except (FileNotFoundError, CXRLoadError) as e:
            results.append((src, _skip_reason(e), str(e)))
    return results


@dataclass
class PrepareSummary:
    """What :func:`prepare_datalist` did: images written, found already done and skipped (per reason), the
    entries kept per split and dropped, the time taken."""

    out: str
    images: int = 0
    written: int = 0
    already_done: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_files: list = field(default_factory=list)
    entries: dict = field(default_factory=dict)
    dropped_entries: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.images, "written": self.written, "already_done": self.already_done,
                "skipped": dict(self.skipped), "entries": self.entries, "dropped_entries": self.dropped_entries,
                "seconds": round(self.seconds, 2), "skipped_files": self.skipped_files}  # fmt: skip

    def __str__(self) -> str:
        rate = self.written / max(self.seconds, 1e-9)
        text = (f"prepared {self.images} images into {self.out}: {self.written} written ({rate:.1f} per s), "
                f"{self.already_done} already done, {sum(self.skipped.values())} skipped")  # fmt: skip
        if self.skipped:
            text += " (" + ", ".join(f"{n} {r}" for r, n in self.skipped.most_common()) + ")"
        kept = ", ".join(f"{k} {v}" for k, v in self.entries.items())
        return text + f"; datalist entries kept: {kept}; dropped (unreadable image): {self.dropped_entries}"


def _read_datalist(datalist: str | os.PathLike | dict | list) -> tuple[dict | list, Path | None]:
    if isinstance(datalist, (dict, list)):
        return datalist, None
    path = Path(datalist)
    if not path.is_file():
        raise MissingInputError(f"datalist not found: {path}. Make one with `python -m monai_elvis.data "
                                "{mimic-cxr,ms-cxr,siim,rsna,iu-xray} --root DIR --out datalist.json`.")  # fmt: skip
    try:
        return json.loads(path.read_text(encoding="utf-8")), path.parent
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"datalist {path} is not valid JSON: {e}") from e


def _output_name(src: Path, base_dir: Path) -> str:
    """``images/<path relative to base_dir>`` with the suffix ``.png`` (a path outside ``base_dir`` keeps its
    absolute folders under ``images/_root/``)."""
    try:
        rel = src.relative_to(base_dir)
    except ValueError:
        rel = Path("_root") / src.relative_to(src.anchor)
    return (Path("images") / rel).with_suffix(".png").as_posix()


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to continue a folder prepared with other settings (its files would be mixed with the new ones)."""
    record = out / PREPARE_FILE
    if not record.is_file():
        return
    try:
        have = json.loads(record.read_text(encoding="utf-8")).get("settings", {})
    except (OSError, ValueError):
        return
    differ = [f"{k} {have.get(k)!r} (wanted {v!r})" for k, v in settings.items() if have.get(k) != v]
    if differ:
        raise InputError(f"{out} was prepared with other settings: {', '.join(differ)}. Give another --out folder, "
                         "or delete this one to prepare it again.")  # fmt: skip


def prepare_datalist(
    datalist: str | os.PathLike | dict | list,
    out: str | os.PathLike,
    size: int = 512,
    bits: int = 8,
    side: str = "longest",
    keys: Sequence[str] = (Keys.IMAGE,),
    base_dir: str | os.PathLike | None = None,
    workers: int = 1,
    voi_lut: bool = True,
    log_every: float = 30.0,
    progress: Callable[[int, int, float], None] | None = None,
) -> PrepareSummary:
    """Prepare every image of ``datalist`` under ``keys`` into ``out`` and write ``out/datalist.json``.

    Args:
        datalist: a datalist JSON path, or its content: ``{"training": [...], ...}`` or a list of entries.
        out: the output folder: ``images/`` (the prepared PNGs, in the sources' folder layout relative to
            ``base_dir``), ``datalist.json`` (paths relative to ``out``), ``prepare.json`` (settings, counts,
            skipped files).
        size, side: the longest (or shortest) side of the prepared images, see :func:`resized_shape`.
        bits: 8 or 16 (PNG bit depth).
        keys: the entries' keys that hold image paths.
        base_dir: the folder relative paths refer to (default: the datalist file's folder, or the working
            directory for a datalist given as content).
        workers: processes ("spawn"; 1 = in this process). A worker that dies stops the call with a
            :class:`PrepareWorkerError`; a script read from stdin (``python -``) prepares in its own process.
        voi_lut: apply the DICOM VOI LUT / window.
        log_every: seconds between progress log lines (``logging``, logger ``monai_elvis.data.prepare``).
        progress: also called as ``progress(done, total, seconds)`` after each batch of images.
    """
    if workers > 1 and in_spawned_main():
        raise PrepareWorkerError("a prepare worker is running the main script again. " + _WORKER_HELP)
    if size < 2:
        raise InputError(f"--size must be at least 2, got {size}.")
    if bits not in (8, 16):
        raise InputError(f"--bits must be 8 or 16, got {bits}.")
    if side not in SIDES:
        raise InputError(f"--side must be one of {', '.join(SIDES)}, got {side!r}.")
    content, folder = _read_datalist(datalist)
    base = Path(base_dir) if base_dir is not None else (folder if folder is not None else Path.cwd())
    out = Path(out)
    if out.resolve() == base.resolve():
        raise InputError(f"--out {out} is the datalist's own folder: give a new folder for the prepared images.")
    splits: dict[str, list] = content if isinstance(content, dict) else {"": content}
    if not all(isinstance(v, list) for v in splits.values()):
        raise InputError("the datalist must be a list of entries or a dict of lists of entries (training, validation,"
                         " test).")  # fmt: skip
    settings = {"size": int(size), "bits": int(bits), "side": side, "voi_lut": bool(voi_lut)}
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, settings)
    _atomic_json(out / PREPARE_FILE, {"settings": settings, "complete": False})

    # every distinct source once, with its output name; two sources may not share one
    names: dict[str, str] = {}
    owner: dict[str, str] = {}
    for split, entries in splits.items():
        for i, entry in enumerate(entries):
            for key in keys:
                value = entry.get(key) if isinstance(entry, dict) else None
                if not isinstance(value, str):
                    continue
                src = str(base / value)
                if src in names:
                    continue
                name = _output_name(Path(os.path.normpath(src)), Path(os.path.normpath(base)))
                if name in owner:
                    raise InputError(f"{owner[name]} and {src} would both be prepared as {out / name}: rename one.")
                names[src], owner[name] = name, src
    geometric = sorted({k for entries in splits.values() for e in entries if isinstance(e, dict) for k in e
                        if k in _GEOMETRIC_KEYS and k not in keys})  # fmt: skip
    if geometric:
        logger.warning("prepare: the entries' %s are kept as they are: they refer to the original images (their "
                       "folder and pixel size), not to the prepared ones. The prepare step is meant for image-report "
                       "datalists (pre-training).", ", ".join(repr(k) for k in geometric))  # fmt: skip
    summary = PrepareSummary(out=str(out), images=len(names))
    todo = [(src, str(out / name)) for src, name in names.items() if not (out / name).is_file()]
    summary.already_done = len(names) - len(todo)
    logger.info("prepare: %d images, %d already done, %d to write into %s (size %d, %s side, %d bit, %d worker(s))",
                len(names), summary.already_done, len(todo), out, size, side, bits, max(1, workers))  # fmt: skip
    failed = _run(todo, settings, workers, summary, log_every, progress)

    prepared: dict[str, list] = {}
    for split, entries in splits.items():
        kept = []
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            srcs = {key: str(base / entry[key]) for key in keys if isinstance(entry.get(key), str)}
            if any(s in failed for s in srcs.values()):
                summary.dropped_entries += 1
                continue
            kept.append({**entry, **{key: names[s] for key, s in srcs.items()}})
        prepared[split] = kept
        summary.entries[split or "entries"] = len(kept)
    _atomic_json(out / "datalist.json", prepared if isinstance(content, dict) else prepared[""])
    _atomic_json(out / PREPARE_FILE, {"settings": settings, "complete": True, "source": str(datalist) if folder else None,
                                      "base_dir": str(base), "summary": summary.as_dict()})  # fmt: skip
    logger.info("%s", summary)
    return summary


def _run(todo: list[tuple[str, str]], settings: dict[str, Any], workers: int, summary: PrepareSummary,
         log_every: float, progress: Callable[[int, int, float], None] | None) -> dict[str, tuple[str, str]]:  # fmt: skip
    """Prepare ``todo`` in batches, in this process or in ``workers`` spawned processes; returns the skipped
    sources with their reason and message, and fills ``summary``."""
    failed: dict[str, tuple[str, str]] = {}
    start = last_log = time.perf_counter()
    total = len(todo)
    batch = 16
    batches = [todo[i : i + batch] for i in range(0, total, batch)]

    def account(results: Iterable[tuple[str, str | None, str]]) -> None:
        nonlocal last_log
        for src, reason, message in results:
            if reason is None:
                summary.written += 1
                continue
            failed[src] = (reason, message)
            summary.skipped[reason] += 1
            summary.skipped_files.append({"file": src, "reason": reason, "error": message})
            logger.warning("prepare: skipped %s (%s): %s", src, reason, message)
        done = summary.written + sum(summary.skipped.values())
        now = time.perf_counter()
        summary.seconds = now - start
        if progress:
            progress(done, total, summary.seconds)
        if now - last_log >= log_every or done == total:
            last_log = now
            rate = done / max(summary.seconds, 1e-9)
            logger.info("prepare: %d/%d images done, %.1f per s, about %.0f s left (%d skipped so far)", done, total,
                        rate, (total - done) / max(rate, 1e-9), sum(summary.skipped.values()))  # fmt: skip

    if workers > 1 and len(batches) > 1:
        if not spawn_can_run_main():
            logger.warning("the main script was read from stdin, where worker processes cannot start: preparing the "
                           "images in this process (workers=1)")  # fmt: skip
            workers = 1
    if workers <= 1 or len(batches) <= 1:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _SETTINGS.clear()
            _SETTINGS.update(settings)
            for tasks in batches:
                account(_prepare_batch(tasks))
        finally:
            torch.set_num_threads(threads)
        summary.seconds = time.perf_counter() - start
        return failed

    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    # spawn, not fork, and an executor, not multiprocessing.Pool: see monai_elvis.data.workers. At most a few
    # batches per worker are in flight, so that a dataset of any size costs no memory in the parent.
    ctx = mp.get_context("spawn")
    pending = iter(batches)
    try:
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(settings,)) as pool:
            running = set()
            for tasks in pending:
                running.add(pool.submit(_prepare_batch, tasks))
                if len(running) >= 4 * workers:
                    finished, running = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        account(future.result())
            for future in running:
                account(future.result())
    except BrokenProcessPool as e:
        done = summary.written + sum(summary.skipped.values())
        raise PrepareWorkerError(f"a prepare worker died after {done} of {total} images (its error, if any, is "
                                 f"printed above). {_WORKER_HELP}") from e  # fmt: skip
    summary.seconds = time.perf_counter() - start
    return failed


def prepared_datalist(dataset_dir: str | os.PathLike) -> str:
    """The path of ``dataset_dir/datalist.json`` written by :func:`prepare_datalist`; a
    :class:`~monai_elvis.errors.MissingInputError` that says how to make it when the folder was not prepared (or
    its preparation did not finish). For data overlays: ``"datalist": "$monai_elvis.data.prepared_datalist(@dataset_dir)"``."""
    folder = Path(dataset_dir)
    how = (f"Prepare it first (once): `python -m monai_elvis.data mimic-cxr --root MIMIC_ROOT --out "
           f"MIMIC_ROOT/datalist.json`, then `python -m monai_elvis.data prepare --datalist MIMIC_ROOT/datalist.json "
           f"--out {folder} --size 512`, and pass --dataset_dir {folder}.")  # fmt: skip
    record = folder / PREPARE_FILE
    if not record.is_file():
        raise MissingInputError(f"--dataset_dir {folder} is not a prepared dataset (no {PREPARE_FILE}). {how}")
    try:
        complete = bool(json.loads(record.read_text(encoding="utf-8")).get("complete"))
    except (OSError, ValueError):
        complete = False
    if not complete or not (folder / "datalist.json").is_file():
        raise MissingInputError(f"the preparation of {folder} did not finish: run the same prepare command again, "
                                f"it continues where it stopped. {how}")  # fmt: skip
    return str(folder / "datalist.json")
