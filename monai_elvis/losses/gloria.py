"""GLoRIA's word-region attention loss, in the form of its paper or of its released code, vectorised over every
image-report pair of a batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.utils import StrEnum
from torch.nn.modules.loss import _Loss

from monai_elvis.losses.distributed import distributed_world, gather_across_ranks
from monai_elvis.utils import check_batch, check_mask, check_ndim, check_option, plain_tensor, zero_padding

__all__ = ["GloriaForm", "WordUnit", "GloriaLocalLoss", "gloria_pair_similarity"]


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


class _SymmetricGram(torch.autograd.Function):
    """``G = V V^T`` per batch item, with the backward ``dV = (dG + dG^T) V`` in one product."""

    @staticmethod
    def forward(ctx, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(v)
        return torch.bmm(v, v.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (v,) = ctx.saved_tensors
        return torch.bmm(grad + grad.transpose(1, 2), v)


class _WordRegionContext(torch.autograd.Function):
    """For every word ``k`` (rows of ``words``, the words of each report contiguous) and image ``i``:
    ``dot_ki = <c_ki, w_k>`` and ``csq_ki = |c_ki|^2`` of the word's region context ``c_ki = sum_r a_kir v_ir``.

    ``s_kir = <w_k, v_ir>`` for all pairs comes from one matrix product; ``a_kir = softmax_r(scale * x_kir)`` with
    ``x = softmax over the report's words of s`` (``bounds`` given: GLoRIA's code) or ``x = s`` (the paper).
    ``<c, w> = sum_r a s`` reuses the scores; ``|c|^2 = a^T G_i a`` with the region Gram matrix ``G_i`` when it is
    given (fewer regions than channels), else ``|sum_r a v|^2``. The backward is written out, so that only the
    unavoidable products run: the scores' two, and two of the size of ``a G``.

    Shapes: ``words [K, d]``, ``regions [Bi, N, d]``, ``gram [Bi, N, N]`` or ``None`` -> ``([K, Bi], [K, Bi])``.
    """

    @staticmethod
    def forward(ctx, words, regions, gram, bounds, scale):
        k, d = words.shape
        bi, nr, _ = regions.shape
        s = words @ regions.reshape(bi * nr, d).T  # [K, Bi * N]
        p = None
        if bounds is not None:  # softmax over the words of each report, for every (image, region)
            p = torch.empty_like(s)
            for start, end in bounds:
                p[start:end] = torch.softmax(s[start:end], dim=0)
            a = (p * scale).view(k, bi, nr).exp_()  # logits in [0, scale]: no shift needed
        else:
            a = (s * scale).view(k, bi, nr)
            a = a.sub_(a.amax(dim=2, keepdim=True)).exp_()
        a = a.div_(a.sum(dim=2, keepdim=True))  # softmax over regions, in place: [K, Bi, N]
        s3 = s.view(k, bi, nr)
        at = a.transpose(0, 1)  # [Bi, K, N]
        scratch = torch.empty(k * bi * nr, dtype=s.dtype, device=s.device)
        dot = torch.mul(a, s3, out=scratch.view(k, bi, nr)).sum(2)  # [K, Bi]
        if gram is not None:
            q = torch.bmm(at, gram)  # a G: [Bi, K, N]
            csq = torch.mul(q, at, out=scratch.view(bi, k, nr)).sum(2).T
        else:
            q = torch.bmm(at, regions)  # the contexts c: [Bi, K, d]
            csq = q.pow(2).sum(2).T
        ctx.save_for_backward(words, regions, s, p, a, q)
        ctx.bounds, ctx.scale, ctx.use_gram = bounds, scale, gram is not None
        return dot, csq

    @staticmethod
    def backward(ctx, d_dot, d_csq):
        words, regions, s, p, a, q = ctx.saved_tensors
        k, bi, nr = a.shape
        d = words.shape[1]
        d_dot = d_dot.unsqueeze(2)
        d_csq = d_csq.T.unsqueeze(2)  # [Bi, K, 1]
        at = a.transpose(0, 1)
        da = s.view(k, bi, nr) * d_dot
        scratch = torch.empty(k * bi * nr, dtype=s.dtype, device=s.device)
        d_gram = d_regions_ctx = None
        if ctx.use_gram:  # d|c|^2 / da = 2 G a = 2 q; d|c|^2 / dG = a a^T
            da.addcmul_(q.transpose(0, 1), d_csq.transpose(0, 1), value=2.0)
            d_gram = torch.bmm(at.transpose(1, 2), torch.mul(at, d_csq, out=scratch.view(bi, k, nr)))
        else:  # d|c|^2 / da = 2 V c, d|c|^2 / dV = 2 a c^T
            gc = q * (2 * d_csq)  # [Bi, K, d]
            da += torch.bmm(gc, regions.transpose(1, 2)).transpose(0, 1)
            d_regions_ctx = torch.bmm(at.transpose(1, 2), gc)  # [Bi, N, d]
        # through the softmax over regions, in place: dx = scale * a * (da - sum_r a da)
        mean = torch.mul(a, da, out=scratch.view(k, bi, nr)).sum(2, keepdim=True)
        dx = da.sub_(mean).mul_(a).mul_(ctx.scale).view(k, bi * nr)
        if ctx.bounds is not None:  # through the softmax over each report's words, in place
            flat = scratch.view(k, bi * nr)
            for start, end in ctx.bounds:
                ps, xs = p[start:end], dx[start:end]
                xs.sub_(torch.mul(ps, xs, out=flat[start:end]).sum(0, keepdim=True)).mul_(ps)
        ds = dx
        ds.view(k, bi, nr).addcmul_(a, d_dot)  # <c, w> = sum_r a s
        d_words = ds @ regions.reshape(bi * nr, d)
        d_regions = (ds.T @ words).view(bi, nr, d)
        if d_regions_ctx is not None:
            d_regions += d_regions_ctx
        return d_words, d_regions, d_gram, None, None


def _report_chunks(counts: Sequence[int], per_word: int, max_pair_elements: int) -> list[tuple[int, int]]:
    """Consecutive reports grouped into chunks of at most ``max_pair_elements`` scores (at least one report);
    returns ``(first report, end report)`` pairs."""
    chunks, start, size = [], 0, 0
    for j, c in enumerate(counts):
        if j > start and (size + c) * per_word > max_pair_elements:
            chunks.append((start, j))
            start, size = j, 0
        size += c
    chunks.append((start, len(counts)))
    return chunks


def gloria_pair_similarity(
    words: torch.Tensor,
    regions: torch.Tensor,
    word_mask: torch.Tensor | None = None,
    attention_scale: float = 4.0,
    word_scale: float = 5.0,
    eps: float = 1e-8,
    max_pair_elements: int = 2**22,
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
    scored) and ``c_k`` is never materialised (see :class:`_WordRegionContext`). Reports are taken in chunks of at
    most ``max_pair_elements`` word-region scores.

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
    gram = _SymmetricGram.apply(regions) if nr <= d else None
    dots, csqs = [], []
    for first, end in _report_chunks(counts, bi * nr, max_pair_elements):
        lo = offsets[first]
        bounds = None
        if form == GloriaForm.CODE:
            bounds = tuple((offsets[j] - lo, offsets[j + 1] - lo) for j in range(first, end) if counts[j])
        dot, csq = _WordRegionContext.apply(flat[lo : offsets[end]], regions, gram, bounds, float(attention_scale))
        dots.append(dot)
        csqs.append(csq)
    dot, csq = torch.cat(dots), torch.cat(csqs)  # [K, Bi]
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
