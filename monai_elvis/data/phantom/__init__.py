"""Phantom chest radiographs with reports and ground truth, rendered from a real chest CT.

``python -m monai_elvis.data.phantom --out DIR --num N --size 256 --seed S`` writes a dataset; see
:func:`write_phantom` for the layout. Every bundle of monai-elvis runs on it by default.
"""

from monai_elvis.data.phantom.anatomy import AnatomyError, PhantomAnatomy, default_ct_files
from monai_elvis.data.phantom.findings import FINDING_TYPES, Finding, sample_finding
from monai_elvis.data.phantom.generator import PhantomGenerator, PhantomStudy
from monai_elvis.data.phantom.render import RenderSettings, render
from monai_elvis.data.phantom.reports import MS_CXR_CATEGORY, compose_report
from monai_elvis.data.phantom.writer import MS_CXR_COLUMNS, PhantomWorkerError, draw_contact_sheet, write_phantom

__all__ = [
    "AnatomyError", "PhantomAnatomy", "default_ct_files", "FINDING_TYPES", "Finding", "sample_finding",
    "PhantomGenerator", "PhantomStudy", "RenderSettings", "render", "MS_CXR_CATEGORY", "compose_report",
    "MS_CXR_COLUMNS", "PhantomWorkerError", "draw_contact_sheet", "write_phantom", "prepare_phantom",
]  # fmt: skip


def prepare_phantom(out, num: int = 2000, size: int = 256, seed: int = 0, workers: int = 2, cache=None) -> dict:
    """Write the default phantom dataset into ``out`` unless ``out/datalist.json`` already exists (idempotent);
    returns the writer's summary, or ``{"existing": True}``."""
    from pathlib import Path

    if (Path(out) / "datalist.json").is_file():
        return {"existing": True}
    generator = PhantomGenerator(PhantomAnatomy.default(cache), size=size, seed=seed)
    return write_phantom(out, generator, num, workers=workers)
