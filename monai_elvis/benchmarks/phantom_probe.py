"""Can the default tiny image encoder see the phantom's findings? A supervised probe.

The default image encoder of the pre-training bundle (resnet18, width 0.125) is trained from scratch, with full
supervision, on the phantom's training split at the bundle's preprocessing (128 px), to say which finding kinds
a study has and on which side each lies. Its test AUC per kind bounds what a contrastive objective can learn
from the same pixels: a kind the probe cannot see, pre-training will not align with its sentence.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import load_decathlon_datalist
from monai.metrics import compute_roc_auc
from monai.transforms import Compose
from torch import nn

from monai_elvis.data.phantom.findings import FINDING_TYPES
from monai_elvis.networks import CXRImageEncoder
from monai_elvis.transforms import LoadCXRd, cxr_spatial_intensity

__all__ = ["PhantomProbe", "phantom_labels", "run_phantom_probe", "side_accuracy"]

SIDES = ("left", "right")


def phantom_labels(phantom_json: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{study id: (presence [K], side [K])}`` from a phantom's ``phantom.json``, ``K = len(FINDING_TYPES)``.

    ``presence`` is 1 for each finding kind in the study; ``side`` is 1 (right), 0 (left) or NaN (kind absent,
    or without a side: cardiomegaly)."""
    studies = json.loads(Path(phantom_json).read_text())["studies"]
    out = {}
    for s in studies:
        presence = np.zeros(len(FINDING_TYPES), np.float32)
        side = np.full(len(FINDING_TYPES), np.nan, np.float32)
        for f in s["findings"]:
            k = FINDING_TYPES.index(f["kind"])
            presence[k] = 1.0
            if f["side"] in SIDES:
                side[k] = float(SIDES.index(f["side"]))
        out[s["id"]] = (presence, side)
    return out


