"""Phantom chest radiographs with reports and ground truth, rendered from a real chest CT.

``python -m monai_elvis.data.phantom --out DIR --num N --size 256 --seed S`` writes a dataset; see
:func:`write_phantom` for the layout. Every bundle of monai-elvis runs on it by default.
"""

from monai_elvis.data.phantom.anatomy import AnatomyError, PhantomAnatomy, default_ct_files
from monai_elvis.data.phantom.findings import DIFFICULTIES, FINDING_TYPES, Difficulty, Finding, FindingSettings, sample_finding
from monai_elvis.data.phantom.generator import PhantomGenerator, PhantomStudy, lesion_contrast
from monai_elvis.data.phantom.render import Framing, RenderSettings, render
from monai_elvis.data.phantom.reports import MS_CXR_CATEGORY, compose_report
from monai_elvis.data.phantom.writer import MS_CXR_COLUMNS, PhantomWorkerError, draw_contact_sheet, write_phantom

__all__ = [
    "AnatomyError", "PhantomAnatomy", "default_ct_files", "FINDING_TYPES", "Finding", "FindingSettings", "Difficulty",
    "DIFFICULTIES", "Framing", "sample_finding",
    "PhantomGenerator", "PhantomStudy", "lesion_contrast", "RenderSettings", "render", "MS_CXR_CATEGORY", "compose_report",
    "MS_CXR_COLUMNS", "PhantomWorkerError", "draw_contact_sheet", "write_phantom", "prepare_phantom",
    "progress_logger",
]  # fmt: skip


def progress_logger(every: int = 200, name: str = "monai_elvis.phantom"):
    """A ``progress(done, total, seconds)`` callback for :func:`prepare_phantom` / :func:`write_phantom` that logs
    one line every ``every`` studies (and at the end) with the rate and the time left."""
    import logging

    log = logging.getLogger(name)

    def progress(done: int, total: int, seconds: float) -> None:
        if done % every == 0 or done == total:
            rate = done / max(seconds, 1e-9)
            log.info("phantom: %d/%d studies written, %.1f per s, about %.0f s left", done, total, rate,
                     (total - done) / max(rate, 1e-9))  # fmt: skip

    return progress


def prepare_phantom(out, num: int = 2000, size: int = 256, seed: int = 0, workers: int = 2, cache=None,
                    difficulty: str = "easy", framing: str = "thorax", progress=None) -> dict:  # fmt: skip
    """Write the default phantom dataset into ``out`` unless ``out/datalist.json`` already exists (idempotent);
    returns the writer's summary, or ``{"existing": True}``.

    An existing folder made with another difficulty, framing or finding settings (:class:`FindingSettings`, which
    change between versions of this package) is refused with a ``ValueError`` that names them:
    reusing it would silently train on other kinds of images. One of another number, size or seed is used as it
    is, with a warning that names the differences (``"differs"`` in the returned dict). ``progress(done, total,
    seconds)`` is called as studies are written."""
    import json
    from pathlib import Path

    from dataclasses import asdict

    out = Path(out)
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}.")
    wanted = {"num": num, "size": size, "seed": seed, "difficulty": difficulty, "framing": framing,
              "findings": asdict(DIFFICULTIES[difficulty])}  # fmt: skip
    if (out / "datalist.json").is_file():
        try:
            meta = json.loads((out / "phantom.json").read_text())
            settings = meta["settings"]
            have = {"num": len(meta["studies"]), "size": settings["size"], "seed": settings["seed"],
                    "difficulty": settings.get("difficulty", "realistic"),
                    "framing": settings.get("render", {}).get("framing", "full"),
                    "findings": {**asdict(FindingSettings()), **settings.get("findings", {})}}  # fmt: skip
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{out} has a datalist.json but no readable phantom.json ({e}); delete the folder to "
                             "have the phantom written again, or point dataset_dir elsewhere.") from e  # fmt: skip
        differ = {k: (have[k], v) for k, v in wanted.items() if have[k] != v}
        said = ", ".join(f"{k} {a!r} (wanted {b!r})" for k, (a, b) in differ.items())
        if {"difficulty", "framing", "findings"} & set(differ):  # other images: training on them would mislead
            raise ValueError(f"the phantom in {out} was made with other settings: {said}. Delete {out} to have it "
                             "written again with these settings, or choose another folder (dataset_dir).")  # fmt: skip
        if differ:  # the same kind of data, of another size: used as it is, and said so
            import logging

            logging.getLogger("monai_elvis.phantom").warning(
                "using the existing phantom in %s, made with other settings: %s; delete it to have it written "
                "again with these.", out, said)  # fmt: skip
        return {"existing": True, **({"differs": said} if differ else {})}
    generator = PhantomGenerator(PhantomAnatomy.default(cache), size=size, seed=seed, difficulty=difficulty,
                                 settings=RenderSettings(framing=Framing(framing).value))  # fmt: skip
    import logging

    logging.getLogger("monai_elvis.phantom").info(
        "writing the %s phantom (%d studies at %d px) into %s: done once, about a minute per 1,000 studies on "
        "2 CPU cores", difficulty, num, size, out)  # fmt: skip
    return write_phantom(out, generator, num, workers=workers, progress=progress)
