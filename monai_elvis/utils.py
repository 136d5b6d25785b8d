"""Small shared helpers: input checks that raise errors naming the tensor and its shape."""

from __future__ import annotations

from collections.abc import Sequence

from enum import Enum
from typing import TypeVar

import torch

E = TypeVar("E", bound=Enum)

__all__ = ["check_ndim", "check_batch", "check_mask", "check_option", "plain_tensor", "zero_padding", "l2_normalize"]


def check_ndim(tensor: torch.Tensor, name: str, ndim: int, layout: str) -> None:
    """Raise ``ValueError`` unless ``tensor`` is a tensor with ``ndim`` dimensions (``layout`` describes them)."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {layout}, got {type(tensor).__name__}.")
    if tensor.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout}, got shape {tuple(tensor.shape)}.")


def check_batch(named: Sequence[tuple[str, torch.Tensor]]) -> int:
    """Raise ``ValueError`` unless every tensor has the same first (batch) dimension; return it."""
    sizes = {name: t.shape[0] for name, t in named}
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{name} {tuple(t.shape)}" for name, t in named)
        raise ValueError(f"batch sizes differ: {detail}.")
    return next(iter(sizes.values()))


def check_mask(mask: torch.Tensor, name: str, shape: Sequence[int], unit: str = "sentence") -> torch.Tensor:
    """Check a ``[B, M]`` padding mask and return it as bool.

    Raises ``ValueError`` when the shape differs from ``shape`` or when a row has no valid entry
    (for example a report whose sentences are all padding).
    """
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got shape {tuple(mask.shape)}.")
    mask = mask.bool()
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"{name} (shape {tuple(mask.shape)}): batch item(s) {empty} have no valid {unit}; "
            f"every {unit} is padding."
        )
    return mask


def check_option(value: object, options: type[E], name: str) -> E:
    """``options(value)`` for a string enum (MONAI's ``StrEnum``); raise ``ValueError`` naming the argument and
    its choices otherwise."""
    try:
        return options(value)
    except ValueError:
        choices = tuple(o.value for o in options)
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.") from None


def plain_tensor(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a plain ``torch.Tensor`` (a MONAI ``MetaTensor`` unwrapped, sharing data and autograd history), so
    that slicing it along the batch does not go through per-item metadata."""
    return x if type(x) is torch.Tensor else x.as_subclass(torch.Tensor)


def zero_padding(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Replace the padded units of ``x`` (``[B, M, ...]``, ``mask`` ``[B, M]`` with True = valid) by zeros.

    ``torch.where`` (not a multiplication) is used so that NaN or inf in padding cannot leak into the result
    or its gradients.
    """
    if mask is None:
        return x
    m = mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """``x / max(||x||, eps)`` along ``dim``, like ``torch.nn.functional.normalize``.

    Written as a multiplication by ``rsqrt`` of the squared norm: its backward does no element-wise division
    over the full tensor, which makes it several times faster than ``F.normalize`` on CPU.
    """
    return x * (x * x).sum(dim=dim, keepdim=True).clamp_min(eps * eps).rsqrt()
