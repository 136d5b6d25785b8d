"""Reference implementations of the published objectives, for the loss benchmark.

Written here from the equations of the papers and of the authors' released code, in the plain way those codes
compute them (contexts materialised, a loop over reports for GLoRIA; normalised features, a target matrix per
sample and masked log-sum-exps for LoVT), independently of :mod:`monai_elvis.losses`. They are what the
library's objectives are timed against; ``tests/test_benchmarks.py`` checks that they agree with them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "gloria_code_reference", "gloria_paper_reference", "lovt_reference", "word_region_score_products",
    "unit_pair_products",
]  # fmt: skip


def _gloria_reference(words, regions, word_mask, form, gamma1, gamma2, gamma3, weight):
    b = words.shape[0]
    columns = []
    for j in range(b):  # one report against every image at once
        w = words[j][word_mask[j]]  # [T, d]
        scores = torch.einsum("td,ind->itn", w, regions)  # [B_image, T, N]
        if form == "code":
            attn = torch.softmax(gamma1 * torch.softmax(scores, dim=1), dim=2)  # words first, then regions
        else:
            attn = torch.softmax(gamma1 * scores, dim=2)
        context = torch.bmm(attn, regions)  # [B_image, T, d]
        cos = F.cosine_similarity(context, w.unsqueeze(0).expand_as(context), dim=-1, eps=1e-8)  # [B_image, T]
        r = torch.log(torch.exp(gamma2 * cos).sum(dim=1))
        columns.append(r if form == "code" else r / gamma2)
    logits = torch.stack(columns, dim=1) * gamma3  # [image, report]
    target = torch.arange(b, device=words.device)
    return weight * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def gloria_code_reference(words, regions, word_mask, gamma1=4.0, gamma2=5.0, gamma3=10.0) -> torch.Tensor:
    """GLoRIA's local loss as its released code computes it (``local_loss`` in ``gloria/loss/gloria_loss.py``).

    For each report ``j`` against all images ``i`` at once: ``s = <w_k, v_ir>``; a softmax over the report's words
    for each region, then ``softmax_r(gamma1 * .)``; contexts ``c_ki = sum_r a_kir v_ir`` (materialised);
    ``z = cos(c, w)``; ``R_ij = log sum_k exp(gamma2 z_k)``; logits ``gamma3 R``; the image->report and
    report->image cross-entropies summed. Shapes: ``words [B, T, d]``, ``regions [B, N, d]``, ``word_mask [B, T]``.
    """
    return _gloria_reference(words, regions, word_mask, "code", gamma1, gamma2, gamma3, 1.0)


def gloria_paper_reference(words, regions, word_mask, gamma1=4.0, gamma2=5.0, gamma3=10.0) -> torch.Tensor:
    """GLoRIA's local loss as its paper writes it: a single softmax over regions, ``R = log(sum_k exp(gamma2 z_k))
    / gamma2``, the two directions averaged; otherwise as :func:`gloria_code_reference`."""
    return _gloria_reference(words, regions, word_mask, "paper", gamma1, gamma2, gamma3, 0.5)


def _spatial_prior(h: int, w: int, threshold: float, smoothing: float, device) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], dim=1).double() / math.sqrt(h * h + w * w)
    dist = torch.cdist(coords, coords)
    return (torch.exp(-smoothing * dist) * (dist <= threshold)).to(device)


def _lovt_local(local, attended, pos, mask, weights, temperature):
    """LoVT's ``LocalIntraSampleContrastiveLoss`` (no negatives from the same modality, no normalisation by the
    number of negatives): ``(l2att, att2l)``."""
    b, m, _ = local.shape
    weights = weights if weights is not None else local.new_ones(b, m)
    additive = local.new_zeros(b, m)
    if mask is not None:
        weights = weights * mask
        additive = additive.masked_fill(~mask, float("-inf"))
    weights = weights / weights.sum(dim=1, keepdim=True)
    pos = pos.to(local.dtype).expand(b, m, m)
    if mask is not None:
        pos = pos * mask[:, None, :]
    pos = pos / pos.sum(-1, keepdim=True).clamp_min(1e-12)
    za, zb = F.normalize(local, dim=-1), F.normalize(attended, dim=-1)
    scores_ab = torch.bmm(za, zb.transpose(1, 2)) / temperature  # one product, both directions
    scores_ba = scores_ab.transpose(1, 2)
    loss_ab = -(pos * scores_ab).sum(-1) + torch.logsumexp(scores_ab + additive[:, None, :], dim=-1)
    loss_ba = -(pos * scores_ba).sum(-1) + torch.logsumexp(scores_ba + additive[:, None, :], dim=-1)
    return (weights * loss_ab).sum(-1).mean(), (weights * loss_ba).sum(-1).mean()


def lovt_reference(
    image_local, image_attended, text_local, text_attended, sentence_mask, image_global, text_global, grid_size,
    region_weights=None, sentence_weights=None, temperature=0.3, threshold=0.5, smoothing=1.0,
    global_temperature=0.1,
) -> torch.Tensor:  # fmt: skip
    """LoVT's full objective as its released code computes it (``LoVT_100.yaml``): ``0.375`` times each of
    ``l2att`` and ``att2l`` of scan regions (spatial prior: relative threshold 0.5, ``exp(-d)`` weights) and of
    report sentences (identity target), temperature 0.3, units weighted by the given (attention-pooling)
    weights; plus the global InfoNCE, ``0.75`` image->report and ``0.25`` report->image, temperature 0.1.
    """
    h, w = grid_size
    pos_a = _spatial_prior(h, w, threshold, smoothing, image_local.device)
    pos_b = torch.eye(text_local.shape[1], device=text_local.device)
    a_l2att, a_att2l = _lovt_local(image_local, image_attended, pos_a, None, region_weights, temperature)
    b_l2att, b_att2l = _lovt_local(text_local, text_attended, pos_b, sentence_mask, sentence_weights, temperature)
    zi, zt = F.normalize(image_global, dim=-1), F.normalize(text_global, dim=-1)
    logits = zi @ zt.T / global_temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    global_ = 0.75 * F.cross_entropy(logits, target) + 0.25 * F.cross_entropy(logits.T, target)
    return 0.375 * (a_l2att + a_att2l + b_l2att + b_att2l) + global_


def word_region_score_products(words: torch.Tensor, regions: torch.Tensor, grad: torch.Tensor) -> None:
    """The unavoidable work of any GLoRIA local loss: the word-region scores of all ``B^2`` image-report pairs,
    ``S = W V^T`` over the valid words ``W [K, d]`` of every report and the regions ``V [B N, d]`` of every image,
    and their two backward products ``dW = dS V`` and ``dV = dS^T W``, as three plain matrix products; ``grad``
    ``[K, B N]`` stands in for ``dS``."""
    words @ regions.T
    grad @ regions
    grad.T @ words


def unit_pair_products(local: torch.Tensor, attended: torch.Tensor, grad: torch.Tensor) -> None:
    """The unavoidable work of any LoVT-style local loss of one modality: the within-sample scores
    ``C = X Y^T`` of the local units ``X [B, M, d]`` against the attended units ``Y [B, M, d]``, and their two
    backward products ``dX = dC Y`` and ``dY = dC^T X``, as three plain batched matrix products; ``grad``
    ``[B, M, M]`` stands in for ``dC``."""
    torch.bmm(local, attended.transpose(1, 2))
    torch.bmm(grad, attended)
    torch.bmm(grad.transpose(1, 2), local)
