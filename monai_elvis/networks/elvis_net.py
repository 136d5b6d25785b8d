"""ElvisNet: the dual encoder of ELVIS with projection heads and cross-modal attention."""

from __future__ import annotations

import torch
from torch import nn

from monai_elvis.keys import OutKeys
from monai_elvis.networks.heads import AttentionPooling, CrossModalAttention, ProjectionHead
from monai_elvis.networks.image_encoder import CXRImageEncoder
from monai_elvis.networks.text_encoder import ReportTextEncoder

__all__ = ["ElvisNet"]


class ElvisNet(nn.Module):
    """Image and report encoders, projection heads and cross-modal attention in one forward.

    Args:
        image_encoder: returns ``(local [B, N, C], global [B, C])``; a :class:`CXRImageEncoder` by default
            (tiny resnet18, 1 channel). Its ``out_channels`` gives ``C``.
        text_encoder: a :class:`ReportTextEncoder` (tiny BERT by default). Its ``hidden_size`` gives ``D``.
        embed_dim: the shared embedding size ``d``.
        projection_layers: linear layers in each projection head.
        attention_temperature: of :class:`CrossModalAttention` (``None``: ``sqrt(d)``).
        shared_projection: one projection head per modality for local and global features (as BioViL's single
            projector), instead of separate local and global heads. The global contrastive loss then shapes the
            space the regions and sentences are projected into, so that a region's similarity to a phrase is
            what the global alignment learnt about its content (with mean-pooled global features and a
            linear head, exactly the region's share of the image-report similarity, as in class activation
            maps). Both heads' names stay in the state dict, holding the same tensors.
        global_pooling: ``"encoder"`` (the encoders' own global features: the image encoder's pooling, the text
            encoder's [CLS]) or ``"attention"`` (LoVT's: :class:`AttentionPooling` over the image's regions and over
            the report's sentences, before projection; the pooling weights are returned as
            ``image_local_weights`` and ``text_sentence_weights``, for ``LocalAlignmentLoss(unit_weights=
            "attention_pooling")``).
        pooling_heads: heads of the attention pooling.

    ``forward(image [B, c, H, W], input_ids [B, L], attention_mask [B, L], sentence_index [B, L])`` returns a dict
    keyed by :class:`~monai_elvis.keys.OutKeys`: pre- and post-projection global and local features of both
    modalities, the token and sentence masks, the region grid size, the image encoder's ``output_stride`` (where
    it has one: the pixels between region centres, which :func:`~monai_elvis.inferers.region_similarity_map` uses
    to place the regions on the image) and the cross-attended features
    ``v'_i`` (regions attending to sentences) and ``t'_k`` (sentences attending to regions). With the optional
    ``word_index [B, L]`` it also returns whole words (GLoRIA's): ``text_word_pre`` (token features summed per
    word, :func:`~monai_elvis.networks.text_encoder.pool_words`), ``text_word`` (projected by the local text
    head) and ``word_mask``.
    """

    def __init__(
        self,
        image_encoder: nn.Module | None = None,
        text_encoder: ReportTextEncoder | None = None,
        embed_dim: int = 128,
        projection_layers: int = 2,
        attention_temperature: float | None = None,
        shared_projection: bool = False,
        global_pooling: str = "encoder",
        pooling_heads: int = 8,
    ) -> None:
        super().__init__()
        if global_pooling not in ("encoder", "attention"):
            raise ValueError(f"global_pooling must be 'encoder' or 'attention', got {global_pooling!r}.")
        self.global_pooling = global_pooling
        self.image_encoder = image_encoder if image_encoder is not None else CXRImageEncoder("resnet18", 1, 0.125)
        self.text_encoder = text_encoder if text_encoder is not None else ReportTextEncoder()
        c = int(getattr(self.image_encoder, "out_channels"))
        dt = int(self.text_encoder.hidden_size)
        self.embed_dim = embed_dim
        self.shared_projection = shared_projection
        self.image_local_head = ProjectionHead(c, embed_dim, num_layers=projection_layers)
        self.text_local_head = ProjectionHead(dt, embed_dim, num_layers=projection_layers)
        if shared_projection:
            self.image_global_head, self.text_global_head = self.image_local_head, self.text_local_head
        else:
            self.image_global_head = ProjectionHead(c, embed_dim, num_layers=projection_layers)
            self.text_global_head = ProjectionHead(dt, embed_dim, num_layers=projection_layers)
        self.attention = CrossModalAttention(attention_temperature)
        if global_pooling == "attention":
            self.image_pooling = AttentionPooling(c, pooling_heads)
            self.text_pooling = AttentionPooling(dt, pooling_heads)

    def encode_image(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Image half of :meth:`forward`: region and global features, before and after projection."""
        if hasattr(self.image_encoder, "forward_with_grid"):
            local, global_, grid = self.image_encoder.forward_with_grid(image)
        else:
            local, global_ = self.image_encoder(image)
            grid = None
        weights = None
        if self.global_pooling == "attention":
            global_, weights = self.image_pooling(local)
        out = {
            OutKeys.IMAGE_LOCAL_PRE: local,
            OutKeys.IMAGE_GLOBAL_PRE: global_,
            OutKeys.IMAGE_LOCAL: self.image_local_head(local),
            OutKeys.IMAGE_GLOBAL: self.image_global_head(global_),
            OutKeys.IMAGE_GRID: grid,
            OutKeys.IMAGE_STRIDE: getattr(self.image_encoder, "output_stride", None),
        }
        if weights is not None:
            out[OutKeys.IMAGE_LOCAL_WEIGHTS] = weights
        return out

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        sentence_index: torch.Tensor,
        word_index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Text half of :meth:`forward`: token, sentence, global (and whole-word) features, before and after
        projection."""
        if word_index is None:
            t = self.text_encoder(input_ids, attention_mask, sentence_index)
        else:
            t = self.text_encoder(input_ids, attention_mask, sentence_index, word_index=word_index)
        if self.global_pooling == "attention":
            t["global"], weights = self.text_pooling(t["sentence"], t["sentence_mask"])
        out = {
            OutKeys.TEXT_TOKEN_PRE: t["token"],
            OutKeys.TEXT_SENTENCE_PRE: t["sentence"],
            OutKeys.TEXT_GLOBAL_PRE: t["global"],
            OutKeys.TEXT_TOKEN: self.text_local_head(t["token"]),
            OutKeys.TEXT_SENTENCE: self.text_local_head(t["sentence"]),
            OutKeys.TEXT_GLOBAL: self.text_global_head(t["global"]),
            OutKeys.TOKEN_MASK: t["token_mask"],
            OutKeys.SENTENCE_MASK: t["sentence_mask"],
        }
        if self.global_pooling == "attention":
            out[OutKeys.TEXT_SENTENCE_WEIGHTS] = weights
        if "word" in t:
            out[OutKeys.TEXT_WORD_PRE] = t["word"]
            out[OutKeys.TEXT_WORD] = self.text_local_head(t["word"])
            out[OutKeys.WORD_MASK] = t["word_mask"]
        return out

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        sentence_index: torch.Tensor,
        word_index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if image.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"image {tuple(image.shape)} and input_ids {tuple(input_ids.shape)} have different batch sizes."
            )
        out = self.encode_image(image)
        out.update(self.encode_text(input_ids, attention_mask, sentence_index, word_index))
        out[OutKeys.IMAGE_LOCAL_ATTENDED], _ = self.attention(
            out[OutKeys.IMAGE_LOCAL], out[OutKeys.TEXT_SENTENCE], out[OutKeys.SENTENCE_MASK]
        )
        out[OutKeys.TEXT_SENTENCE_ATTENDED], _ = self.attention(out[OutKeys.TEXT_SENTENCE], out[OutKeys.IMAGE_LOCAL])
        return out
