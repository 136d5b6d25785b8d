"""GLoRIA-style word-region attention loss, vectorised over every image-report pair of a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from monai_elvis.utils import check_batch, check_mask, check_ndim, zero_padding

__all__ = ["GloriaLocalLoss", "gloria_pair_similarity"]


def _word_region_similarity(
    words: torch.Tensor, regions: torch.Tensor, gram: torch.Tensor | None, attention_scale: float, eps: float
) -> torch.Tensor:
    """``cos(c_k, w_k)`` of every word against every image: ``words [K, d]``, ``regions [Bi, N, d]`` -> ``[K, Bi]``."""
    k, d = words.shape
    bi, nr, _ = regions.shape
    # scaled scores attention_scale * s: the scale is applied to the (small) word matrix, not the pair tensor
    scores = ((words * attention_scale) @ regions.reshape(bi * nr, d).T).view(k, bi, nr)  # [K, Bi, N]
    attn = torch.softmax(scores, dim=-1)
    dot = (attn * scores).sum(-1) / attention_scale  # <c_k, w_k>: [K, Bi]
    attn_i = attn.transpose(0, 1)  # [Bi, K, N]
    if gram is not None:
        ctx_sq = (torch.bmm(attn_i, gram) * attn_i).sum(-1)  # a^T G a: [Bi, K]
    else:
        ctx_sq = torch.bmm(attn_i, regions).pow(2).sum(-1)
    ctx_norm = ctx_sq.clamp(min=0).add(eps * eps).sqrt().T  # [K, Bi]
    return dot / (ctx_norm * words.norm(dim=-1, keepdim=True).clamp(min=eps))


def gloria_pair_similarity(
    words: torch.Tensor,
    regions: torch.Tensor,
    word_mask: torch.Tensor | None = None,
    attention_scale: float = 4.0,
    word_scale: float = 5.0,
    eps: float = 1e-8,
    max_pair_elements: int = 2**20,
) -> torch.Tensor:
    """Local similarity ``R(report_j, image_i)`` of every pair.

    For words ``w_k`` of report ``j`` and regions ``v_r`` of image ``i``: ``s_kr = <w_k, v_r>``,
    ``a_kr = softmax_r(attention_scale * s_kr)``, the word's region context ``c_k = sum_r a_kr v_r``,
    ``z_k = cos(c_k, w_k)`` and ``R = log(sum_k exp(word_scale * z_k)) / word_scale`` over the valid words.

    Every real word of the batch is scored against every image at once (padded words are not scored);
    ``<c_k, w_k> = sum_r a_kr s_kr`` reuses the scores and ``|c_k|^2 = a_k^T (V V^T) a_k`` uses the region Gram
    matrix when there are fewer regions than channels, so ``c_k`` is never materialised. The words are taken
    in chunks of at most ``max_pair_elements`` word-region scores, so that the pair tensors stay in cache.

    Shapes: ``words [Bt, T, d]``, ``regions [Bi, N, d]``, ``word_mask [Bt, T]`` -> ``[Bi, Bt]``.
    """
    bt, nt, d = words.shape
    bi, nr, _ = regions.shape
    flat = words.reshape(bt * nt, d) if word_mask is None else words[word_mask]  # [K, d]
    gram = torch.bmm(regions, regions.transpose(1, 2)) if nr <= d else None  # [Bi, N, N]
    chunk = max(1, max_pair_elements // (bi * nr))
    z = torch.cat(
        [_word_region_similarity(flat[i : i + chunk], regions, gram, attention_scale, eps)
         for i in range(0, flat.shape[0], chunk)]
    ) * word_scale  # [K, Bi]
    if word_mask is None:
        z_all = z.view(bt, nt, bi)
    else:
        z_all = z.new_full((bt, nt, bi), float("-inf")).index_put((word_mask,), z)
    return (torch.logsumexp(z_all, dim=1) / word_scale).T  # [Bi, Bt]


class GloriaLocalLoss(_Loss):
    """GLoRIA's local loss: word-region attention, log-sum-exp aggregation over words, batch-level contrast.

    ``logits_ij = similarity_scale * R(report_j, image_i)`` (:func:`gloria_pair_similarity`), then the symmetric
    cross-entropy with the matching pairs on the diagonal, like the global loss.

    This follows the equations of the GLoRIA paper (Huang et al., "GLoRIA: A Multimodal Global-Local
    Representation Learning Framework for Label-efficient Medical Image Recognition", ICCV 2021) with its
    default scales (4, 5, 10); the extra softmax over words in the published code is not reproduced.

    Args:
        attention_scale: ``1 / tau_1`` of the word-over-regions softmax.
        word_scale: ``tau_2`` of the log-sum-exp over words.
        similarity_scale: ``1 / tau_3`` of the batch contrast.
        image_to_text_weight: weight of the image -> report direction.
        text_to_image_weight: weight of the report -> image direction.

    Shapes: ``words [B, T, d]``, ``regions [B, N, d]``, ``word_mask [B, T]`` (True = real word; optional) -> scalar.
    Computed in float32, also under autocast.
    """

    def __init__(
        self,
        attention_scale: float = 4.0,
        word_scale: float = 5.0,
        similarity_scale: float = 10.0,
        image_to_text_weight: float = 0.5,
        text_to_image_weight: float = 0.5,
    ) -> None:
        super().__init__()
        self.attention_scale = attention_scale
        self.word_scale = word_scale
        self.similarity_scale = similarity_scale
        self.image_to_text_weight = image_to_text_weight
        self.text_to_image_weight = text_to_image_weight

    def forward(self, words: torch.Tensor, regions: torch.Tensor, word_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_ndim(words, "words", 3, "[B, T, d]")
        check_ndim(regions, "regions", 3, "[B, N, d]")
        b = check_batch([("words", words), ("regions", regions)])
        if words.shape[2] != regions.shape[2]:
            raise ValueError(f"words {tuple(words.shape)} and regions {tuple(regions.shape)} differ in size d.")
        mask = None if word_mask is None else check_mask(word_mask, "word_mask", words.shape[:2], "word")
        with torch.autocast(device_type=words.device.type, enabled=False):
            w = zero_padding(words.float(), mask)
            sim = gloria_pair_similarity(w, regions.float(), mask, self.attention_scale, self.word_scale)
            logits = sim * self.similarity_scale  # [B_image, B_text]
            target = torch.arange(b, device=words.device)
            loss = self.image_to_text_weight * F.cross_entropy(logits, target)
            return loss + self.text_to_image_weight * F.cross_entropy(logits.T, target)
