"""The library's transform presets."""

from __future__ import annotations

import math

import torch
from monai.transforms import Compose, RandAffined

from monai_elvis.transforms import cxr_augmentation


def test_augmentation_caches_its_grid_and_gives_the_same_images():
    """``cxr_augmentation``'s affine makes its sampling grid once (``cache_grid``, a 4x faster transform at 128 px);
    the images and masks are those of the same affine with a grid made at every call, bit for bit, seed by seed."""
    size = 32
    augment = Compose(cxr_augmentation(size, label_keys=["label"], prob=1.0))
    affine = augment.transforms[0]
    assert isinstance(affine, RandAffined) and affine.rand_affine._cached_grid is not None
    fresh = RandAffined(["image", "label"], prob=1.0, rotate_range=math.radians(5.0), scale_range=(0.1, 0.1),
                        translate_range=(0.05 * size, 0.05 * size), mode=["bilinear", "nearest"], padding_mode="zeros")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, size, size, generator=g)
    data = {"image": image, "label": (image > 0.7).float()}
    for seed in range(5):
        affine.set_random_state(seed), fresh.set_random_state(seed)
        a, b = affine(dict(data)), fresh(dict(data))
        assert not torch.equal(torch.as_tensor(a["image"]), image)  # the affine moved the image
        for key in ("image", "label"):
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), (seed, key)
