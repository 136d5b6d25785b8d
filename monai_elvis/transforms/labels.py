"""Label conversion: SIIM-ACR run-length encodings and boxes to masks, masks to boxes.

Every array is in MONAI's 2D axis order, as :class:`~monai_elvis.transforms.LoadCXR` gives images: ``[C, W, H]``,
the first spatial axis ``x`` (columns, left to right as displayed), the second ``y`` (rows, top to bottom). Boxes
are ``(x, y, w, h)`` in pixels, as MS-CXR and RSNA give them."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from scipy import ndimage

from monai_elvis.keys import Keys

__all__ = ["ClassNamesToMultiHot", "ClassNamesToMultiHotd", "UncertainLabels", "UncertainLabelsd", "LabelsFromKeysd", "LoadLabelMap", "LoadLabelMapd", "RLEToMask", "RLEToMaskd", "BoxesToMask", "BoxesToMaskd", "MaskToBoxes", "MaskToBoxesd"]


def _round_half_up(v: float) -> int:
    return int(np.floor(v + 0.5))


class LoadLabelMap(Transform):
    """Load an integer label map (8- or 16-bit gray PNG, or any single-band image Pillow reads) as a
    :class:`~monai.data.MetaTensor` ``[1, W, H]`` of ``int64`` class indices, values unchanged.

    The axis order is :class:`~monai_elvis.transforms.LoadCXR`'s (MONAI's ``(x, y)``), so a label map saved
    alongside an image stays aligned with it. ``meta["original_size"]`` is ``(W, H)``.

    Args:
        num_classes: when given, a value ``>= num_classes`` raises ``ValueError`` naming the file (a label map
            written for another class list must not be trained on silently).

    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` naming the file for an unreadable or
    multi-band one.
    """

    def __init__(self, num_classes: int | None = None) -> None:
        self.num_classes = num_classes

    def __call__(self, path: str | Path) -> MetaTensor:
        from PIL import Image

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"label map not found: {path}")
        try:
            with Image.open(path) as img:
                img.load()
                if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                    raise ValueError(f"mode {img.mode} is not a single-band label map")
                arr = np.asarray(img).astype(np.int64)
        except Exception as e:
            raise ValueError(f"cannot read label map {path}: {type(e).__name__}: {e}") from e
        if self.num_classes is not None and arr.size and int(arr.max()) >= self.num_classes:
            raise ValueError(
                f"label map {path} holds class {int(arr.max())}, but there are only {self.num_classes} classes."
            )
        arr = np.ascontiguousarray(arr.T)  # (rows, columns) as stored -> (x, y)
        meta = {"filename_or_obj": str(path), "original_size": tuple(int(v) for v in arr.shape)}
        return MetaTensor(torch.from_numpy(arr)[None], meta=meta)


class LoadLabelMapd(MapTransform):
    """Dictionary form of :class:`LoadLabelMap`: replaces the path under each key by the label map."""

    def __init__(self, keys: KeysCollection = Keys.LABEL, num_classes: int | None = None,
                 allow_missing_keys: bool = False) -> None:  # fmt: skip
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadLabelMap(num_classes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


class RLEToMask(Transform):
    """Decode SIIM-ACR pneumothorax run-length encodings into a ``[1, W, H]`` uint8 mask (1 = pneumothorax), in
    MONAI's ``(x, y)`` order.

    The format is the competition's: pairs ``offset length`` where each offset counts from the end of the
    previous run, over the pixels in column-major order (column by column of the displayed image, which is the
    ``(x, y)`` array flattened). ``"-1"`` (or an
    empty string) is an image without pneumothorax. Several encodings of one image (one per CSV row) are
    merged by union.

    Args:
        height: image rows (1024 in SIIM-ACR).
        width: image columns.

    Raises ``ValueError`` for an encoding that is not pairs of non-negative integers or that runs past the
    image; ``source`` (e.g. the image id) is named in the message.
    """

    def __init__(self, height: int = 1024, width: int = 1024) -> None:
        self.height, self.width = height, width

    def __call__(self, rle: str | Sequence[str], source: str | None = None) -> np.ndarray:
        where = f" of {source}" if source else ""
        encodings = [rle] if isinstance(rle, str) else list(rle)
        flat = np.zeros(self.height * self.width, dtype=np.uint8)
        for enc in encodings:
            enc = str(enc).strip()
            if enc in ("", "-1"):
                continue
            try:
                values = np.array([int(v) for v in enc.split()], dtype=np.int64)
            except ValueError as e:
                raise ValueError(f"run-length encoding{where} is not a list of integers: {enc[:60]!r}") from e
            if values.size % 2 or (values < 0).any():
                raise ValueError(f"run-length encoding{where} must be pairs of non-negative integers.")
            starts = np.cumsum(values[0::2] + np.concatenate([[0], values[1::2][:-1]]))
            ends = starts + values[1::2]
            if ends.size and ends[-1] > flat.size:
                raise ValueError(
                    f"run-length encoding{where} runs to pixel {int(ends[-1])}, past a "
                    f"{self.height}x{self.width} image."
                )
            for s, e in zip(starts, ends):
                flat[s:e] = 1
        return flat.reshape(self.width, self.height)[None].copy()


class BoxesToMask(Transform):
    """Paint boxes ``(x, y, w, h)`` given in original pixels into a ``[1, W, H]`` uint8 mask (MONAI's ``(x, y)``
    order: ``mask[0, x, y]``).

    Args:
        spatial_size: ``(W, H)`` of the mask.
        original_size: ``(W, H)`` the boxes refer to; boxes are scaled by ``spatial_size / original_size``
            (default: no scaling). Box edges are rounded half up to the nearest pixel edge; each box covers
            ``x`` in ``[x, x + w)`` (the displayed columns) and ``y`` in ``[y, y + h)`` (the rows), clipped to the
            image.
        per_box: one channel per box, ``[K, W, H]`` (one all-zero channel when there is no box), as the
            per-box grounding metrics take; default: their union ``[1, W, H]``.
    """

    def __init__(self, spatial_size: Sequence[int], original_size: Sequence[int] | None = None,
                 per_box: bool = False) -> None:  # fmt: skip
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.original_size = tuple(int(s) for s in original_size) if original_size is not None else self.spatial_size
        self.per_box = per_box

    def __call__(self, boxes: Any) -> np.ndarray:
        w, h = self.spatial_size
        sx, sy = w / self.original_size[0], h / self.original_size[1]
        arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if len(boxes) else np.zeros((0, 4))
        mask = np.zeros((max(len(arr), 1) if self.per_box else 1, w, h), dtype=np.uint8)
        if not np.isfinite(arr).all():
            raise ValueError(f"boxes must be finite (x, y, w, h) values, got {arr.tolist()}.")
        for k, (x, y, bw, bh) in enumerate(arr):
            if bw < 0 or bh < 0:
                raise ValueError(f"box {(x, y, bw, bh)} has a negative width or height.")
            r0, r1 = max(0, _round_half_up(y * sy)), min(h, _round_half_up((y + bh) * sy))
            c0, c1 = max(0, _round_half_up(x * sx)), min(w, _round_half_up((x + bw) * sx))
            mask[k if self.per_box else 0, c0:c1, r0:r1] = 1
        return mask


class MaskToBoxes(Transform):
    """Boxes ``(x, y, w, h)`` of the connected components of a mask in MONAI's ``(x, y)`` order (``[1, W, H]`` or
    ``[W, H]``, as :class:`BoxesToMask` paints them; pass the transpose of a displayed ``[H, W]`` array).

    Returns a float32 array ``[K, 4]`` ordered by ``(y, x)``; components smaller than ``min_pixels`` are ignored.
    """

    def __init__(self, min_pixels: int = 1, connectivity: int = 2) -> None:
        self.min_pixels = min_pixels
        self.structure = ndimage.generate_binary_structure(2, connectivity)

    def __call__(self, mask: Any) -> np.ndarray:
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if m.ndim == 3:
            if m.shape[0] != 1:
                raise ValueError(f"mask must have shape [1, W, H] or [W, H], got shape {m.shape}.")
            m = m[0]
        labels, n = ndimage.label(m > 0, structure=self.structure)
        boxes = []
        for idx, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None or (labels[sl] == idx).sum() < self.min_pixels:
                continue
            xs, ys = sl
            boxes.append((xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start))
        boxes.sort(key=lambda b: (b[1], b[0]))
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


class RLEToMaskd(MapTransform):
    """Dictionary form of :class:`RLEToMask`; the mask replaces the encoding under each key. Errors name
    ``d[source_key]`` (the image id) when present.

    With ``ref_key`` (e.g. ``"image"``, right after :class:`~monai_elvis.transforms.LoadCXRd`), the mask takes
    the size of ``d[ref_key]`` (``[C, W, H]``) instead of ``width x height`` and becomes a :class:`~monai.data.MetaTensor` with
    the reference's affine, so it follows the image through spatial transforms.
    """

    def __init__(self, keys: KeysCollection = Keys.LABEL, height: int = 1024, width: int = 1024,
                 source_key: str | None = Keys.IMAGE, ref_key: str | None = None,
                 allow_missing_keys: bool = False) -> None:  # fmt: skip
        super().__init__(keys, allow_missing_keys)
        self.height, self.width = height, width
        self.source_key = source_key
        self.ref_key = ref_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        source = d.get(self.source_key) if self.source_key else None
        if isinstance(source, MetaTensor):
            source = source.meta.get("filename_or_obj", None)
        ref = d[self.ref_key] if self.ref_key else None
        w, h = (int(ref.shape[-2]), int(ref.shape[-1])) if ref is not None else (self.width, self.height)
        decoder = RLEToMask(h, w)
        for key in self.key_iterator(d):
            mask = decoder(d[key], source=None if source is None else str(source))
            if isinstance(ref, MetaTensor):
                mask = MetaTensor(torch.from_numpy(mask), affine=ref.affine.clone(), meta={"original_size": (w, h)})
            d[key] = mask
        return d


class BoxesToMaskd(MapTransform):
    """Dictionary form of :class:`BoxesToMask`: paints ``d[keys]`` into ``d[mask_key]`` on the grid of
    ``d[ref_key]``.

    Use it right after :class:`~monai_elvis.transforms.LoadCXRd` so the mask then follows the image through
    every spatial transform (give both keys to them). The boxes are in the original pixels
    (``ref.meta["original_size"]``, ``(W, H)``) and are scaled to the reference's current size ``[C, W, H]``; the
    mask is a
    :class:`~monai.data.MetaTensor` with the reference's affine.
    """

    def __init__(self, keys: KeysCollection = Keys.BOXES, ref_key: str = Keys.IMAGE, mask_key: str = Keys.LABEL,
                 per_box: bool = False, allow_missing_keys: bool = False) -> None:  # fmt: skip
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        self.mask_key = mask_key
        self.per_box = per_box

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = d[self.ref_key]
        size = tuple(ref.shape[-2:])
        original = getattr(ref, "meta", {}).get("original_size", size)
        original = tuple(int(s) for s in original)
        for key in self.key_iterator(d):
            mask = torch.from_numpy(BoxesToMask(size, original, self.per_box)(d[key]))
            if isinstance(ref, MetaTensor):
                mask = MetaTensor(mask, affine=ref.affine.clone(), meta={"original_size": original})
            d[self.mask_key] = mask
        return d


class MaskToBoxesd(MapTransform):
    """Dictionary form of :class:`MaskToBoxes`: writes the boxes of ``d[keys]`` to ``d[boxes_key]``."""

    def __init__(self, keys: KeysCollection = Keys.LABEL, boxes_key: str = Keys.BOXES, min_pixels: int = 1,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = MaskToBoxes(min_pixels)
        self.boxes_key = boxes_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.boxes_key] = self.converter(d[key])
        return d


class ClassNamesToMultiHot(Transform):
    """A list of class names (e.g. the finding kinds of a phantom datalist entry) to a multi-hot float tensor
    ``[K]`` in the order of ``classes``. An unknown name raises ``ValueError`` naming it.

    Args:
        classes: the class names, in label order.
    """

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = list(classes)
        if len(set(self.classes)) != len(self.classes) or not self.classes:
            raise ValueError(f"classes must be distinct and not empty, got {self.classes}.")

    def __call__(self, names: Sequence[str]) -> torch.Tensor:
        if isinstance(names, str):
            names = [names]
        unknown = [n for n in names if n not in self.classes]
        if unknown:
            raise ValueError(f"unknown classes {unknown}; known: {self.classes}.")
        label = torch.zeros(len(self.classes))
        for n in names:
            label[self.classes.index(n)] = 1.0
        return label


class ClassNamesToMultiHotd(MapTransform):
    """Dict form of :class:`ClassNamesToMultiHot`: ``keys`` hold lists of names; the tensor goes to the matching
    ``output_keys`` (default: the same keys)."""

    def __init__(self, keys: KeysCollection, classes: Sequence[str], output_keys: KeysCollection | None = None,
                 allow_missing_keys: bool = False) -> None:  # fmt: skip
        super().__init__(keys, allow_missing_keys)
        self.converter = ClassNamesToMultiHot(classes)
        out = self.keys if output_keys is None else ((output_keys,) if isinstance(output_keys, str) else tuple(output_keys))
        if len(out) != len(self.keys):
            raise ValueError(f"output_keys {out} must match keys {self.keys} one to one.")
        self.output_keys = out

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, out in zip(self.key_iterator(d), self.output_keys):
            try:
                d[out] = self.converter(d[key])
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
        return d


class UncertainLabels(Transform):
    """Map the uncertain value of a multi-label vector (CheXpert's ``-1``) by a policy, as a float tensor ``[K]``.

    Args:
        policy: ``"ones"`` (uncertain counts as positive, CheXpert's U-Ones), ``"zeros"`` (negative, U-Zeros) or
            ``"ignore"`` (kept as ``ignore_value``: the loss and the AUROC leave that entry out, see
            :class:`~monai_elvis.losses.MultiLabelBCEWithLogitsLoss` and
            :class:`~monai_elvis.metrics.MultiLabelROCAUCMetric`).
        uncertain_value: the value that marks an uncertain label in the input.
        ignore_value: what ``"ignore"`` writes.

    Values other than 0, 1 and ``uncertain_value`` raise ``ValueError``.
    """

    POLICIES = ("ones", "zeros", "ignore")

    def __init__(self, policy: str = "ones", uncertain_value: float = -1.0, ignore_value: float = -1.0) -> None:
        if policy not in self.POLICIES:
            raise ValueError(f"the uncertain-label policy must be one of {list(self.POLICIES)}, got {policy!r}.")
        self.policy, self.uncertain_value, self.ignore_value = policy, float(uncertain_value), float(ignore_value)

    def __call__(self, label: Any) -> torch.Tensor:
        out = torch.as_tensor(np.asarray(label, dtype=np.float32)).flatten()
        uncertain = out == self.uncertain_value
        bad = ~(uncertain | (out == 0) | (out == 1))
        if bad.any():
            raise ValueError(f"labels must be 0, 1 or {self.uncertain_value:g} (uncertain), got {out.tolist()}.")
        fill = {"ones": 1.0, "zeros": 0.0, "ignore": self.ignore_value}[self.policy]
        return torch.where(uncertain, torch.full_like(out, fill), out)


class UncertainLabelsd(MapTransform):
    """Dictionary form of :class:`UncertainLabels`."""

    def __init__(self, keys: KeysCollection = Keys.LABEL, policy: str = "ones", uncertain_value: float = -1.0,
                 ignore_value: float = -1.0, allow_missing_keys: bool = False) -> None:  # fmt: skip
        super().__init__(keys, allow_missing_keys)
        self.mapper = UncertainLabels(policy, uncertain_value, ignore_value)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d[key] = self.mapper(d[key])
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
        return d


class LabelsFromKeysd(MapTransform):
    """Gather scalar labels held under several keys (e.g. RSNA's ``pneumonia`` 0/1) into one float tensor ``[K]``
    under ``output_key``, in the order of ``keys``.

    Raises ``ValueError`` naming the key when a value is not a number.
    """

    def __init__(self, keys: KeysCollection, output_key: str = Keys.LABEL, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        values = []
        for key in self.key_iterator(d):
            try:
                values.append(float(d[key]))
            except (TypeError, ValueError):
                raise ValueError(f"{key}: a label must be a number, got {d[key]!r}.") from None
        d[self.output_key] = torch.tensor(values, dtype=torch.float32)
        return d
