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
]  # fmt: skip


def prepare_phantom(out, num: int = 2000, size: int = 256, seed: int = 0, workers: int = 2, cache=None,
                    difficulty: str = "easy", framing: str = "thorax", progress=None) -> dict:  # fmt: skip
    """Write the default phantom dataset into ``out`` unless ``out/datalist.json`` already exists (idempotent);
    returns the writer's summary, or ``{"existing": True}``.

    An existing folder made with other settings (number, size, seed, difficulty, framing) is refused with a
    ``ValueError`` that names them: reusing it would silently train on other data. ``progress(done, total,
    seconds)`` is called as studies are written."""
    import json
    from pathlib import Path

    out = Path(out)
    wanted = {"num": num, "size": size, "seed": seed, "difficulty": difficulty, "framing": framing}
    if (out / "datalist.json").is_file():
        try:
            meta = json.loads((out / "phantom.json").read_text())
            settings = meta["settings"]
            have = {"num": len(meta["studies"]), "size": settings["size"], "seed": settings["seed"],
                    "difficulty": settings.get("difficulty", "realistic"),
                    "framing": settings.get("render", {}).get("framing", "full")}  # fmt: skip
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{out} has a datalist.json but no readable phantom.json ({e}); delete the folder to "
                             "have the phantom written again, or point dataset_dir elsewhere.") from e  # fmt: skip
        differ = {k: (have[k], v) for k, v in wanted.items() if have[k] != v}
        if differ:
            said = ", ".join(f"{k} {a!r} (wanted {b!r})" for k, (a, b) in differ.items())
            raise ValueError(f"the phantom in {out} was made with other settings: {said}. Delete {out} to have it "
                             "written again with these settings, or choose another folder (dataset_dir).")  # fmt: skip
        return {"existing": True}
    generator = PhantomGenerator(PhantomAnatomy.default(cache), size=size, seed=seed, difficulty=difficulty,
                                 settings=RenderSettings(framing=Framing(framing).value))  # fmt: skip
    return write_phantom(out, generator, num, workers=workers, progress=progress)
