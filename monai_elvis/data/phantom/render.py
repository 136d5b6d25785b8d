"""Rendering a phantom study: line integrals to a frontal radiograph with pose, elastic and intensity variety."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from monai_elvis.data.phantom.anatomy import LOBES, PhantomAnatomy

__all__ = ["RenderSettings", "render", "display_window"]


@dataclass
class RenderSettings:
    """Ranges of the per-study variety (all sampled uniformly)."""

    rotate_degrees: float = 5.0
    scale: tuple[float, float] = (0.92, 1.08)
    translate: float = 0.04  # fraction of the field of view
    elastic_mm: float = 4.0  # std of the coarse displacement field
    elastic_points: int = 5
    window_jitter: float = 0.05
    gamma: tuple[float, float] = (0.8, 1.25)
    noise: tuple[float, float] = (0.004, 0.02)
    lesion_blur_px: float = 1.2  # Gaussian sigma on the working grid


def display_window(anat: PhantomAnatomy) -> tuple[float, float]:
    """Display window from the normal anatomy: the darkest lung integral to the densest 0.3%."""
    cache = anat.__dict__.setdefault("_window", {})
    if "w" not in cache:
        base = anat.base_projection
        lungs = np.zeros(base.shape, bool)
        for name in LOBES:
            lungs |= anat.structure_projection(name)
        cache["w"] = (float(np.percentile(base[lungs], 2)), float(np.percentile(base, 99.7)))
    return cache["w"]


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
    # lesion edges are soft in a radiograph (partial volume, motion): blur the added integral a little
    integral = base + gaussian_filter(sum(deltas), s.lesion_blur_px) if deltas else base
    zdim, xdim = base.shape
    dx, dz = anat.spacing[0], anat.spacing[2]
    width_mm, height_mm = xdim * dx, zdim * dz
    fov = max(width_mm, height_mm)
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
    grid = torch.stack([u / (width_mm / 2), v / (height_mm / 2)], dim=-1)[None].float()
    stack = np.stack([integral, *[m.astype(np.float32) for m in masks]])[None]
    warped = F.grid_sample(torch.from_numpy(stack), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    lo, hi = display_window(anat)
    if augment:
        lo *= 1 + rng.uniform(-s.window_jitter, s.window_jitter)
        hi *= 1 + rng.uniform(-s.window_jitter, s.window_jitter)
    image = ((warped[0].numpy() - lo) / (hi - lo)).clip(0, 1)
    if augment:
        image = image ** rng.uniform(*s.gamma)
        image = image + rng.normal(0, rng.uniform(*s.noise), image.shape)
    return image.clip(0, 1).astype(np.float32), warped[1:].numpy() > 0.5
