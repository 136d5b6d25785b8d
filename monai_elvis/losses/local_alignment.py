"""Within-sample local alignment loss with one-hot, spatial (LoVT) or intra-modal (ELVIS) targets."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from monai.utils import StrEnum

from monai_elvis.utils import check_batch, check_mask, check_ndim, check_option, l2_normalize, plain_tensor, zero_padding

__all__ = [
    "LocalAlignmentLoss", "LocalTarget", "TargetSource", "AlignmentDirections", "UnitWeights", "spatial_target",
    "intra_modal_target",
]  # fmt: skip


class LocalTarget(StrEnum):
    """Target distribution of :class:`LocalAlignmentLoss` over the units of one sample."""

    ONE_HOT = "one_hot"
    SPATIAL = "spatial"
    INTRA_MODAL = "intra_modal"


class TargetSource(StrEnum):
    """Features the intra-modal target is computed from."""

    PRE_PROJECTION = "pre_projection"
    PROJECTED = "projected"


class AlignmentDirections(StrEnum):
    """Which contrasts :class:`LocalAlignmentLoss` computes in each modality.

    - ``"local_to_attended"``: each local unit against the attended units of its sample (the ELVIS formulation).
    - ``"both"``: also each attended unit against the local units (LoVT's ``att2l`` next to its ``l2att``), both
      from one shared similarity matrix, and summed.
    """

    LOCAL_TO_ATTENDED = "local_to_attended"
    BOTH = "both"


class UnitWeights(StrEnum):
    """How :class:`~monai_elvis.losses.ElvisLoss` weights the units of a sample in :class:`LocalAlignmentLoss`.

    - ``"uniform"``: every valid unit alike.
    - ``"attention_pooling"``: by the network's attention-pooling weights (``OutKeys.IMAGE_LOCAL_WEIGHTS`` and
      ``OutKeys.TEXT_SENTENCE_WEIGHTS``), detached, as LoVT weights its local losses.
    """

    UNIFORM = "uniform"
    ATTENTION_POOLING = "attention_pooling"


TARGETS = tuple(t.value for t in LocalTarget)
TARGET_SOURCES = tuple(t.value for t in TargetSource)
_NEG = -1e9  # logit of a padded unit (finite, so that a padded row's softmax stays finite)


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


class _PairedContrast(torch.autograd.Function):
    """Per-unit losses of the within-sample contrast of local features ``x`` against attended features ``y``.

    ``C_ij = scale * cos(x_i, y_j)`` from one batched product of the raw features (the cosine's norms applied to
    ``C``, so that nothing of size ``[B, M, d]`` is normalised); then, with the target ``T`` (rows summing to 1):

    - ``loss_r[i] = logsumexp_j C_ij - sum_j T_ij C_ij`` (local ``i`` against every attended unit);
    - ``loss_c[j] = logsumexp_i C_ij - sum_i T_ji C_ij`` (attended ``j`` against every local unit), when ``both``,
      else zeros.

    Padded units (``valid`` False) are excluded from every softmax. The backward is written out: one ``[B, M, M]``
    gradient for both directions, then the two products.

    Shapes: ``x``, ``y`` ``[B, M, d]``; ``target`` ``None`` (identity), ``[M, M]`` or ``[B, M, M]``; ``valid``
    ``[B, M]`` or ``None`` -> ``(loss_r [B, M], loss_c [B, M])``.
    """

    @staticmethod
    def forward(ctx, x, y, target, valid, scale, both):
        nx, ny = torch.linalg.vector_norm(x, dim=-1), torch.linalg.vector_norm(y, dim=-1)  # [B, M]
        rx, ry = 1.0 / nx.clamp_min(1e-12), 1.0 / ny.clamp_min(1e-12)
        c = torch.bmm(x, y.transpose(1, 2))
        c.mul_((rx * scale).unsqueeze(2)).mul_(ry.unsqueeze(1))
        pair_valid = None
        if valid is not None:
            pair_valid = valid.unsqueeze(2) & valid.unsqueeze(1)
            c.masked_fill_(~pair_valid, _NEG)
        target_t = None if target is None else target.transpose(-1, -2).contiguous()
        scratch = None if target is None else torch.empty_like(c)
        lse_r = torch.logsumexp(c, 2)
        loss_r = lse_r - _target_sum(c, target, scratch, 2)
        lse_c = loss_c = None
        if both:
            lse_c = torch.logsumexp(c, 1)
            loss_c = lse_c - _target_sum(c, target_t, scratch, 1)
        ctx.save_for_backward(x, y, nx, ny, rx, ry, c, lse_r, lse_c, target, target_t, pair_valid)
        ctx.scale, ctx.both = scale, both
        return loss_r, loss_c if both else torch.zeros_like(loss_r)

    @staticmethod
    def backward(ctx, g_r, g_c):
        x, y, nx, ny, rx, ry, c, lse_r, lse_c, target, target_t, pair_valid = ctx.saved_tensors
        both = ctx.both
        g = torch.sub(c, lse_r.unsqueeze(2)).exp_().mul_(g_r.unsqueeze(2))  # dloss_r / dC: softmax_j minus target
        scratch = torch.empty_like(c)
        if both:
            g.add_(torch.sub(c, lse_c.unsqueeze(1), out=scratch).exp_().mul_(g_c.unsqueeze(1)))
        if target is None:
            g.diagonal(dim1=1, dim2=2).sub_(g_r + g_c if both else g_r)
        else:
            g.addcmul_(target, g_r.unsqueeze(2), value=-1.0)
            if both:  # loss_c[j] has -sum_i T_ji C_ij
                g.addcmul_(target_t, g_c.unsqueeze(1), value=-1.0)
        if pair_valid is not None:
            g.masked_fill_(~pair_valid, 0.0)
        gc = torch.mul(g, c, out=scratch)  # C_ij rides on both norms
        coef_x = torch.where(nx > 1e-12, gc.sum(2) * rx * rx, torch.zeros_like(rx)).unsqueeze(2)
        coef_y = torch.where(ny > 1e-12, gc.sum(1) * ry * ry, torch.zeros_like(ry)).unsqueeze(2)
        g.mul_((rx * ctx.scale).unsqueeze(2)).mul_(ry.unsqueeze(1))  # gradient of the raw products
        dx = torch.bmm(g, y).addcmul_(x, coef_x, value=-1.0)
        dy = torch.bmm(g.transpose(1, 2), x).addcmul_(y, coef_y, value=-1.0)
        return dx, dy, None, None, None, None


def _target_sum(c: torch.Tensor, target: torch.Tensor | None, scratch: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``sum_j T_ij C_ij`` (``dim=2``, ``T`` the target) or ``sum_i T'_ij C_ij`` (``dim=1``, ``T'`` its transpose)
    per unit: ``[B, M]``; ``None`` is the identity."""
    if target is None:
        return c.diagonal(dim1=1, dim2=2)
    return torch.mul(c, target, out=scratch).sum(dim)


