"""The combined pre-training objective: global contrast plus a local alignment term."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from monai_elvis.keys import OutKeys
from monai_elvis.losses.global_contrastive import GlobalContrastiveLoss
from monai_elvis.losses.gloria import GloriaLocalLoss, WordUnit
from monai_elvis.losses.local_alignment import LocalAlignmentLoss, UnitWeights

__all__ = ["ElvisLoss"]


class ElvisLoss(nn.Module):
    """``loss = global_weight * global + local_weight * local`` over the output dict of :class:`ElvisNet`.

    One class serves every objective of the toolkit through its arguments (the overlays in ``configs/objective``):

    - ELVIS: ``local_loss=LocalAlignmentLoss(target="intra_modal")`` (the default);
    - LoVT: ``LocalAlignmentLoss(target="spatial", directions="both", unit_weights="attention_pooling", ...)`` with
      ``GlobalContrastiveLoss`` weights 0.75 / 0.25; one-hot locality: ``target="one_hot"``;
    - GLoRIA: ``local_loss=GloriaLocalLoss(form="code", word_units="whole_word")`` with global weights 1 / 1;
    - ConVIRT (global only): ``local_loss=None`` with global weights 0.75 / 0.25.

    What the local loss reads from the outputs:

    - :class:`GloriaLocalLoss`: the regions ``image_local`` and, as words, ``text_token`` / ``token_mask``
      (``word_units="token"``) or ``text_word`` / ``word_mask`` (``"whole_word"``: the batch must carry
      ``word_index``);
    - :class:`LocalAlignmentLoss`: local, attended and pre-projection features, masks and grid; with
      ``unit_weights="attention_pooling"`` also ``image_local_weights`` and ``text_sentence_weights``, detached.

    Args:
        global_loss: defaults to :class:`GlobalContrastiveLoss` with its defaults.
        local_loss: a :class:`LocalAlignmentLoss`, a :class:`GloriaLocalLoss` or ``None``.
        global_weight: weight of the global term; 0 skips it.
        local_weight: weight of the local term; 0 skips it.
        gather: when given, sets ``gather`` of the global loss and of a :class:`GloriaLocalLoss`: under
            ``torch.distributed``, contrast against the features of every rank (``True``, their default) or of
            the rank's own batch only. A :class:`LocalAlignmentLoss` works within each sample and gathers nothing.

    ``forward(outputs)`` takes the dict keyed by :class:`~monai_elvis.keys.OutKeys` and returns a dict of
    scalars: ``global``, ``local`` (with the unweighted terms of :meth:`LocalAlignmentLoss.losses` prefixed by
    ``local_``, such as ``local_region`` and ``local_sentence``, for a :class:`LocalAlignmentLoss`) for the terms
    that are on, and ``loss``, the weighted total.
    """

    def __init__(
        self,
        global_loss: GlobalContrastiveLoss | None = None,
        local_loss: LocalAlignmentLoss | GloriaLocalLoss | None = None,
        global_weight: float = 1.0,
        local_weight: float = 1.0,
        gather: bool | None = None,
    ) -> None:
        super().__init__()
        self.global_loss = global_loss if global_loss is not None else GlobalContrastiveLoss()
        if local_loss is not None and not isinstance(local_loss, (LocalAlignmentLoss, GloriaLocalLoss)):
            raise TypeError(f"local_loss must be a LocalAlignmentLoss, a GloriaLocalLoss or None, got {local_loss!r}.")
        self.local_loss = local_loss
        self.global_weight = global_weight
        self.local_weight = local_weight
        self.gather = gather
        if gather is not None:
            for loss in (self.global_loss, self.local_loss):
                if hasattr(loss, "gather"):
                    loss.gather = bool(gather)
        if global_weight == 0 and (local_loss is None or local_weight == 0):
            raise ValueError("ElvisLoss has no term: set global_weight or give a local_loss with local_weight > 0.")

    @staticmethod
    def _get(outputs: Mapping, key: str, hint: str = "") -> torch.Tensor:
        if key not in outputs:
            raise KeyError(f"ElvisLoss needs '{key}' in the network outputs{hint}; got keys {sorted(outputs)}.")
        return outputs[key]

    def _gloria(self, o: Mapping) -> torch.Tensor:
        loss = self.local_loss
        regions = self._get(o, OutKeys.IMAGE_LOCAL)
        if loss.word_units == WordUnit.WHOLE_WORD:
            hint = " for GloriaLocalLoss(word_units='whole_word') (tokenise with TokenizeReportd(word_index=True))"
            return loss(self._get(o, OutKeys.TEXT_WORD, hint), regions, self._get(o, OutKeys.WORD_MASK, hint))
        return loss(self._get(o, OutKeys.TEXT_TOKEN), regions, o.get(OutKeys.TOKEN_MASK))

    def _local_alignment(self, o: Mapping) -> dict[str, torch.Tensor]:
        loss = self.local_loss
        weights = {}
        if loss.unit_weights == UnitWeights.ATTENTION_POOLING:
            hint = " for unit_weights='attention_pooling' (a network that pools its global features by attention)"
            weights = {
                "region_weights": self._get(o, OutKeys.IMAGE_LOCAL_WEIGHTS, hint).detach(),
                "sentence_weights": self._get(o, OutKeys.TEXT_SENTENCE_WEIGHTS, hint).detach(),
            }
        terms = loss.losses(
            image_local=self._get(o, OutKeys.IMAGE_LOCAL),
            image_attended=self._get(o, OutKeys.IMAGE_LOCAL_ATTENDED),
            text_local=self._get(o, OutKeys.TEXT_SENTENCE),
            text_attended=self._get(o, OutKeys.TEXT_SENTENCE_ATTENDED),
            sentence_mask=o.get(OutKeys.SENTENCE_MASK),
            image_local_pre=o.get(OutKeys.IMAGE_LOCAL_PRE),
            text_local_pre=o.get(OutKeys.TEXT_SENTENCE_PRE),
            grid_size=o.get(OutKeys.IMAGE_GRID),
            **weights,
        )
        out = {f"local_{k}": v for k, v in terms.items()}
        out["local"] = loss.region_weight * terms["region"] + loss.sentence_weight * terms["sentence"]
        return out

    def forward(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        o, terms = outputs, {}
        total = None
        if self.global_weight != 0:
            terms["global"] = self.global_loss(self._get(o, OutKeys.IMAGE_GLOBAL), self._get(o, OutKeys.TEXT_GLOBAL))
            total = self.global_weight * terms["global"]
        if self.local_loss is not None and self.local_weight != 0:
            if isinstance(self.local_loss, GloriaLocalLoss):
                terms["local"] = self._gloria(o)
            else:
                terms.update(self._local_alignment(o))
            local = self.local_weight * terms["local"]
            total = local if total is None else total + local
        terms["loss"] = total
        return terms
