"""Report text encoder on a transformers model, with sentence pooling."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, BertModel

from monai_elvis.utils import check_ndim

__all__ = ["ReportTextEncoder", "TINY_BERT_CONFIG", "pool_sentences", "pool_words"]

# A BERT small enough for tests and CPU runs; built from this config, nothing is downloaded.
TINY_BERT_CONFIG: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
}


def pool_sentences(
    tokens: torch.Tensor, attention_mask: torch.Tensor, sentence_index: torch.Tensor, num_sentences: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pool token features into sentence features.

    Args:
        tokens: ``[B, L, D]`` token features.
        attention_mask: ``[B, L]``, 1 for real tokens.
        sentence_index: ``[B, L]`` long, the sentence (0, 1, ...) each token belongs to; ``-1`` for tokens in no
            sentence (``[CLS]``, ``[SEP]``, padding).
        num_sentences: ``S``; by default ``max(sentence_index) + 1`` over the batch (at least 1).

    Returns:
        ``(sentences [B, S, D], sentence_mask [B, S] bool)``; a sentence with no token is all zeros and masked.
    """
    if num_sentences is None:
        num_sentences = max(int(sentence_index.max()) + 1, 1) if sentence_index.numel() else 1
    ids = torch.arange(num_sentences, device=sentence_index.device)
    member = (sentence_index.unsqueeze(-1) == ids) & attention_mask.bool().unsqueeze(-1)  # [B, L, S]
    counts = member.sum(dim=1)  # [B, S]
    weights = member.to(tokens.dtype) / counts.clamp(min=1).unsqueeze(1).to(tokens.dtype)
    sentences = torch.bmm(weights.transpose(1, 2), tokens)  # [B, S, D]
    return sentences, counts > 0


