"""Rendering a phantom study: line integrals to a frontal radiograph with pose, elastic and intensity variety."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from monai_elvis.data.phantom.anatomy import LOBES, PhantomAnatomy

__all__ = ["RenderSettings", "render", "display_window", "field_of_view", "Framing"]


class Framing(str, Enum):
    """What a rendered radiograph shows.

    - ``thorax``: a PA film's framing: the lungs, with a margin, fill the square field of view.
    - ``full``: the whole projection of the CT (for a chest CT that reaches the abdomen, the lungs fill only the
      upper part of the image).
    """

    THORAX = "thorax"
    FULL = "full"


@dataclass
class RenderSettings:
    """Ranges of the per-study variety (all sampled uniformly) and the framing.

    ``framing`` is a :class:`Framing`; ``margin`` is the border around the lungs' bounding box of the
    ``thorax`` framing, as a fraction of its larger side.
    """

    rotate_degrees: float = 5.0
    scale: tuple[float, float] = (0.92, 1.08)
    translate: float = 0.04  # fraction of the field of view
    elastic_mm: float = 4.0  # std of the coarse displacement field
    elastic_points: int = 5
    window_jitter: float = 0.05
    gamma: tuple[float, float] = (0.8, 1.25)
    noise: tuple[float, float] = (0.004, 0.02)
    lesion_blur_px: float = 1.2  # Gaussian sigma on the working grid
    framing: str = Framing.THORAX
    margin: float = 0.08


def field_of_view(anat: PhantomAnatomy, framing: str = Framing.THORAX, margin: float = 0.08) -> tuple[float, float, float]:
    """``(u, v, side)`` in mm: the centre of the square field of view relative to the centre of the projection
    (``u`` to the image's right, ``v`` down) and its side."""
    framing = Framing(framing)
    zdim, xdim = anat.base_projection.shape
    dx, dz = anat.spacing[0], anat.spacing[2]
    if framing == Framing.FULL:
        return 0.0, 0.0, max(xdim * dx, zdim * dz)
    cache = anat.__dict__.setdefault("_fov", {})
    key = (framing.value, round(margin, 6))
    if key not in cache:
        lungs = np.zeros((zdim, xdim), bool)
        for name in LOBES:
            lungs |= anat.structure_projection(name)
        rows, cols = np.flatnonzero(lungs.any(1)), np.flatnonzero(lungs.any(0))
        # pixel centres in mm from the projection's centre
        v0, v1 = (rows[0] + 0.5 - zdim / 2) * dz, (rows[-1] + 0.5 - zdim / 2) * dz
        u0, u1 = (cols[0] + 0.5 - xdim / 2) * dx, (cols[-1] + 0.5 - xdim / 2) * dx
        side = max(u1 - u0, v1 - v0) * (1 + 2 * margin)
        cache[key] = (float((u0 + u1) / 2), float((v0 + v1) / 2), float(side))
    return cache[key]


def display_window(anat: PhantomAnatomy, framing: str = Framing.THORAX, margin: float = 0.08) -> tuple[float, float]:
    """Display window from the normal anatomy: the darkest lung integral to the densest 0.3% of the framed area."""
    cache = anat.__dict__.setdefault("_window", {})
    key = (Framing(framing).value, round(margin, 6))
    if key not in cache:
        base = anat.base_projection
        lungs = np.zeros(base.shape, bool)
        for name in LOBES:
            lungs |= anat.structure_projection(name)
        cu, cv, side = field_of_view(anat, framing, margin)
        zdim, xdim = base.shape
        v = (np.arange(zdim) + 0.5 - zdim / 2) * anat.spacing[2] - cv
        u = (np.arange(xdim) + 0.5 - xdim / 2) * anat.spacing[0] - cu
        framed = (np.abs(v)[:, None] <= side / 2) & (np.abs(u)[None, :] <= side / 2)
        cache[key] = (float(np.percentile(base[lungs], 2)), float(np.percentile(base[framed], 99.7)))
    return cache[key]


def render(
    anat: PhantomAnatomy,
    deltas: list[np.ndarray],
    masks: list[np.ndarray],
    size: int,
    rng: np.random.Generator,
    settings: RenderSettings | None = None,
    augment: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one radiograph and warp its masks the same way.

    Args:
        deltas: ``[Z, X]`` line-integral changes (lesions) added to the anatomy's projection.
        masks: ``[Z, X]`` bool masks carried through the same geometry.
        size: output side ``S``.

    Returns:
        ``(image [S, S] float32 in [0, 1], masks [len(masks), S, S] bool)``.
    """
    s = settings or RenderSettings()
    base = anat.base_projection
    # lesion edges are soft in a radiograph (partial volume, motion): blur the added integral a little;
    # a line integral cannot fall below 0 (a strong air lesion removes at most the tissue on its path)
    integral = np.maximum(base + gaussian_filter(sum(deltas), s.lesion_blur_px), 0.0) if deltas else base
    zdim, xdim = base.shape
    dx, dz = anat.spacing[0], anat.spacing[2]
    width_mm, height_mm = xdim * dx, zdim * dz
    cu, cv, fov = field_of_view(anat, s.framing, s.margin)
    pix = fov / size
    c = (torch.arange(size, dtype=torch.float64) + 0.5 - size / 2) * pix
    v, u = torch.meshgrid(c, c, indexing="ij")  # v: down, u: right (mm from the centre)
    if augment:
        theta = math.radians(rng.uniform(-s.rotate_degrees, s.rotate_degrees))
        scale = rng.uniform(*s.scale)
        tu, tv = rng.uniform(-s.translate, s.translate, 2) * fov
        cos, sin = math.cos(theta), math.sin(theta)
        uu, vv = (u - tu) / scale, (v - tv) / scale
        u, v = cos * uu + sin * vv, -sin * uu + cos * vv
        if s.elastic_mm > 0:
            coarse = torch.from_numpy(rng.normal(0, s.elastic_mm, (1, 2, s.elastic_points, s.elastic_points)))
            field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)[0]
            u, v = u + field[0], v + field[1]
    grid = torch.stack([(u + cu) / (width_mm / 2), (v + cv) / (height_mm / 2)], dim=-1)[None].float()
    stack = np.stack([integral, *[m.astype(np.float32) for m in masks]])[None]
    warped = F.grid_sample(torch.from_numpy(stack), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    lo, hi = display_window(anat, s.framing, s.margin)
    if augment:
        lo *= 1 + rng.uniform(-s.window_jitter, s.window_jitter)
        hi *= 1 + rng.uniform(-s.window_jitter, s.window_jitter)
    image = ((warped[0].numpy() - lo) / (hi - lo)).clip(0, 1)
    if augment:
        image = image ** rng.uniform(*s.gamma)
        image = image + rng.normal(0, rng.uniform(*s.noise), image.shape)
    return image.clip(0, 1).astype(np.float32), warped[1:].numpy() > 0.5