class LocalAlignmentLoss(_Loss):
    """Within-sample contrastive alignment of local features with their cross-attended counterparts.

    For the regions of one image (and likewise for the sentences of one report), with
    ``C_ij = cos(v_i, v'_j) / temperature`` and ``v'_j`` region ``j`` attended over the report's sentences::

        L_local_to_attended = -sum_i u_i sum_j w_ij log softmax_j(C_ij)
        L_attended_to_local = -sum_j u_j sum_i w_ji log softmax_i(C_ij)     (directions="both")

    where ``u`` are unit weights (uniform, or given per unit; normalised over the valid units of a sample) and the
    target ``w`` (rows summing to 1) is

    - ``"one_hot"``: the identity (every other region of the same image is a negative);
    - ``"spatial"``: LoVT's distance prior (:func:`spatial_target`) for regions, the identity for sentences;
    - ``"intra_modal"`` (ELVIS): :func:`intra_modal_target` of the features inside one modality, from
      ``target_source``: the pre-projection features ``h_i`` / ``g_k`` or the detached projected ones.

    Each modality's loss is averaged over the batch; with ``directions="both"`` it is the sum of the two
    directions, computed from one shared similarity matrix. The total is
    ``region_weight * L_region + sentence_weight * L_sentence``. Padded sentences are ignored.

    LoVT (Müller et al., "Joint Learning of Localized Representations from Medical Images and Reports", ECCV 2022,
    and its released code, github.com/philip-mueller/lovt) is ``target="spatial", directions="both",
    temperature=0.3, spatial_threshold=0.5, spatial_smoothing=1.0, region_weight=0.375, sentence_weight=0.375,
    unit_weights="attention_pooling"``: its ``l2att`` and ``att2l`` losses of scan regions and report sentences,
    each weighted 0.375, units weighted by the (detached) attention-pooling weights of its encoders, without its
    optional normalisation by the number of negatives (off in its final configuration). The within-sample
    softmax, the spatial prior and the identity target of sentences are LoVT's. What remains different is the
    network's: LoVT's sentences are max-pooled tokens (here mean-pooled), its cross-attention and projections have
    their own layers (see :class:`~monai_elvis.networks.ElvisNet`).

    The ELVIS paper's full text was not available: the ``intra_modal`` formulation follows its stated principle
    (intra-modal similarity as the target of local alignment) and its Figure 1. Every temperature, weight and the
    target source are settings.

    Args:
        target: ``"one_hot"``, ``"spatial"`` or ``"intra_modal"`` (:class:`LocalTarget`).
        temperature: ``tau`` of the alignment softmax.
        target_temperature: ``tau_intra`` of the intra-modal target.
        target_source: ``"pre_projection"`` or ``"projected"`` (:class:`TargetSource`).
        spatial_threshold: relative distance limit of the spatial prior (LoVT's final configuration: 0.5).
        spatial_smoothing: ``lambda`` of ``exp(-lambda * d)`` in the spatial prior.
        region_weight: weight of the region (image) loss.
        sentence_weight: weight of the sentence (report) loss.
        directions: ``"local_to_attended"`` or ``"both"`` (:class:`AlignmentDirections`).
        unit_weights: ``"uniform"`` or ``"attention_pooling"`` (:class:`UnitWeights`): what
            :class:`~monai_elvis.losses.ElvisLoss` passes as ``region_weights`` / ``sentence_weights``.

    Shapes (``forward`` / :meth:`directional_losses`):
        ``image_local``, ``image_attended``: ``[B, N, d]``; ``text_local``, ``text_attended``: ``[B, S, d]``;
        ``sentence_mask``: ``[B, S]`` (True = real sentence; default all valid); ``image_local_pre``
        ``[B, N, C]`` and ``text_local_pre`` ``[B, S, D]`` (needed for ``intra_modal`` with
        ``pre_projection``); ``region_weights`` ``[B, N]``, ``sentence_weights`` ``[B, S]`` (optional, used as
        given: detach them to stop their gradient); ``grid_size`` ``(h, w)`` with ``h * w = N`` (``spatial``;
        default a square grid). Returns a scalar. Computed in float32 (float64 stays float64), also under autocast.
    """

    def __init__(
        self,
        target: LocalTarget | str = LocalTarget.INTRA_MODAL,
        temperature: float = 0.1,
        target_temperature: float = 0.1,
        target_source: TargetSource | str = TargetSource.PRE_PROJECTION,
        spatial_threshold: float = 0.3,
        spatial_smoothing: float = 1.0,
        region_weight: float = 0.5,
        sentence_weight: float = 0.5,
        directions: AlignmentDirections | str = AlignmentDirections.LOCAL_TO_ATTENDED,
        unit_weights: UnitWeights | str = UnitWeights.UNIFORM,
    ) -> None:
        super().__init__()
        self.target = check_option(target, LocalTarget, "target")
        self.target_source = check_option(target_source, TargetSource, "target_source")
        self.directions = check_option(directions, AlignmentDirections, "directions")
        self.unit_weights = check_option(unit_weights, UnitWeights, "unit_weights")
        if temperature <= 0 or target_temperature <= 0:
            raise ValueError(f"temperatures must be positive, got {temperature} and {target_temperature}.")
        self.temperature = temperature
        self.target_temperature = target_temperature
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
        if kind == LocalTarget.ONE_HOT:
            return None
        if kind == LocalTarget.SPATIAL:
            return self._spatial(grid_size, local.shape[1], local.device).to(local.dtype)
        if self.target_source == TargetSource.PROJECTED:
            source = local.detach()
        return intra_modal_target(source, self.target_temperature, mask).to(local.dtype)

    def _modality(self, local, attended, target, mask, unit_weights) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(local -> attended, attended -> local or None)`` of one modality, each averaged over the batch."""
        both = self.directions == AlignmentDirections.BOTH
        loss_r, loss_c = _PairedContrast.apply(local, attended, target, mask, 1.0 / self.temperature, both)
        u = torch.ones_like(loss_r) if unit_weights is None else unit_weights.to(loss_r.dtype)
        if mask is not None:
            u = torch.where(mask, u, torch.zeros_like(u))
        u = u / u.sum(dim=1, keepdim=True).clamp(min=1e-12)
        to_attended = (loss_r * u).sum(dim=1).mean()
        return to_attended, (loss_c * u).sum(dim=1).mean() if both else None

    def losses(
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
    ) -> dict[str, torch.Tensor]:
        """Every term, unweighted: ``region`` and ``sentence`` (each modality's loss: the sum of its directions),
        and with ``directions="both"`` also ``region_local_to_attended``, ``region_attended_to_local``,
        ``sentence_local_to_attended`` and ``sentence_attended_to_local``."""
        check_ndim(image_local, "image_local", 3, "[B, N, d]")
        check_ndim(text_local, "text_local", 3, "[B, S, d]")
        for name, t, ref in (("image_attended", image_attended, image_local), ("text_attended", text_attended, text_local)):
            if not isinstance(t, torch.Tensor) or t.shape != ref.shape:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must have the shape {tuple(ref.shape)} of its local features, got {shape}.")
        b = check_batch([("image_local", image_local), ("text_local", text_local)])
        n, s = image_local.shape[1], text_local.shape[1]
        mask = None if sentence_mask is None else check_mask(sentence_mask, "sentence_mask", (b, s), "sentence")
        need_pre = self.target == LocalTarget.INTRA_MODAL and self.target_source == TargetSource.PRE_PROJECTION
        for name, t, m in (("image_local_pre", image_local_pre, n), ("text_local_pre", text_local_pre, s)):
            if need_pre and t is None:
                raise ValueError(f"{name} is required for target='intra_modal' with target_source='pre_projection'.")
            if t is not None and (t.ndim != 3 or t.shape[:2] != (b, m)):
                raise ValueError(f"{name} must have shape [{b}, {m}, C], got shape {tuple(t.shape)}.")
        for name, t, m in (("region_weights", region_weights, n), ("sentence_weights", sentence_weights, s)):
            if t is not None and tuple(t.shape) != (b, m):
                raise ValueError(f"{name} must have shape {(b, m)}, got shape {tuple(t.shape)}.")

        dtype = torch.float64 if image_local.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=image_local.device.type, enabled=False):
            v, va = plain_tensor(image_local).to(dtype), plain_tensor(image_attended).to(dtype)
            t = zero_padding(plain_tensor(text_local).to(dtype), mask)
            ta = zero_padding(plain_tensor(text_attended).to(dtype), mask)
            g = None if text_local_pre is None else zero_padding(plain_tensor(text_local_pre).to(dtype), mask)
            h = None if image_local_pre is None else plain_tensor(image_local_pre).to(dtype)
            sentence_kind = LocalTarget.ONE_HOT if self.target == LocalTarget.SPATIAL else self.target
            region_target = self._target(self.target, v, h, None, grid_size)
            sentence_target = self._target(sentence_kind, t, g, mask, None)
            r_l2a, r_a2l = self._modality(v, va, region_target, None, region_weights)
            s_l2a, s_a2l = self._modality(t, ta, sentence_target, mask, sentence_weights)
        if r_a2l is None:
            return {"region": r_l2a, "sentence": s_l2a}
        return {
            "region": r_l2a + r_a2l,
            "sentence": s_l2a + s_a2l,
            "region_local_to_attended": r_l2a,
            "region_attended_to_local": r_a2l,
            "sentence_local_to_attended": s_l2a,
            "sentence_attended_to_local": s_a2l,
        }

    def directional_losses(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """The region (image) and sentence (report) losses, unweighted (arguments as :meth:`losses`)."""
        terms = self.losses(*args, **kwargs)
        return terms["region"], terms["sentence"]

    def forward(self, *args, **kwargs) -> torch.Tensor:
        region, sentence = self.directional_losses(*args, **kwargs)
        return self.region_weight * region + self.sentence_weight * sentence
