"""Within-sample local alignment loss with one-hot, spatial (LoVT) or intra-modal (ELVIS) targets."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from monai_elvis.utils import l2_normalize, check_batch, check_mask, check_ndim, zero_padding

__all__ = ["LocalAlignmentLoss", "spatial_target", "intra_modal_target"]

TARGETS = ("one_hot", "spatial", "intra_modal")
TARGET_SOURCES = ("pre_projection", "projected")
_NEG = -1e9  # logit of a padded unit


def spatial_target(grid_size: tuple[int, int], threshold: float = 0.3, smoothing: float = 1.0) -> torch.Tensor:
    """LoVT's spatial prior over a ``h x w`` region grid.

    Region centres at integer (row, column) positions are divided by the grid diagonal ``sqrt(h^2 + w^2)``;
    with ``d_ij`` their Euclidean distance, ``w_ij = exp(-smoothing * d_ij)`` for ``d_ij <= threshold`` and 0
    beyond, each row normalised to sum 1.

    Reference: Müller et al., "Joint Learning of Localized Representations from Medical Images and Reports"
    (LoVT), ECCV 2022.

    Returns: ``[N, N]`` float32 with ``N = h * w`` (row-major).
    """
    h, w = grid_size
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], dim=1).double() / math.sqrt(h * h + w * w)
    dist = torch.cdist(coords, coords)
    weights = torch.exp(-smoothing * dist) * (dist <= threshold + 1e-12)
    return (weights / weights.sum(dim=1, keepdim=True)).float()


@torch.no_grad()
def intra_modal_target(features: torch.Tensor, temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ELVIS's target: ``w_ij = softmax_j(cos(h_i, h_j) / temperature)`` over the valid units ``j`` of one sample.

    No gradient flows through it (stop-gradient). Shapes: ``features [B, M, C]``, ``mask [B, M]`` -> ``[B, M, M]``.
    """
    h = l2_normalize(features.float(), dim=-1)
    sim = torch.bmm(h * (1.0 / temperature), h.transpose(1, 2))  # the scale rides on the smaller operand
    if mask is not None:
        sim.masked_fill_(~mask.unsqueeze(1), float("-inf"))
    return torch.softmax(sim, dim=-1)


