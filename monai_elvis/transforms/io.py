"""Loading chest radiographs (DICOM, PNG, JPEG) into float images in [0, 1] in MONAI's 2D axis order, and writing
label maps as palette PNGs."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, PILWriter
from monai.transforms import MapTransform, Transform

from monai_elvis.errors import UsageError

__all__ = ["LoadCXR", "LoadCXRd", "CXRLoadError", "DICOM_SUFFIXES", "IMAGE_SUFFIXES", "LABEL_COLOURS",
           "PaletteLabelWriter"]  # fmt: skip

DICOM_SUFFIXES = (".dcm", ".dicom", "")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
UNKNOWN_SPACING = (float("nan"), float("nan"))


class CXRLoadError(UsageError, ValueError):
    """A radiograph file could not be read; the message names the file (on the bundle command line it is printed
    without a traceback, see :mod:`monai_elvis.errors`)."""


def _positive_pair(value: Any) -> tuple[float, float] | None:
    try:
        pair = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return pair if len(pair) == 2 and all(v > 0 for v in pair) else None


def _first(value: Any) -> float:
    """The first value of a possibly multi-valued DICOM element."""
    from pydicom.multival import MultiValue

    return float(value[0]) if isinstance(value, (list, tuple, MultiValue)) else float(value)


def _window(x: np.ndarray, ds: Any) -> np.ndarray:
    """The DICOM VOI window (PS3.3 C.11.2.1.2) mapped to ``[0, 1]``, in float32: LINEAR (default),
    LINEAR_EXACT or SIGMOID, with the first window of the file."""
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    function = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (x - center) / max(width, 1e-6)))).astype(np.float32)
    if function == "LINEAR_EXACT":
        y = (x - np.float32(center)) / np.float32(max(width, 1e-6)) + np.float32(0.5)
    else:
        if width < 1:
            raise CXRLoadError(f"window width {width} is below 1, which a LINEAR VOI function does not allow.")
        y = (x - np.float32(center - 0.5)) / np.float32(max(width - 1, 1e-6)) + np.float32(0.5)
    return np.clip(y, 0.0, 1.0, out=y)


class LoadCXR(Transform):
    """Load a chest radiograph as a float32 :class:`~monai.data.MetaTensor` ``[1, W, H]`` in ``[0, 1]``.

    Axis order: MONAI's, as its ``LoadImage`` readers give 2D images (``PILReader(reverse_indexing=True)``,
    ``PydicomReader(swap_ij=True)``): after the channel, the first axis is ``x`` (the image's columns, left to
    right as displayed) and the second ``y`` (its rows, top to bottom). ``image[0, x, y]`` is the pixel in column
    ``x`` and row ``y`` of the file, so ``image[0].T`` is the radiograph as viewed: a PA/AP view shows the
    patient's left on the image's right, at large ``x``. Then MONAI's transforms, MONAI Label's writers and the
    model zoo's 2D bundles read the arrays the same way.

    DICOM (pydicom): the modality LUT (rescale slope/intercept or LUT sequence) is applied, then the VOI LUT or
    the first window when the file has one and ``voi_lut`` is true, then the values are scaled to ``[0, 1]``
    by their minimum and maximum; MONOCHROME1 images are inverted so that bone is bright. 8 to 16 bit.

    PNG/JPEG (Pillow): 8- or 16-bit gray (scaled by 255 or 65535), colour converted to gray.

    Metadata (``tensor.meta``): ``filename_or_obj``, ``view_position`` (DICOM ViewPosition, ``""`` when
    unknown), ``photometric_interpretation``, ``spacing`` ``(x, y)`` in mm (the column and row spacing: DICOM
    PixelSpacing or ImagerPixelSpacing reversed, as they are stored row first; ``(nan, nan)`` when absent or
    zero), ``original_size`` ``(W, H)`` (the loaded spatial shape, in the same order). Every value has the same
    type for every file, so MONAI's collate can batch the metadata.

    Args:
        voi_lut: apply the file's VOI LUT / window (DICOM).
        reader: ``"auto"`` (by suffix; files without a known suffix are tried as DICOM), ``"dicom"`` or ``"pil"``.

    Raises:
        FileNotFoundError: the file does not exist.
        CXRLoadError: the file is truncated, corrupt or of an unsupported kind (the message names it).
    """

    def __init__(self, voi_lut: bool = True, reader: str = "auto") -> None:
        if reader not in ("auto", "dicom", "pil"):
            raise ValueError(f"reader must be 'auto', 'dicom' or 'pil', got {reader!r}.")
        self.voi_lut = voi_lut
        self.reader = reader

    def __call__(self, path: str | os.PathLike) -> MetaTensor:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"radiograph not found: {path}")
        kind = self.reader
        if kind == "auto":
            kind = "pil" if path.suffix.lower() in IMAGE_SUFFIXES else "dicom"
        try:
            array, meta = self._read_dicom(path) if kind == "dicom" else self._read_pil(path)
        except (FileNotFoundError, CXRLoadError):
            raise
        except Exception as e:  # pydicom and Pillow raise many kinds of errors on broken files
            raise CXRLoadError(f"cannot read radiograph {path}: {type(e).__name__}: {e}") from e
        if array.ndim != 2 or min(array.shape) < 2:
            raise CXRLoadError(f"radiograph {path} is not a 2D image: pixel array of shape {array.shape}.")
        if not np.isfinite(array).all():
            raise CXRLoadError(f"radiograph {path} has non-finite pixel values.")
        array = array.T  # (rows, columns) as stored -> MONAI's (x, y)
        meta.update({"filename_or_obj": str(path), "original_size": tuple(int(s) for s in array.shape)})
        return MetaTensor(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None], meta=meta)

    def _read_dicom(self, path: Path) -> tuple[np.ndarray, dict]:
        import pydicom

        try:
            from pydicom.pixels import apply_modality_lut, apply_voi_lut
        except ImportError:  # pydicom 2 (e.g. beside monailabel, which needs pydicom<3)
            from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            raise CXRLoadError(f"DICOM file {path} has no pixel data.")
        pixels = ds.pixel_array
        if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1 and pixels.shape[0] == 1:
            pixels = pixels[0]
        if pixels.ndim != 2:
            raise CXRLoadError(f"DICOM file {path} holds {pixels.shape} pixels, not one 2D grayscale frame.")
        if "ModalityLUTSequence" in ds:
            x = apply_modality_lut(pixels, ds).astype(np.float32)
        else:
            slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
            x = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        if self.voi_lut and "VOILUTSequence" in ds:
            x = apply_voi_lut(x, ds, index=0).astype(np.float32)
        elif self.voi_lut and "WindowCenter" in ds and "WindowWidth" in ds:
            x = _window(x, ds)
        x = self._unit_range(x)
        photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
        if photometric == "MONOCHROME1":
            x = 1.0 - x
        elif photometric != "MONOCHROME2":
            raise CXRLoadError(f"DICOM file {path} is {photometric}; a grayscale radiograph is expected.")
        spacing = _positive_pair(getattr(ds, "PixelSpacing", None)) or _positive_pair(
            getattr(ds, "ImagerPixelSpacing", None)
        ) or UNKNOWN_SPACING
        spacing = (spacing[1], spacing[0])  # DICOM stores (row spacing, column spacing): (y, x)
        view = str(getattr(ds, "ViewPosition", "") or "")
        return x, {"view_position": view, "photometric_interpretation": photometric, "spacing": spacing}

    def _read_pil(self, path: Path) -> tuple[np.ndarray, dict]:
        from PIL import Image

        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L"):
                x = np.asarray(img, dtype=np.float32) * np.float32(1 / 65535.0)
            elif mode == "I":
                arr = np.asarray(img, dtype=np.float32)
                x = arr * np.float32(1 / 65535.0 if arr.max() > 255 else 1 / 255.0)
            elif mode == "F":
                x = self._unit_range(np.asarray(img, dtype=np.float32))
            else:
                x = np.asarray(img.convert("L"), dtype=np.float32) * np.float32(1 / 255.0)
        return x, {"view_position": "", "photometric_interpretation": "MONOCHROME2", "spacing": UNKNOWN_SPACING}

    @staticmethod
    def _unit_range(x: np.ndarray) -> np.ndarray:
        lo, hi = float(x.min()), float(x.max())
        if hi <= lo:
            return np.zeros_like(x, dtype=np.float32)
        y = ((x - np.float32(lo)) * np.float32(1.0 / (hi - lo))).astype(np.float32, copy=False)
        return np.clip(y, 0.0, 1.0, out=y)


class LoadCXRd(MapTransform):
    """Dictionary form of :class:`LoadCXR`: replaces the path under each key by the loaded image ``[1, W, H]``."""

    def __init__(self, keys: KeysCollection, voi_lut: bool = True, reader: str = "auto", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadCXR(voi_lut=voi_lut, reader=reader)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


# class 0 (background) black, then the colours of the phantom's findings in the bundles' class order: nodule,
# opacity, effusion, pneumothorax, cardiomegaly, atelectasis; further classes cycle through them
LABEL_COLOURS = ((0, 0, 0), (255, 80, 80), (255, 200, 0), (80, 160, 255), (0, 230, 120), (230, 80, 230), (255, 140, 40))


class PaletteLabelWriter(PILWriter):
    """MONAI's PIL image writer for label maps: writes a palette ("P" mode) PNG whose pixel values are the class
    numbers (0 background, 1, 2, ...) and whose palette gives each class a colour (:data:`LABEL_COLOURS`).

    A plain 8-bit PNG of classes 0-6 looks black in an image viewer; this one shows the classes in colour, while
    ``numpy.asarray(PIL.Image.open(path))`` (and MONAI's ``PILReader``) still returns the class numbers. Readers that
    expand palettes to RGB (ITK, for one) return the colours instead.

    Use as ``SaveImaged(..., output_dtype=numpy.uint8, writer=PaletteLabelWriter)``; the data must be a
    single-channel ``uint8`` label map in MONAI's ``(x, y)`` order (as :class:`LoadCXR` gives images): like
    MONAI's :class:`~monai.data.PILWriter` it swaps the two axes when writing (``reverse_indexing=True``, the
    default), so the PNG lines up with the radiograph it was predicted on.
    """

    @classmethod
    def create_backend_obj(cls, data_array: Any, **kwargs: Any):
        from PIL import Image

        image = super().create_backend_obj(data_array, **kwargs)
        if image.mode != "L":
            raise ValueError(f"PaletteLabelWriter writes single-channel uint8 label maps, got a PIL {image.mode!r} "
                             "image (set output_dtype=numpy.uint8 and squeeze the channel).")  # fmt: skip
        palette = Image.frombytes("P", image.size, image.tobytes())  # the pixel values stay the class numbers
        colours = [LABEL_COLOURS[0]] + [LABEL_COLOURS[1 + (k - 1) % (len(LABEL_COLOURS) - 1)] for k in range(1, 256)]
        palette.putpalette([c for rgb in colours for c in rgb])
        return palette
