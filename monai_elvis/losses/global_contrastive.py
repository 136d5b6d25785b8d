"""Global image-report contrastive loss (ConVIRT / CLIP style symmetric InfoNCE)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.loss import _Loss

from monai_elvis.losses.distributed import distributed_world, gather_across_ranks
from monai_elvis.utils import l2_normalize, check_batch, check_ndim

__all__ = ["GlobalContrastiveLoss"]


class GlobalContrastiveLoss(_Loss):
    """Symmetric InfoNCE between global image and report embeddings across the batch.

    ``logits_ij = cos(v_i, t_j) / temperature``;
    ``loss = image_to_text_weight * CE(logits, diag) + text_to_image_weight * CE(logits^T, diag)``.

    References: Zhang et al., "Contrastive Learning of Medical Visual Representations from Paired Images and
    Text" (ConVIRT), 2020; Radford et al., "Learning Transferable Visual Models From Natural Language
    Supervision" (CLIP), 2021.

    Args:
        temperature: the initial (or fixed) temperature.
        learnable_temperature: learn ``log(1 / temperature)`` as a parameter (CLIP). Its value, not the forward
            pass, is bounded: :meth:`clamp_parameters_` clamps it so that the logit scale is at most
            ``max_logit_scale`` (as CLIP does after each optimizer step); the training engines call it through
            :class:`~monai_elvis.engines.ClampParametersHandler`. The forward pass uses the value as it is, so the
            gradient never vanishes at the bound.
        image_to_text_weight: weight of the image -> report direction.
        text_to_image_weight: weight of the report -> image direction.
        max_logit_scale: upper bound of ``1 / temperature`` when learnable (the initial value is clamped too).
        gather: under ``torch.distributed`` with more than one rank, contrast against the features of every rank
            (gathered with their gradient, :mod:`monai_elvis.losses.distributed`): each rank scores its own images
            against every report and its own reports against every image, and returns its share of the loss of
            the whole batch, so that the mean over the ranks (and, with DDP's gradient averaging, every gradient)
            equals the one-process loss on the concatenated batch. ``False``: each rank contrasts its own batch
            only. No effect in one process.

    A learnable temperature is a parameter of this loss, not of the network: under DDP its gradient is averaged
    over the ranks by :class:`~monai_elvis.engines.LossParametersSyncHandler`, which the bundles attach.

    Shapes: ``image [B, d]``, ``text [B, d]`` -> scalar. Computed in float32 (float64 stays float64), also under
    autocast.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        learnable_temperature: bool = False,
        image_to_text_weight: float = 0.5,
        text_to_image_weight: float = 0.5,
        max_logit_scale: float = 100.0,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self.initial_temperature = temperature  # a setting; ``temperature`` is the current (maybe learnt) value
        self.learnable_temperature = learnable_temperature
        self.image_to_text_weight = image_to_text_weight
        self.text_to_image_weight = text_to_image_weight
        self.max_logit_scale = max_logit_scale
        self.gather = gather
        if max_logit_scale <= 0:
            raise ValueError(f"max_logit_scale must be positive, got {max_logit_scale}.")
        self.learnable_temperature = learnable_temperature
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learnable_temperature:
            self.log_logit_scale = nn.Parameter(log_scale)
            self.clamp_parameters_()
        else:
            self.register_buffer("log_logit_scale", log_scale)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.logit_scale().detach())

    def logit_scale(self) -> torch.Tensor:
        """``1 / temperature`` (``exp`` of the parameter or buffer, not clamped here)."""
        return self.log_logit_scale.exp()

    @torch.no_grad()
    def clamp_parameters_(self) -> None:
        """Clamp a learnable ``log(1 / temperature)`` in place to at most ``log(max_logit_scale)``."""
        if self.learnable_temperature:
            self.log_logit_scale.clamp_(max=math.log(self.max_logit_scale))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        check_ndim(image, "image", 2, "[B, d]")
        check_ndim(text, "text", 2, "[B, d]")
        b = check_batch([("image", image), ("text", text)])
        if image.shape[1] != text.shape[1]:
            raise ValueError(f"image {tuple(image.shape)} and text {tuple(text.shape)} differ in embedding size.")
        dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=image.device.type, enabled=False):
            v = l2_normalize(image.to(dtype), dim=-1)
            t = l2_normalize(text.to(dtype), dim=-1)
            _, world = distributed_world()
            if not (self.gather and world > 1):
                logits = v @ t.T * self.logit_scale()
                target = torch.arange(b, device=image.device)
                loss = self.image_to_text_weight * F.cross_entropy(logits, target)
                return loss + self.text_to_image_weight * F.cross_entropy(logits.T, target)
            both, offset = gather_across_ranks(torch.cat([v, t], dim=1))  # one collective for both modalities
            v_all, t_all = both.split(v.shape[1], dim=1)
            scale = self.logit_scale()
            target = torch.arange(offset, offset + b, device=image.device)
            loss = self.image_to_text_weight * F.cross_entropy(v @ t_all.T * scale, target)
            loss = loss + self.text_to_image_weight * F.cross_entropy(t @ v_all.T * scale, target)
            return loss * (world * b / both.shape[0])  # this rank's share: the ranks' mean is the whole batch's