class LocalAlignmentLoss(_Loss):
    """Within-sample contrastive alignment of local features with their cross-attended counterparts.

    For the regions of one image (and likewise for the sentences of one report)::

        L = -mean_i sum_j w_ij log softmax_j(cos(v_i, v'_j) / temperature)

    where ``v'_j`` is region ``j`` attended over the report's sentences. The target ``w`` is

    - ``"one_hot"``: the identity (every other region of the same image is a negative);
    - ``"spatial"``: LoVT's distance prior (:func:`spatial_target`) for regions, the identity for sentences;
    - ``"intra_modal"`` (ELVIS): :func:`intra_modal_target` of the features inside one modality, from
      ``target_source``: the pre-projection features ``h_i`` / ``g_k`` or the detached projected ones.

    The loss is averaged over the valid units of a sample (padded sentences are ignored; optional per-unit
    weights are normalised per sample), then over the batch; the total is
    ``region_weight * L_region + sentence_weight * L_sentence``.

    The ELVIS paper's full text was not available: this formulation follows its stated principle (intra-modal
    similarity as the target of local alignment) and its Figure 1. Every temperature, weight and the target
    source are settings.

    Args:
        target: ``"one_hot"``, ``"spatial"`` or ``"intra_modal"``.
        temperature: ``tau`` of the alignment softmax.
        target_temperature: ``tau_intra`` of the intra-modal target.
        target_source: ``"pre_projection"`` or ``"projected"``.
        spatial_threshold: relative distance limit of the spatial prior (LoVT: 0.3).
        spatial_smoothing: ``lambda`` of ``exp(-lambda * d)`` in the spatial prior.
        region_weight: weight of the region (image) direction.
        sentence_weight: weight of the sentence (report) direction.

    Shapes (``forward`` / :meth:`directional_losses`):
        ``image_local``, ``image_attended``: ``[B, N, d]``; ``text_local``, ``text_attended``: ``[B, S, d]``;
        ``sentence_mask``: ``[B, S]`` (True = real sentence; default all valid); ``image_local_pre``
        ``[B, N, C]`` and ``text_local_pre`` ``[B, S, D]`` (needed for ``intra_modal`` with
        ``pre_projection``); ``region_weights`` ``[B, N]``, ``sentence_weights`` ``[B, S]`` (optional);
        ``grid_size`` ``(h, w)`` with ``h * w = N`` (``spatial``; default a square grid). Returns a scalar.
        Computed in float32, also under autocast.
    """

    def __init__(
        self,
        target: str = "intra_modal",
        temperature: float = 0.1,
        target_temperature: float = 0.1,
        target_source: str = "pre_projection",
        spatial_threshold: float = 0.3,
        spatial_smoothing: float = 1.0,
        region_weight: float = 0.5,
        sentence_weight: float = 0.5,
    ) -> None:
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}.")
        if target_source not in TARGET_SOURCES:
            raise ValueError(f"target_source must be one of {TARGET_SOURCES}, got {target_source!r}.")
        if temperature <= 0 or target_temperature <= 0:
            raise ValueError(f"temperatures must be positive, got {temperature} and {target_temperature}.")
        self.target = target
        self.temperature = temperature
        self.target_temperature = target_temperature
        self.target_source = target_source
        self.spatial_threshold = spatial_threshold
        self.spatial_smoothing = spatial_smoothing
        self.region_weight = region_weight
        self.sentence_weight = sentence_weight
        self._spatial_cache: dict[tuple, torch.Tensor] = {}

    def _spatial(self, grid_size: tuple[int, int] | None, n: int, device: torch.device) -> torch.Tensor:
        if grid_size is None:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"image_local has N={n} regions, not a square grid: pass grid_size=(h, w).")
            grid_size = (side, side)
        h, w = int(grid_size[0]), int(grid_size[1])
        if h * w != n:
            raise ValueError(f"grid_size {(h, w)} does not match N={n} regions of image_local.")
        # every setting the prior depends on is in the key: changing a setting after a call takes effect
        key = (h, w, str(device), float(self.spatial_threshold), float(self.spatial_smoothing))
        if key not in self._spatial_cache:
            self._spatial_cache[key] = spatial_target((h, w), self.spatial_threshold, self.spatial_smoothing).to(device)
        return self._spatial_cache[key]

    def _target(self, kind: str, local, source, mask, grid_size) -> torch.Tensor | None:
        """``None`` for one-hot, else ``[B, M, M]`` (or ``[M, M]``) rows summing to 1 over valid units."""
        if kind == "one_hot":
            return None
        if kind == "spatial":
            return self._spatial(grid_size, local.shape[1], local.device)
        if self.target_source == "projected":
            source = local.detach()
        return intra_modal_target(source, self.target_temperature, mask)

    def _direction(self, local, attended, target, mask, unit_weights) -> torch.Tensor:
        z = l2_normalize(local, dim=-1) * (1.0 / self.temperature)
        za = l2_normalize(attended, dim=-1)
        logits = torch.bmm(z, za.transpose(1, 2))  # cos / temperature: [B, M, M]
        if mask is not None:  # padded columns: no probability mass (a finite value keeps 0 * log p = 0)
            logits = logits.masked_fill(~mask.unsqueeze(1), _NEG)
        b, m = logits.shape[:2]
        if target is None:
            target = torch.arange(m, device=logits.device).repeat(b)
        else:
            target = target.expand(b, m, m).reshape(b * m, m)
        per_unit = F.cross_entropy(logits.reshape(b * m, m), target, reduction="none").view(b, m)
        u = torch.ones_like(per_unit) if unit_weights is None else unit_weights.float()
        if mask is not None:
            u = torch.where(mask, u, torch.zeros_like(u))
        u = u / u.sum(dim=1, keepdim=True).clamp(min=1e-12)
        return (per_unit * u).sum(dim=1).mean()

    def directional_losses(
        self,
        image_local: torch.Tensor,
        image_attended: torch.Tensor,
        text_local: torch.Tensor,
        text_attended: torch.Tensor,
        sentence_mask: torch.Tensor | None = None,
        image_local_pre: torch.Tensor | None = None,
        text_local_pre: torch.Tensor | None = None,
        region_weights: torch.Tensor | None = None,
        sentence_weights: torch.Tensor | None = None,
        grid_size: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The region (image) and sentence (report) direction losses, unweighted."""
        check_ndim(image_local, "image_local", 3, "[B, N, d]")
        check_ndim(text_local, "text_local", 3, "[B, S, d]")
        for name, t, ref in (("image_attended", image_attended, image_local), ("text_attended", text_attended, text_local)):
            if not isinstance(t, torch.Tensor) or t.shape != ref.shape:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must have the shape {tuple(ref.shape)} of its local features, got {shape}.")
        b = check_batch([("image_local", image_local), ("text_local", text_local)])
        n, s = image_local.shape[1], text_local.shape[1]
        mask = None if sentence_mask is None else check_mask(sentence_mask, "sentence_mask", (b, s), "sentence")
        need_pre = self.target == "intra_modal" and self.target_source == "pre_projection"
        for name, t, m in (("image_local_pre", image_local_pre, n), ("text_local_pre", text_local_pre, s)):
            if need_pre and t is None:
                raise ValueError(f"{name} is required for target='intra_modal' with target_source='pre_projection'.")
            if t is not None and (t.ndim != 3 or t.shape[:2] != (b, m)):
                raise ValueError(f"{name} must have shape [{b}, {m}, C], got shape {tuple(t.shape)}.")
        for name, t, m in (("region_weights", region_weights, n), ("sentence_weights", sentence_weights, s)):
            if t is not None and tuple(t.shape) != (b, m):
                raise ValueError(f"{name} must have shape {(b, m)}, got shape {tuple(t.shape)}.")

        with torch.autocast(device_type=image_local.device.type, enabled=False):
            v, va = image_local.float(), image_attended.float()
            t, ta = zero_padding(text_local.float(), mask), zero_padding(text_attended.float(), mask)
            g = None if text_local_pre is None else zero_padding(text_local_pre.float(), mask)
            region_target = self._target(self.target, v, image_local_pre, None, grid_size)
            sentence_target = self._target("one_hot" if self.target == "spatial" else self.target, t, g, mask, None)
            region = self._direction(v, va, region_target, None, region_weights)
            sentence = self._direction(t, ta, sentence_target, mask, sentence_weights)
        return region, sentence

    def forward(self, *args, **kwargs) -> torch.Tensor:
        region, sentence = self.directional_losses(*args, **kwargs)
        return self.region_weight * region + self.sentence_weight * sentence