def side_accuracy(logits: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """Per kind, the share of studies with a sided finding of that kind whose side logit has the right sign
    (``> 0``: right). ``logits``, ``side`` ``[N, K]`` (``side`` NaN where there is nothing to score) -> ``[K]``,
    NaN for a kind with nothing to score."""
    valid = ~torch.isnan(side)
    correct = ((logits > 0).float() == torch.nan_to_num(side)) & valid
    return correct.sum(0) / valid.sum(0).clamp(min=1) + torch.where(valid.any(0), 0.0, float("nan"))


class PhantomProbe(nn.Module):
    """The tiny image encoder with a linear head on a 2x2 pooling of its last feature map: ``K`` presence logits
    and ``K`` side logits (``> 0``: right). ``[B, 1, H, W]`` -> ``(presence [B, K], side [B, K])``."""

    def __init__(self, num_kinds: int = len(FINDING_TYPES), arch: str = "resnet18", widen_factor: float = 0.125,
                 **encoder_kwargs) -> None:  # fmt: skip
        super().__init__()
        self.encoder = CXRImageEncoder(arch, 1, widen_factor, **encoder_kwargs)
        self.head = nn.Linear(4 * self.encoder.out_channels, 2 * num_kinds)
        self.num_kinds = num_kinds

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = F.adaptive_avg_pool2d(self.encoder.feature_map(x), 2).flatten(1)
        out = self.head(f)
        return out[:, : self.num_kinds], out[:, self.num_kinds :]


def _load_split(data_dir: Path, split: str, size: int, labels: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    items = load_decathlon_datalist(str(data_dir / "datalist.json"), True, split, base_dir=str(data_dir))
    load = Compose([LoadCXRd("image"), *cxr_spatial_intensity(size)])
    images, presence, side = [], [], []
    for item in items:
        images.append(torch.as_tensor(load({"image": item["image"]})["image"]).as_subclass(torch.Tensor))
        p, s = labels[item["id"]]
        presence.append(torch.from_numpy(p))
        side.append(torch.from_numpy(s))
    return torch.stack(images).float(), torch.stack(presence), torch.stack(side)


def median_contrast(data_dir: str | Path, split: str = "test") -> dict[str, float]:
    """Per finding kind, the median :func:`~monai_elvis.data.phantom.lesion_contrast` of the ``split``'s findings in
    the phantom at ``data_dir`` (each finding's mask against the ring around it, on the written image)."""
    from PIL import Image

    from monai_elvis.data.phantom import lesion_contrast

    data_dir = Path(data_dir)
    values: dict[str, list[float]] = {k: [] for k in FINDING_TYPES}
    for study in json.loads((data_dir / "phantom.json").read_text())["studies"]:
        if study.get("split") != split or not study["findings"]:
            continue
        image = np.asarray(Image.open(data_dir / study["files"]["image"]), np.float32)
        for f in study["findings"]:
            mask = np.asarray(Image.open(data_dir / f["mask"])) > 0
            values[f["kind"]].append(lesion_contrast(image, mask))
    return {k: round(float(np.nanmedian(v)), 2) if v else float("nan") for k, v in values.items()}


def random_affine(x: torch.Tensor, generator: torch.Generator, rotate_degrees: float = 5.0, scale: float = 0.1,
                  translate: float = 0.05) -> torch.Tensor:
    """A random rotation, scale and translation per image of ``x [B, C, H, W]`` (the ranges of
    :func:`~monai_elvis.transforms.cxr_augmentation`, no flip), bilinear, zeros outside."""
    b = x.shape[0]
    u = lambda r: (torch.rand(b, generator=generator) * 2 - 1) * r  # noqa: E731
    angle, s = torch.deg2rad(u(rotate_degrees)), 1 + u(scale)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, 2 * u(translate)], 1), torch.stack([sin, cos, 2 * u(translate)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def run_phantom_probe(
    data_dir: str | Path,
    image_size: int = 128,
    epochs: int = 60,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    seed: int = 0,
    encoder_kwargs: dict | None = None,
    augment: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Train :class:`PhantomProbe` on the phantom at ``data_dir`` (its ``datalist.json`` and ``phantom.json``) and
    score it on the test split.

    Returns ``{"records": [{"kind", "auc", "side_accuracy", "test_positives", "contrast"}, ...], "seconds", "steps",
    ...}``; ``side_accuracy`` is None for a kind without a side (cardiomegaly); ``contrast`` is the kind's
    :func:`median_contrast` on the test split. Each training batch is augmented by :func:`random_affine` when
    ``augment``."""
    say = progress or (lambda _m: None)
    data_dir = Path(data_dir)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    labels = phantom_labels(data_dir / "phantom.json")
    x_tr, p_tr, s_tr = _load_split(data_dir, "training", image_size, labels)
    x_te, p_te, s_te = _load_split(data_dir, "test", image_size, labels)
    t_load = time.perf_counter() - t0
    say(f"loaded {len(x_tr)} training and {len(x_te)} test images at {image_size} px in {t_load:.1f} s")
    model = PhantomProbe(**(encoder_kwargs or {}))
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    steps_per_epoch = len(x_tr) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, learning_rate, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    t1 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_tr), generator=g)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            presence, side = model(random_affine(x_tr[idx], g) if augment else x_tr[idx])
            valid = ~torch.isnan(s_tr[idx])
            loss = F.binary_cross_entropy_with_logits(presence, p_tr[idx])
            if valid.any():
                loss = loss + F.binary_cross_entropy_with_logits(side[valid], s_tr[idx][valid])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        say(f"epoch {epoch + 1}/{epochs}: loss {total / steps_per_epoch:.4f} ({time.perf_counter() - t1:.0f} s)")
    model.eval()
    with torch.no_grad():
        outs = [model(x_te[i : i + 128]) for i in range(0, len(x_te), 128)]
    presence = torch.cat([o[0] for o in outs])
    side = torch.cat([o[1] for o in outs])
    side_acc = side_accuracy(side, s_te)
    contrast = median_contrast(data_dir)
    records = []
    for k, kind in enumerate(FINDING_TYPES):
        pos = int(p_te[:, k].sum())
        auc = float(compute_roc_auc(presence[:, k].sigmoid(), p_te[:, k])) if 0 < pos < len(p_te) else float("nan")
        acc = float(side_acc[k])
        records.append({"kind": kind, "auc": round(auc, 4), "side_accuracy": None if np.isnan(acc) else round(acc, 4),
                        "test_positives": pos, "contrast": contrast[kind]})  # fmt: skip
    return {
        "records": records, "seconds": round(time.perf_counter() - t0, 1), "train_seconds": round(time.perf_counter() - t1, 1),
        "steps": epochs * steps_per_epoch, "image_size": image_size, "train": len(x_tr), "test": len(x_te),
    }  # fmt: skip
