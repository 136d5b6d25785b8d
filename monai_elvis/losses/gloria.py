"""GLoRIA's word-region attention loss, in the form of its paper or of its released code, vectorised over every
image-report pair of a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.utils import StrEnum
from torch.nn.modules.loss import _Loss

from monai_elvis.losses.distributed import distributed_world, gather_across_ranks
from monai_elvis.utils import check_batch, check_mask, check_ndim, check_option, plain_tensor, zero_padding

__all__ = ["GloriaForm", "WordUnit", "GloriaLocalLoss", "gloria_pair_similarity"]

_SYMMETRIC_BLOCK_MIN = 192  # regions from which a symmetric product is worth splitting into blocks


class GloriaForm(StrEnum):
    """Which GLoRIA local loss :class:`GloriaLocalLoss` computes.

    - ``"paper"``: the equations of the paper: ``a_kr = softmax_r(gamma1 * s_kr)`` and
      ``R = log(sum_k exp(gamma2 * z_k)) / gamma2``.
    - ``"code"``: GLoRIA's released code (``gloria/loss/gloria_loss.py``): ``a_kr = softmax_r(gamma1 *
      softmax_k(s_kr))`` (a softmax over the report's words for each region first) and
      ``R = log(sum_k exp(gamma2 * z_k))`` (no ``1 / gamma2``).
    """

    PAPER = "paper"
    CODE = "code"


class WordUnit(StrEnum):
    """The "words" that :class:`~monai_elvis.losses.ElvisLoss` gives :class:`GloriaLocalLoss`.

    - ``"token"``: the projected sub-word tokens of the report's sentences (``OutKeys.TEXT_TOKEN``; no [CLS]/[SEP]).
    - ``"whole_word"``: whole words, as GLoRIA: the sub-word token features of a word summed, with [CLS] as a word
      of its own and [SEP] left out (``OutKeys.TEXT_WORD``). The batch must carry ``Keys.WORD_INDEX``
      (``TokenizeReportd(word_index=True)``). GLoRIA's code counts a report's words as those not starting with
      ``[``, so a report with an ``[UNK]`` word loses its last word(s); that quirk is not reproduced.
    """

    TOKEN = "token"
    WHOLE_WORD = "whole_word"


def _symmetric_bmm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y`` per batch item for a product known to be symmetric (``V V^T``, ``A^T diag(e) A``). From
    :data:`_SYMMETRIC_BLOCK_MIN` rows on, only the blocks on and above the diagonal of a 3 x 3 block split are
    multiplied (2/3 of the work); those below are their transposes.

    Shapes: ``x [B, N, K]``, ``y [B, K, N]`` -> ``[B, N, N]``.
    """
    n = x.shape[1]
    if n < _SYMMETRIC_BLOCK_MIN:
        return torch.bmm(x, y)
    out = x.new_empty(x.shape[0], n, n)
    edges = [round(i * n / 3) for i in range(4)]
    for i in range(3):
        rows = slice(edges[i], edges[i + 1])
        for j in range(i, 3):
            cols = slice(edges[j], edges[j + 1])
            torch.bmm(x[:, rows], y[:, :, cols], out=out[:, rows, cols])
            if j > i:
                out[:, cols, rows] = out[:, rows, cols].transpose(1, 2)
    return out


def _rowwise_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``sum_r x y`` over the last dimension, as a batched matrix product (no product tensor is allocated).

    Shapes: ``x [..., N]``, ``y [..., N]`` (both contiguous) -> ``[...]``.
    """
    n = x.shape[-1]
    return torch.bmm(x.reshape(-1, 1, n), y.reshape(-1, n, 1)).view(x.shape[:-1])


def _report_attention_logits(s: torch.Tensor, bounds: tuple[tuple[int, int], ...], form: GloriaForm, scale: float):
    """Yield ``(start, end, x)`` per report: ``x = scale * softmax over the report's words of s`` (``"code"``) or
    ``scale * s`` (``"paper"``), the logits of the softmax over regions, in one reused buffer of the largest
    report's size (so that no tensor of the size of ``s`` is allocated).

    Shapes: ``s [K, Bi N]`` -> ``x [end - start, Bi N]``.
    """
    longest = max(end - start for start, end in bounds)
    buffer = s.new_empty(longest, s.shape[1])
    for start, end in bounds:
        x = buffer[: end - start]
        if form == GloriaForm.CODE:
            torch.softmax(s[start:end], dim=0, out=x)
            x.mul_(scale)
        else:
            torch.mul(s[start:end], scale, out=x)
        yield start, end, x


class _WordRegionContext(torch.autograd.Function):
    """For every word ``k`` (rows of ``words``, the words of each report contiguous) and image ``i``:
    ``dot_ki = <c_ki, w_k>`` and ``csq_ki = |c_ki|^2`` of the word's region context ``c_ki = sum_r a_kir v_ir``.

    - ``s_kir = <w_k, v_ir>`` for all pairs: one matrix product ``[K, d] @ [d, Bi N]``.
    - ``a_kir = softmax_r(scale * x_kir)`` with ``x`` the softmax of ``s`` over each report's words (``form="code"``)
      or ``x = s`` (``form="paper"``).
    - ``<c, w> = sum_r a s`` reuses the scores.
    - With fewer regions than channels (``N <= d``): ``|c|^2 = sum_r a q`` with ``q = a G_i`` and the region Gram
      matrix ``G_i = V_i V_i^T``; ``q`` is kept, so that ``d|c|^2 / da = 2 q`` costs no product. Otherwise ``q = c``
      (the contexts, ``[Bi, K, d]``).

    The backward is written out so that only these matrix products run: the scores' two (``dW = dS V``,
    ``dV = dS^T W``), ``dG_i = a^T diag(d|c|^2) a`` and ``dV += 2 dG V`` (``G`` and ``dG`` symmetric:
    :func:`_symmetric_bmm`). The softmax over regions uses ``sum_r a da = d_dot <c, w> + 2 d_csq |c|^2`` instead of
    a reduction. Three ``[K, Bi N]`` tensors are kept for the backward (``s``, ``a``, ``q``) and one more is
    allocated in it; ``x`` is recomputed one report at a time (:func:`_report_attention_logits`). Nothing else of
    that size is allocated: on CPU each fresh tensor that size costs about as much as a pass over it in page
    faults.

    Shapes: ``words [K, d]``, ``regions [Bi, N, d]``, ``bounds``: ``(start, end)`` rows of each report with words
    -> ``([K, Bi], [K, Bi])``.
    """

    @staticmethod
    def forward(ctx, words, regions, bounds, form, scale):
        k, d = words.shape
        bi, nr, _ = regions.shape
        flat_regions = regions.reshape(bi * nr, d)
        s = words @ flat_regions.T  # [K, Bi * N]
        s3 = s.view(k, bi, nr)
        a = torch.empty_like(s3)
        for start, end, x in _report_attention_logits(s, bounds, form, scale):
            torch.softmax(x.view(end - start, bi, nr), dim=2, out=a[start:end])  # [K, Bi, N]
        dot = _rowwise_dot(a, s3)  # [K, Bi]
        gram = None
        if nr <= d:
            gram = _symmetric_bmm(regions, regions.transpose(1, 2))  # [Bi, N, N]
            q = torch.empty_like(a)
            torch.bmm(a.transpose(0, 1), gram, out=q.transpose(0, 1))  # a G: [K, Bi, N]
            csq = _rowwise_dot(q, a)
        else:
            q = torch.bmm(a.transpose(0, 1), regions)  # the contexts c: [Bi, K, d]
            csq = q.pow(2).sum(2).T
        ctx.save_for_backward(words, regions, s, a, q, dot, csq)
        ctx.bounds, ctx.form, ctx.scale, ctx.use_gram = bounds, form, scale, gram is not None
        return dot, csq

    @staticmethod
    def backward(ctx, d_dot, d_csq):
        words, regions, s, a, q, dot, csq = ctx.saved_tensors
        k, bi, nr = a.shape
        d = words.shape[1]
        scale = ctx.scale
        # sum_r a da with da = d_dot s + d_csq d|c|^2/da: d_dot <c, w> + 2 d_csq |c|^2
        mean = torch.addcmul(d_dot * dot, d_csq, csq, value=2.0).unsqueeze(2)
        d_dot, d_csq = d_dot.unsqueeze(2), d_csq.unsqueeze(2)  # [K, Bi, 1]
        u = torch.empty_like(a)  # the backward's one tensor of the scores' size; first a diag(d|c|^2)
        d_gram = d_regions_ctx = None
        if ctx.use_gram:  # d|c|^2 / dG = a a^T
            torch.mul(a, d_csq, out=u)
            d_gram = _symmetric_bmm(a.permute(1, 2, 0), u.transpose(0, 1))  # [Bi, N, N]
        torch.addcmul(mean.neg_(), s.view(k, bi, nr), d_dot, out=u)  # da - mean, the scores' part
        if ctx.use_gram:  # d|c|^2 / da = 2 G a = 2 q
            u.addcmul_(q, d_csq, value=2.0)
        else:  # d|c|^2 / da = 2 V c, d|c|^2 / dV = 2 a c^T
            gc = q * (2 * d_csq.transpose(0, 1))  # [Bi, K, d]
            u += torch.bmm(gc, regions.transpose(1, 2)).transpose(0, 1)
            d_regions_ctx = torch.bmm(a.permute(1, 2, 0), gc)  # [Bi, N, d]
        u.mul_(a)  # through the softmax over regions: dL/dx = scale * u
        if ctx.form == GloriaForm.CODE:  # through the softmax over each report's words, x = scale p recomputed:
            flat = u.view(k, bi * nr)  # ds = scale * p (u - sum_k p u)
            for start, end, x in _report_attention_logits(s, ctx.bounds, ctx.form, scale):
                us = flat[start:end]
                us.sub_(torch.linalg.vecdot(x, us, dim=0), alpha=1.0 / scale).mul_(x)
            ds = u.addcmul_(a, d_dot).view(k, bi * nr)  # + a d_dot: <c, w> = sum_r a s
            grad_scale = 1.0
        else:  # ds = scale * u + a d_dot, the factor scale applied to the two products' results
            ds = u.addcmul_(a, d_dot, value=1.0 / scale).view(k, bi * nr)
            grad_scale = scale
        flat_regions = regions.reshape(bi * nr, d)
        d_words = ds @ flat_regions
        d_regions = (ds.T @ words).view(bi, nr, d)
        if grad_scale != 1.0:
            d_words.mul_(grad_scale)
            d_regions.mul_(grad_scale)
        if d_gram is not None:  # through G = V V^T: dV = (dG + dG^T) V = 2 dG V (dG is symmetric)
            d_regions.baddbmm_(d_gram, regions, alpha=2.0)
        else:
            d_regions += d_regions_ctx
        return d_words, d_regions, None, None, None


def gloria_pair_similarity(
    words: torch.Tensor,
    regions: torch.Tensor,
    word_mask: torch.Tensor | None = None,
    attention_scale: float = 4.0,
    word_scale: float = 5.0,
    eps: float = 1e-8,
    form: GloriaForm | str = GloriaForm.PAPER,
) -> torch.Tensor:
    """Local similarity ``R(report_j, image_i)`` of every pair.

    For words ``w_k`` of report ``j`` and regions ``v_r`` of image ``i``: ``s_kr = <w_k, v_r>``; the attention
    ``a_kr = softmax_r(attention_scale * s_kr)`` (``form="paper"``) or
    ``a_kr = softmax_r(attention_scale * softmax_k(s_kr))`` with the inner softmax over the report's valid words
    (``form="code"``); the word's region context ``c_k = sum_r a_kr v_r``; ``z_k = cos(c_k, w_k)``; and
    ``R = log(sum_k exp(word_scale * z_k)) / word_scale`` (paper) or ``R = log(sum_k exp(word_scale * z_k))``
    (code), over the valid words. The paper's cosine is ``<c, w> / (sqrt(|c|^2 + eps^2) max(|w|, eps))``, the
    code's ``<c, w> / max(|c| |w|, eps)``.

    Every real word of the batch is scored against every image in one matrix product (padded words are not
    scored) and ``c_k`` is never materialised (see :class:`_WordRegionContext`). Memory: four float tensors of
    ``K x Bi x N`` (``K`` the batch's real words) at the peak of the backward.

    Shapes: ``words [Bt, T, d]``, ``regions [Bi, N, d]``, ``word_mask [Bt, T]`` -> ``[Bi, Bt]``.
    """
    form = check_option(form, GloriaForm, "form")
    bt, nt, d = words.shape
    bi, nr, _ = regions.shape
    mask = torch.ones(bt, nt, dtype=torch.bool, device=words.device) if word_mask is None else word_mask
    flat = words[mask]  # [K, d], the words of each report contiguous
    counts = mask.sum(1).tolist()
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    bounds = tuple((offsets[j], offsets[j + 1]) for j in range(bt) if counts[j])
    dot, csq = _WordRegionContext.apply(flat, regions, bounds, form, float(attention_scale))  # [K, Bi]
    word_norm = flat.norm(dim=1, keepdim=True)
    if form == GloriaForm.CODE:
        z = dot / (csq.clamp_min(eps * eps).sqrt() * word_norm).clamp_min(eps)
    else:
        z = dot / ((csq.clamp_min(0) + eps * eps).sqrt() * word_norm.clamp_min(eps))
    z_all = z.new_full((bt, nt, bi), float("-inf")).index_put((mask,), z * word_scale)
    r = torch.logsumexp(z_all, dim=1).T  # [Bi, Bt]
    return r / word_scale if form == GloriaForm.PAPER else r


class GloriaLocalLoss(_Loss):
    """GLoRIA's local loss: word-region attention, log-sum-exp aggregation over words, batch-level contrast.

    ``logits_ij = similarity_scale * R(report_j, image_i)`` (:func:`gloria_pair_similarity`) and
    ``loss = image_to_text_weight * CE(logits, diag) + text_to_image_weight * CE(logits^T, diag)``, each
    cross-entropy averaged over the batch.

    Reference: Huang et al., "GLoRIA: A Multimodal Global-Local Representation Learning Framework for
    Label-efficient Medical Image Recognition", ICCV 2021, and its released code (github.com/marshuang80/gloria).

    ``form`` selects what is computed (:class:`GloriaForm`):

    - ``"paper"`` (default, this class's behaviour before the form existed): the paper's equations, a single
      softmax over regions and ``R = log(sum exp(gamma2 z))^(1 / gamma2)``; directions weighted 0.5 / 0.5 unless
      given.
    - ``"code"``: what GLoRIA's released code computes (``local_loss`` in ``gloria/loss/gloria_loss.py``): for each
      region, a softmax over the report's words first, then ``softmax_r(gamma1 * .)`` (attention logits bounded in
      ``[0, gamma1]``); no ``1 / gamma2``, so the batch logits are ``gamma2`` times sharper; the two directions
      summed (weights 1 / 1 unless given). With ``word_units="whole_word"`` the words are GLoRIA's: whole words
      with [CLS]. Remaining differences from GLoRIA's training: its words are sums of the last four BERT layers
      without a projection (here: the network's projected text features, see :class:`~monai_elvis.networks.ElvisNet`),
      and its reports are stripped of punctuation before tokenisation.

    Args:
        attention_scale: ``gamma1`` (``1 / tau_1``) of the softmax over regions.
        word_scale: ``gamma2`` of the log-sum-exp over words.
        similarity_scale: ``gamma3`` (``1 / tau_3``) of the batch contrast.
        image_to_text_weight: weight of the image -> report direction; ``None``: 0.5 (paper) or 1 (code).
        text_to_image_weight: weight of the report -> image direction; ``None``: 0.5 (paper) or 1 (code).
        form: ``"paper"`` or ``"code"`` (:class:`GloriaForm`).
        word_units: ``"token"`` or ``"whole_word"`` (:class:`WordUnit`): which features
            :class:`~monai_elvis.losses.ElvisLoss` passes as words. ``forward`` itself takes any words.
        gather: under ``torch.distributed`` with more than one rank, score every image-report pair of the whole
            batch (words, word masks and regions gathered from every rank, with their gradient): each rank scores
            its own images against every report and its own reports against every image, and returns its share of
            the whole batch's loss, as :class:`~monai_elvis.losses.GlobalContrastiveLoss` does. ``False``: each
            rank's own batch only. No effect in one process.

    Shapes: ``words [B, T, d]``, ``regions [B, N, d]``, ``word_mask [B, T]`` (True = real word; optional) -> scalar.
    Computed in float32 (float64 stays float64), also under autocast.
    """

    def __init__(
        self,
        attention_scale: float = 4.0,
        word_scale: float = 5.0,
        similarity_scale: float = 10.0,
        image_to_text_weight: float | None = None,
        text_to_image_weight: float | None = None,
        form: GloriaForm | str = GloriaForm.PAPER,
        word_units: WordUnit | str = WordUnit.TOKEN,
        gather: bool = True,
    ) -> None:
        super().__init__()
        self.gather = gather
        for name, value in (("attention_scale", attention_scale), ("word_scale", word_scale),
                            ("similarity_scale", similarity_scale)):  # fmt: skip
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}.")
        self.form = check_option(form, GloriaForm, "form")
        self.word_units = check_option(word_units, WordUnit, "word_units")
        default = 1.0 if self.form == GloriaForm.CODE else 0.5
        self.attention_scale = attention_scale
        self.word_scale = word_scale
        self.similarity_scale = similarity_scale
        self.image_to_text_weight = default if image_to_text_weight is None else image_to_text_weight
        self.text_to_image_weight = default if text_to_image_weight is None else text_to_image_weight

    def similarity(self, words: torch.Tensor, regions: torch.Tensor, word_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``R(report_j, image_i)`` of this loss's form: ``[B_image, B_report]`` (inputs as :meth:`forward`)."""
        return gloria_pair_similarity(words, regions, word_mask, self.attention_scale, self.word_scale, form=self.form)

    def forward(self, words: torch.Tensor, regions: torch.Tensor, word_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_ndim(words, "words", 3, "[B, T, d]")
        check_ndim(regions, "regions", 3, "[B, N, d]")
        b = check_batch([("words", words), ("regions", regions)])
        if words.shape[2] != regions.shape[2]:
            raise ValueError(f"words {tuple(words.shape)} and regions {tuple(regions.shape)} differ in size d.")
        mask = None if word_mask is None else check_mask(word_mask, "word_mask", words.shape[:2], "word")
        dtype = torch.float64 if words.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=words.device.type, enabled=False):
            w = zero_padding(plain_tensor(words).to(dtype), mask)
            regions = plain_tensor(regions).to(dtype)
            _, world = distributed_world()
            if not (self.gather and world > 1):
                logits = self.similarity(w, regions, mask) * self.similarity_scale  # [B_image, B_text]
                target = torch.arange(b, device=words.device)
                loss = self.image_to_text_weight * F.cross_entropy(logits, target)
                return loss + self.text_to_image_weight * F.cross_entropy(logits.T, target)
            if mask is None:
                mask = torch.ones(w.shape[:2], dtype=torch.bool, device=w.device)
            w_all, offset = gather_across_ranks(w)  # reports of other lengths: padded words, masked out
            mask_all, _ = gather_across_ranks(mask, pad_value=False)
            regions_all, _ = gather_across_ranks(regions)
            target = torch.arange(offset, offset + b, device=words.device)
            image_rows = self.similarity(w_all, regions, mask_all) * self.similarity_scale  # [b, B]: own images
            text_rows = self.similarity(w, regions_all, mask).T * self.similarity_scale  # [b, B]: own reports
            loss = self.image_to_text_weight * F.cross_entropy(image_rows, target)
            loss = loss + self.text_to_image_weight * F.cross_entropy(text_rows, target)
            return loss * (world * b / w_all.shape[0])  # this rank's share: the ranks' mean is the whole batch's