def pool_words(
    tokens: torch.Tensor, attention_mask: torch.Tensor, word_index: torch.Tensor, num_words: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the token features of each whole word, as GLoRIA aggregates sub-word tokens.

    Args:
        tokens: ``[B, L, D]`` token features.
        attention_mask: ``[B, L]``, 1 for real tokens.
        word_index: ``[B, L]`` long, the word (0 = [CLS], 1, 2, ...) each token belongs to; ``-1`` for tokens in no
            word (see :class:`~monai_elvis.transforms.TokenizeReport` with ``word_index=True``).
        num_words: ``W``; by default ``max(word_index) + 1`` over the batch (at least 1).

    Returns:
        ``(words [B, W, D], word_mask [B, W] bool)``; a word with no token is all zeros and masked.
    """
    if num_words is None:
        num_words = max(int(word_index.max()) + 1, 1) if word_index.numel() else 1
    valid = (word_index >= 0) & attention_mask.bool()
    b, _, d = tokens.shape
    index = torch.where(valid, word_index, torch.full_like(word_index, num_words))  # invalid -> a spare slot
    words = tokens.new_zeros(b, num_words + 1, d).scatter_add_(1, index.unsqueeze(-1).expand(-1, -1, d), tokens)
    counts = torch.zeros(b, num_words + 1, dtype=torch.long, device=tokens.device).scatter_add_(
        1, index, valid.long()
    )
    return words[:, :num_words], counts[:, :num_words] > 0


class ReportTextEncoder(nn.Module):
    """A transformers encoder returning token, sentence and global features of a report.

    Args:
        model_name_or_path: a local folder written by ``save_pretrained`` (or a hub name, where a hub is
            reachable) of any ``AutoModel`` encoder, e.g. a pretrained CXR-BERT. ``None`` builds a BERT from
            ``config`` with random weights.
        config: keyword arguments of :class:`transformers.BertConfig` used when ``model_name_or_path`` is None,
            merged over :data:`TINY_BERT_CONFIG`.
        trust_remote_code: passed to ``from_pretrained``; only set it for a model whose code you trust.
        global_pooling: ``"cls"`` (the first token) or ``"mean"`` (mean of the tokens that belong to a sentence).
        num_sentences: fixed ``S``; by default the largest ``sentence_index`` in the batch plus one.
        local_files_only: forbid network access when loading (the folder or the local cache must hold the model).

    Shapes:
        ``input_ids``, ``attention_mask``, ``sentence_index``: ``[B, L]``. Returns a dict with
        ``token`` ``[B, L, D]``, ``token_mask`` ``[B, L]`` (tokens in a sentence), ``sentence`` ``[B, S, D]``,
        ``sentence_mask`` ``[B, S]`` and ``global`` ``[B, D]``, where ``D`` = :attr:`hidden_size`. With the
        optional ``word_index`` ``[B, L]`` also ``word`` ``[B, W, D]`` (:func:`pool_words`) and ``word_mask``.
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | None = None,
        config: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        global_pooling: str = "cls",
        num_sentences: int | None = None,
        local_files_only: bool = False,
    ) -> None:
        super().__init__()
        if global_pooling not in ("cls", "mean"):
            raise ValueError(f"global_pooling must be 'cls' or 'mean', got {global_pooling!r}.")
        if model_name_or_path is None:
            self.model = BertModel(BertConfig(**{**TINY_BERT_CONFIG, **(config or {})}), add_pooling_layer=False)
        else:
            path = os.fspath(model_name_or_path)
            looks_local = os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path)
            if looks_local and not os.path.isdir(os.path.expanduser(path)):
                raise FileNotFoundError(f"text encoder folder not found: {path}")
            path = os.path.expanduser(path)  # otherwise a hub name such as "org/model"
            hf_config = AutoConfig.from_pretrained(
                path, trust_remote_code=trust_remote_code, local_files_only=local_files_only
            )
            # BERT's pooler is never used (see below); not building it keeps transformers from reporting its
            # weights as missing when a saved encoder (saved without it) is loaded again
            extra = {"add_pooling_layer": False} if getattr(hf_config, "model_type", "") == "bert" else {}
            self.model = AutoModel.from_pretrained(
                path, config=hf_config, trust_remote_code=trust_remote_code, local_files_only=local_files_only, **extra
            )
        if getattr(self.model, "pooler", None) is not None:
            # the pooler (BERT's tanh head on [CLS]) is never used here: dropping it keeps the state dict the same
            # whether the encoder was built from a config or loaded from a folder, and leaves no unused weights
            self.model.pooler = None
        self.global_pooling = global_pooling
        self.num_sentences = num_sentences
        self.hidden_size = int(self.model.config.hidden_size)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save the transformers model to a folder that ``ReportTextEncoder(path)`` loads again."""
        self.model.save_pretrained(os.fspath(path))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        sentence_index: torch.Tensor,
        word_index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask), ("sentence_index", sentence_index)):
            check_ndim(t, name, 2, "[B, L]")
        if attention_mask.shape != input_ids.shape or sentence_index.shape != input_ids.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and "
                f"sentence_index {tuple(sentence_index.shape)} must have the same shape [B, L]."
            )
        tokens = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, D]
        sentences, sentence_mask = pool_sentences(tokens, attention_mask, sentence_index, self.num_sentences)
        token_mask = attention_mask.bool() & (sentence_index >= 0)
        if self.global_pooling == "cls":
            global_ = tokens[:, 0]
        else:
            w = token_mask.to(tokens.dtype)
            global_ = (tokens * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
        out = {
            "token": tokens,
            "token_mask": token_mask,
            "sentence": sentences,
            "sentence_mask": sentence_mask,
            "global": global_,
        }
        if word_index is not None:
            if word_index.shape != input_ids.shape:
                raise ValueError(
                    f"word_index {tuple(word_index.shape)} must have the shape {tuple(input_ids.shape)} of input_ids."
                )
            out["word"], out["word_mask"] = pool_words(tokens, attention_mask, word_index)
        return out
