"""Lesions inserted in 3D inside named structures of the phantom's anatomy, and their projections."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from monai_elvis.data.phantom.anatomy import HU_WATER_MU, LOBES, PhantomAnatomy

__all__ = ["Finding", "FINDING_TYPES", "FindingSettings", "Difficulty", "DIFFICULTIES", "sample_finding", "warm_up"]

FINDING_TYPES = ("nodule", "opacity", "effusion", "pneumothorax", "cardiomegaly", "atelectasis")
LUNGS = {"right": [n for n, (s, _) in LOBES.items() if s == "right"], "left": [n for n, (s, _) in LOBES.items() if s == "left"]}
LOWER_LOBE = {"right": "lung_lower_lobe_right", "left": "lung_lower_lobe_left"}
NODULE_MAX_MM = 28.0  # largest solid nodule (before FindingSettings.size_scale); larger lesions are masses


@dataclass(frozen=True)
class FindingSettings:
    """How conspicuous the inserted findings are.

    Attributes:
        contrast: factor on each lesion's change of the line integral (1: the attenuation of the inserted
            tissue; larger: denser lesions, and deeper air for a pneumothorax).
        size_scale: factor on the sampled sizes of nodules and masses, opacities, pneumothoraces and
            atelectasis (effusions and cardiomegaly keep their sizes: they are already large).
        texture: share of an opacity's volume left aerated by a smooth random pattern, which makes it patchy
            and ill-defined, unlike a solid nodule (0: solid).
        lung_field: the least share of a nodule's, opacity's or atelectasis's projection that must lie in the
            open lung field (the lungs' projection outside the heart, mediastinum and diaphragm), where a
            radiograph shows it best (0: anywhere in its lobe, also behind the heart or below the dome).
        nodule_min_mm: the smallest diameter a solid nodule is drawn with, before ``size_scale`` (nodules are drawn
            uniformly between it and 28 mm; masses, from 30 to 55 mm, are not affected). At 8 mm, the realistic
            range, the smallest nodules of the easy phantom cover a few pixels at 128 px and look like the
            fragments of a patchy opacity.
    """

    contrast: float = 1.0
    size_scale: float = 1.0
    texture: float = 0.0
    lung_field: float = 0.0
    nodule_min_mm: float = 8.0

    def __post_init__(self) -> None:
        if self.contrast <= 0 or self.size_scale <= 0:
            raise ValueError(f"contrast and size_scale must be positive, got {self.contrast} and {self.size_scale}.")
        if not 0 <= self.texture < 1:
            raise ValueError(f"texture must be in [0, 1), got {self.texture}.")
        if not 0 <= self.lung_field <= 1:
            raise ValueError(f"lung_field must be in [0, 1], got {self.lung_field}.")
        if not 0 < self.nodule_min_mm <= NODULE_MAX_MM:
            raise ValueError(f"nodule_min_mm must be in (0, {NODULE_MAX_MM}], got {self.nodule_min_mm}.")


class Difficulty(str, Enum):
    """Named :class:`FindingSettings`: ``easy`` (the default: every kind is learnt by the tiny encoder at 128 px,
    see ``python -m monai_elvis.benchmarks phantom-probe``) and ``realistic`` (the inserted tissue's own
    attenuation and sizes; several kinds are then hard to see at a small resolution)."""

    EASY = "easy"
    REALISTIC = "realistic"


DIFFICULTIES: dict[str, FindingSettings] = {
    Difficulty.EASY.value: FindingSettings(contrast=4.0, size_scale=2.0, texture=0.5, lung_field=0.6, nodule_min_mm=15.0),
    Difficulty.REALISTIC.value: FindingSettings(contrast=1.0, size_scale=1.0),
}


@dataclass
class Finding:
    """One inserted lesion.

    Attributes:
        kind: one of :data:`FINDING_TYPES`.
        structure: the anatomical structures it lies in (TotalSegmentator names).
        side: ``"left"``, ``"right"`` or ``""`` (cardiomegaly).
        attributes: what the report says of it (lobe, zone, size, severity, ...).
        delta: ``[Z, X]`` change of the line integral (display layout of the working grid).
        mask: ``[Z, X]`` bool projection of the lesion.
        reference: ``[Z, X]`` bool projection of the structure it must lie in (for cardiomegaly: the enlarged
            heart, which contains the normal heart).
    """

    kind: str
    structure: list[str]
    side: str
    attributes: dict[str, Any] = field(default_factory=dict)
    delta: np.ndarray | None = None
    mask: np.ndarray | None = None
    reference: np.ndarray | None = None


def _mu(hu: float) -> float:
    return HU_WATER_MU * (1 + hu / 1000.0) if hu <= 0 else HU_WATER_MU * (1 + 1.5 * hu / 1000.0)


def _place(anat: PhantomAnatomy, region: np.ndarray, box: tuple[slice, slice, slice], target_hu: float | None):
    """Project ``region`` (bool, the shape of ``box``) replacing its attenuation by ``target_hu`` (None: air)."""
    mu = anat.mu[box]
    if target_hu is None:  # air: the tissue is removed
        delta3 = np.where(region, -mu, 0.0).astype(np.float32)
    else:  # a denser lesion replaces lung; tissue already denser is left as it is
        delta3 = np.where(region, np.maximum(_mu(target_hu) - mu, 0.0), 0.0).astype(np.float32)
    zdim, xdim = anat.mu.shape[2], anat.mu.shape[0]
    delta = np.zeros((zdim, xdim), np.float32)
    mask = np.zeros((zdim, xdim), bool)
    xs, _, zs = box
    rows = slice(zdim - zs.stop, zdim - zs.start)
    delta[rows, xs] = (delta3.sum(axis=1) * anat.spacing[1]).T[::-1]
    mask[rows, xs] = region.any(axis=1).T[::-1]
    return delta, mask


def _box(center: np.ndarray, radius: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    lo = np.maximum(0, np.floor(center - radius).astype(int))
    hi = np.minimum(shape, np.ceil(center + radius + 1).astype(int))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def _grid(box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.ogrid[box[0], box[1], box[2]]


def _zone(anat: PhantomAnatomy, mask: np.ndarray, side: str) -> str:
    lung = np.zeros_like(mask)
    for n in LUNGS[side]:
        lung |= anat.structure_projection(n)
    rows = np.flatnonzero(lung.any(axis=1))
    centre = np.flatnonzero(mask.any(axis=1)).mean()
    t = (centre - rows.min()) / max(1, rows.max() - rows.min())
    return "upper" if t < 1 / 3 else "mid" if t < 2 / 3 else "lower"


def _blob_in(anat: PhantomAnatomy, lobe: str, radii_mm: list[np.ndarray], offsets_mm: list[np.ndarray], rng,
             min_inside: float = 0.6) -> tuple[np.ndarray, tuple] | None:
    """Union of ellipsoids around a random voxel of ``lobe``, intersected with the lobe."""
    vox = anat.voxels(lobe)
    sp = np.asarray(anat.spacing)
    for _ in range(20):
        centre = vox[rng.integers(len(vox))].astype(float)
        extent = max(np.max(np.abs(o) + r) for r, o in zip(radii_mm, offsets_mm)) / sp
        box = _box(centre, extent, anat.mu.shape)
        gx, gy, gz = _grid(box)
        blob = np.zeros(tuple(s.stop - s.start for s in box), bool)
        for r, o in zip(radii_mm, offsets_mm):
            c = centre + o / sp
            blob |= (((gx - c[0]) * sp[0] / r[0]) ** 2 + ((gy - c[1]) * sp[1] / r[1]) ** 2
                     + ((gz - c[2]) * sp[2] / r[2]) ** 2) <= 1.0  # fmt: skip
        inside = blob & (anat.labels[box] == anat.structures[lobe])
        if blob.sum() and inside.sum() >= min_inside * blob.sum():
            return inside, box
    return None


def _nodule(anat, rng, scale: float = 1.0, min_mm: float = 8.0) -> Finding | None:
    lobe = rng.choice(list(LOBES))
    mass = rng.random() < 0.3
    diameter = float(rng.uniform(30, 55) if mass else rng.uniform(min_mm, NODULE_MAX_MM)) * scale
    radii = [diameter / 2 * rng.uniform(0.85, 1.15, 3) for _ in range(2)]
    offsets = [np.zeros(3), rng.normal(0, diameter / 8, 3)]
    got = _blob_in(anat, lobe, radii, offsets, rng, min_inside=0.75)
    if got is None:
        return None
    region, box = got
    delta, mask = _place(anat, region, box, float(rng.uniform(10, 60)))
    side, where = LOBES[lobe]
    size = f"{diameter / 10:.1f} cm" if mass else f"{round(diameter)} mm"
    return Finding("nodule", [lobe], side, {"lobe": where, "mass": mass, "size": size, "diameter_mm": round(diameter, 1)},
                   delta, mask, anat.structure_projection(lobe))  # fmt: skip


def _opacity(anat, rng, scale: float = 1.0, texture: float = 0.0) -> Finding | None:
    lobe = rng.choice(list(LOBES))
    n = int(rng.integers(3, 7))
    radii = [np.full(3, rng.uniform(10, 22)) * rng.uniform(0.8, 1.2, 3) * scale for _ in range(n)]
    offsets = [np.zeros(3)] + [rng.normal(0, 14, 3) * scale for _ in range(n - 1)]
    got = _blob_in(anat, lobe, radii, offsets, rng, min_inside=0.5)
    if got is None:
        return None
    region, box = got
    hu = float(rng.uniform(-400, 0))
    mask = None
    if texture > 0:  # the outline stays the whole region's; the density is patchy inside it
        _, mask = _place(anat, region, box, hu)
        pattern = gaussian_filter(rng.normal(size=region.shape), 2.0)
        region = region & (pattern > np.quantile(pattern[region], texture))
    delta, solid_mask = _place(anat, region, box, hu)
    mask = solid_mask if mask is None else mask
    side, where = LOBES[lobe]
    fraction = region.sum() / len(anat.voxels(lobe))
    severity = "focal" if fraction < 0.08 else "patchy" if fraction < 0.2 else "extensive"
    kind = "consolidation" if hu > -200 else "opacity"
    return Finding("opacity", [lobe], side, {"lobe": where, "zone": _zone(anat, mask, side), "severity": severity,
                                             "appearance": kind}, delta, mask, anat.structure_projection(lobe))  # fmt: skip


def _effusion(anat, rng, scale: float = 1.0) -> Finding | None:
    side = str(rng.choice(["left", "right"]))
    lobe = LOWER_LOBE[side]
    vox = anat.voxels(lobe)
    zmin, zmax = vox[:, 2].min(), vox[:, 2].max()
    size = str(rng.choice(["small", "moderate", "large"]))
    frac = {"small": (0.1, 0.18), "moderate": (0.18, 0.32), "large": (0.32, 0.5)}[size]
    level = zmin + rng.uniform(*frac) * (zmax - zmin)
    xmin, xmax = vox[:, 0].min(), vox[:, 0].max()
    box = (slice(int(xmin), int(xmax) + 1), slice(0, anat.mu.shape[1]), slice(int(zmin), int(level + 12 / anat.spacing[2]) + 1))
    gx, _, gz = _grid(box)
    lateral = (gx - xmin) / max(1, xmax - xmin) if side == "left" else (xmax - gx) / max(1, xmax - xmin)
    meniscus = level + lateral * 10.0 / anat.spacing[2]  # fluid climbs laterally
    region = (anat.labels[box] == anat.structures[lobe]) & (gz <= meniscus)
    if region.sum() < 50:
        return None
    delta, mask = _place(anat, region, box, 15.0)
    return Finding("effusion", [lobe], side, {"size": size}, delta, mask, anat.structure_projection(lobe))


def _lung_maps(anat: PhantomAnatomy, side: str):
    """One lung's mask, its top ``z`` per ``(x, y)``, its lateral edge ``x`` per slice ``z`` and ``z`` range (cached)."""
    cache = anat.__dict__.setdefault("_lung_maps", {})
    if side not in cache:
        lung = anat.mask(*LUNGS[side])
        top = np.where(lung, np.arange(lung.shape[2])[None, None, :], -1).max(axis=2)
        xs = np.arange(lung.shape[0])[:, None, None]
        # the lateral edge per slice: the pleural space along the chest wall as a radiograph sees it
        edge = np.where(lung, xs, -1).max(axis=(0, 1)) if side == "left" else np.where(lung, xs, 10**6).min(axis=(0, 1))
        zs = np.flatnonzero(lung.any(axis=(0, 1)))
        cache[side] = (lung, top, edge, int(zs.min()), int(zs.max()))
    return cache[side]


def _pneumothorax(anat, rng, scale: float = 1.0) -> Finding | None:
    side = str(rng.choice(["left", "right"]))
    where = str(rng.choice(["apical", "lateral"]))
    size = str(rng.choice(["small", "moderate", "large"]))
    depth = {"small": 8.0, "moderate": 16.0, "large": 28.0}[size] * rng.uniform(0.8, 1.2) * scale
    lung, top, edge, z_lo, z_hi = _lung_maps(anat, side)
    if where == "apical":
        zs = np.arange(lung.shape[2])[None, None, :]
        z0 = max(0, int(top.max() - depth / anat.spacing[2]) - 1)
        box = (slice(None), slice(None), slice(z0, lung.shape[2]))
        region = lung[box] & (zs[:, :, box[2]] > top[..., None] - depth / anat.spacing[2])
    else:
        xs = np.arange(lung.shape[0])[:, None, None]
        reach = depth / anat.spacing[0]
        far = (xs > edge[None, None, :] - reach) if side == "left" else (xs < edge[None, None, :] + reach)
        z0 = int(z_lo + 0.3 * (z_hi - z_lo))
        box = (slice(None), slice(None), slice(z0, lung.shape[2]))
        region = lung[box] & far[box]
    if region.sum() < 50:
        return None
    # tighten the box to the region
    z_off = box[2].start
    ranges = [np.flatnonzero(region.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
    tight = (slice(int(ranges[0][0]), int(ranges[0][-1]) + 1), slice(int(ranges[1][0]), int(ranges[1][-1]) + 1),
             slice(int(ranges[2][0]) + z_off, int(ranges[2][-1]) + 1 + z_off))  # fmt: skip
    region = region[tight[0], tight[1], slice(tight[2].start - z_off, tight[2].stop - z_off)]
    delta, mask = _place(anat, region, tight, None)
    ref = np.zeros_like(mask)
    for n in LUNGS[side]:
        ref |= anat.structure_projection(n)
    return Finding("pneumothorax", LUNGS[side], side, {"location": where, "size": size}, delta, mask, ref)


def _cardiomegaly(anat, rng, scale: float = 1.0) -> Finding | None:
    heart_vox = anat.voxels("heart")
    centre = heart_vox.mean(axis=0)
    scale = np.array([rng.uniform(1.15, 1.4), 1.08, rng.uniform(1.1, 1.25)])
    lo, hi = heart_vox.min(0), heart_vox.max(0)
    box = _box(centre, (hi - lo) / 2 * scale + 2, anat.mu.shape)
    gx, gy, gz = _grid(box)
    src = [np.clip(np.round(centre[i] + (g - centre[i]) / scale[i]).astype(int), 0, anat.mu.shape[i] - 1)
           for i, g in enumerate((gx, gy, gz))]  # fmt: skip
    enlarged = anat.labels[src[0], src[1], src[2]] == anat.structures["heart"]
    added = enlarged & (anat.labels[box] != anat.structures["heart"]) & (anat.hu[box] < 150)
    delta, _ = _place(anat, added, box, 40.0)
    _, mask = _place(anat, enlarged, box, 40.0)
    ratio = float(scale[0])
    severity = "mildly" if ratio < 1.22 else "moderately" if ratio < 1.32 else "markedly"
    return Finding("cardiomegaly", ["heart"], "", {"severity": severity, "scale": round(ratio, 3)}, delta, mask, mask.copy())


def _atelectasis(anat, rng, scale: float = 1.0) -> Finding | None:
    lobe = rng.choice(list(LOBES))
    vox = anat.voxels(lobe)
    zmin, zmax = vox[:, 2].min(), vox[:, 2].max()
    plate = rng.random() < 0.5
    if plate:
        z0 = zmin + rng.uniform(0.25, 0.65) * (zmax - zmin)
        thick = max(1.0, rng.uniform(4, 8) * scale / anat.spacing[2])
        box = (slice(0, anat.mu.shape[0]), slice(0, anat.mu.shape[1]), slice(int(z0), int(z0 + thick) + 1))
        region = anat.labels[box] == anat.structures[lobe]
    else:
        top = zmin + rng.uniform(0.25, 0.45) * (zmax - zmin)
        box = (slice(0, anat.mu.shape[0]), slice(0, anat.mu.shape[1]), slice(int(zmin), int(top) + 1))
        region = anat.labels[box] == anat.structures[lobe]
    if region.sum() < 50:
        return None
    delta, mask = _place(anat, region, box, float(rng.uniform(-150, 10)))
    side, where = LOBES[lobe]
    kind = "plate-like" if plate else "basilar" if "lower" in lobe else "subsegmental"
    return Finding("atelectasis", [lobe], side, {"lobe": where, "pattern": kind}, delta, mask, anat.structure_projection(lobe))


def lung_field(anat: PhantomAnatomy) -> np.ndarray:
    """``[Z, X]`` bool: the open lung field of the projection, the lungs' pixels whose normal line integral is in
    the lower 60% of the lungs' (outside the heart, mediastinum and diaphragm). Cached."""
    cache = anat.__dict__.setdefault("_lung_field", {})
    if "f" not in cache:
        lungs = np.zeros(anat.base_projection.shape, bool)
        for name in LOBES:
            lungs |= anat.structure_projection(name)
        base = anat.base_projection
        cache["f"] = lungs & (base <= np.percentile(base[lungs], 60)) & ~anat.structure_projection("heart")
    return cache["f"]


def warm_up(anat: PhantomAnatomy, settings=None) -> None:
    """Compute the per-anatomy caches the samplers and the renderer (with its ``RenderSettings``) use, before
    starting workers, so that they receive them filled."""
    for name in (*LOBES, "heart"):
        anat.voxels(name)
        anat.structure_projection(name)
    for side in LUNGS:
        _lung_maps(anat, side)
    lung_field(anat)
    from monai_elvis.data.phantom.render import RenderSettings, display_window

    s = settings or RenderSettings()
    display_window(anat, s.framing, s.margin)


_SAMPLERS = {
    "nodule": _nodule, "opacity": _opacity, "effusion": _effusion, "pneumothorax": _pneumothorax,
    "cardiomegaly": _cardiomegaly, "atelectasis": _atelectasis,
}  # fmt: skip


_IN_LUNG_FIELD = ("nodule", "opacity", "atelectasis")


def sample_finding(kind: str, anat: PhantomAnatomy, rng: np.random.Generator,
                   settings: FindingSettings | None = None) -> Finding:  # fmt: skip
    """Insert one finding of ``kind`` at a random place that fits; raises ``RuntimeError`` if none fits.

    ``settings`` (default: realistic, ``FindingSettings()``) scales its size and its contrast."""
    s = settings or FindingSettings()
    if s.lung_field > 0 and kind in _IN_LUNG_FIELD:
        field = lung_field(anat)
        for _ in range(20):
            f = sample_finding(kind, anat, rng, replace(s, lung_field=0.0))
            if (f.mask & field).sum() >= s.lung_field * f.mask.sum():
                return f
        return f  # rare: no place in the open field after 20 tries; keep the last one
    for attempt in range(8):
        # a lesion scaled up may not fit its lobe (the middle lobe is small): shrink it towards its realistic size
        scale = s.size_scale if attempt < 3 or s.size_scale <= 1 else max(1.0, s.size_scale * 0.8 ** (attempt - 2))
        if kind == "opacity":
            f = _opacity(anat, rng, scale, s.texture)
        elif kind == "nodule":
            f = _nodule(anat, rng, scale, s.nodule_min_mm)
        else:
            f = _SAMPLERS[kind](anat, rng, scale)
        if f is not None and f.mask.any():
            if s.contrast != 1.0:
                f.delta = f.delta * np.float32(s.contrast)
            return f
    raise RuntimeError(f"could not place a {kind} in {anat.source}.")
