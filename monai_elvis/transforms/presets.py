"""Standard pipelines for chest radiographs: aspect-preserving resize and pad, intensity standardisation,
and the pre-training augmentation set (never a horizontal flip: laterality lives in the report).

The bundles write these out as transform lists (``train#deterministic_transforms``, ``train#random_transforms``,
``preprocessing`` of the inference configs), so that one transform can be overridden from the command line;
``tests/test_bundle_zoo.py`` checks that every such list gives the same images as these functions."""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.transforms import (
    MapTransform,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianSmoothd,
    Resized,
    SpatialPadd,
)

from monai_elvis.keys import Keys

__all__ = ["cxr_spatial_intensity", "cxr_augmentation"]


def cxr_spatial_intensity(
    size: int = 224, image_key: str = Keys.IMAGE, label_keys: Sequence[str] = ()
) -> list[MapTransform]:
    """Resize so the longer side is ``size`` (aspect kept), z-score the image, pad to ``size x size``.

    Labels (masks) follow with nearest-neighbour interpolation. Input ``[1, H, W]`` -> ``[1, size, size]``.
    """
    keys = [image_key, *label_keys]
    modes = ["area"] + ["nearest"] * len(label_keys)
    return [
        Resized(keys, spatial_size=size, size_mode="longest", mode=modes),
        NormalizeIntensityd(image_key),
        SpatialPadd(keys, spatial_size=(size, size), method="symmetric", mode="constant"),
    ]


def cxr_augmentation(
    size: int = 224,
    image_key: str = Keys.IMAGE,
    label_keys: Sequence[str] = (),
    prob: float = 0.5,
    rotate_degrees: float = 5.0,
    scale: float = 0.1,
    translate: float = 0.05,
    blur_sigma: tuple[float, float] = (0.25, 1.0),
    contrast_gamma: tuple[float, float] = (0.7, 1.5),
) -> list[MapTransform]:
    """Affine (rotation, scale, translation as a fraction of ``size``), Gaussian blur and gamma contrast.

    There is deliberately no flip: left and right are named in the reports. Put it after
    :func:`cxr_spatial_intensity`: the affine's output is ``size`` x ``size`` (its sampling grid is made once, for
    that size), the shape :func:`cxr_spatial_intensity` pads every image to; a larger input would be cropped.
    """
    keys = [image_key, *label_keys]
    return [
        RandAffined(
            keys,
            prob=prob,
            rotate_range=math.radians(rotate_degrees),
            scale_range=(scale, scale),
            translate_range=(translate * size, translate * size),
            mode=["bilinear"] + ["nearest"] * len(label_keys),
            padding_mode="zeros",
            spatial_size=(size, size),
            cache_grid=True,  # the same output, with the sampling grid made once (inputs are padded to size x size)
        ),
        RandGaussianSmoothd(image_key, sigma_x=blur_sigma, sigma_y=blur_sigma, prob=prob / 2),
        RandAdjustContrastd(image_key, prob=prob, gamma=contrast_gamma),
    ]
