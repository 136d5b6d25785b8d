"""The dictionary-key vocabulary of monai-elvis, defined once and used end to end.

Data dictionaries (datalists, transforms, batches) use :class:`Keys`; the dictionary returned by
:class:`monai_elvis.networks.ElvisNet` and read by :class:`monai_elvis.losses.ElvisLoss` uses :class:`OutKeys`.
"""

from __future__ import annotations

__all__ = ["Keys", "OutKeys"]


class Keys:
    """Keys of data dictionaries: datalist entries, transform inputs/outputs and collated batches."""

    IMAGE = "image"
    REPORT = "report"
    INPUT_IDS = "input_ids"
    ATTENTION_MASK = "attention_mask"
    SENTENCE_INDEX = "sentence_index"
    WORD_INDEX = "word_index"  # optional: whole-word number of each token, [CLS] = 0, -1 for [SEP] and padding
    LABEL = "label"
    BOXES = "boxes"
    PHRASE = "phrase"
    FINDINGS = "findings"  # names of the finding kinds of a study (phantom datalists)
    CLASS_LABEL = "class_label"  # [K] multi-hot classes of a study (zero-shot and class-aware evaluation)


class OutKeys:
    """Keys of the output dictionary of :class:`~monai_elvis.networks.ElvisNet`.

    Shapes: ``B`` batch, ``N = h * w`` image regions, ``C`` image channels, ``L`` tokens, ``S`` sentences,
    ``D`` text hidden size, ``d`` embedding size.
    """

    # image side
    IMAGE_LOCAL_PRE = "image_local_pre"  # [B, N, C] region features h_i before projection
    IMAGE_GLOBAL_PRE = "image_global_pre"  # [B, C]
    IMAGE_LOCAL = "image_local"  # [B, N, d] projected regions v_i
    IMAGE_GLOBAL = "image_global"  # [B, d] projected global v
    IMAGE_GRID = "image_grid"  # (h, w) of the region grid
    IMAGE_STRIDE = "image_stride"  # input pixels between region centres, region 0 centred on pixel 0 (or None)
    # text side
    TEXT_TOKEN_PRE = "text_token_pre"  # [B, L, D]
    TEXT_SENTENCE_PRE = "text_sentence_pre"  # [B, S, D] sentence features g_k before projection
    TEXT_GLOBAL_PRE = "text_global_pre"  # [B, D]
    TEXT_WORD_PRE = "text_word_pre"  # [B, W, D] whole words ([CLS] first): sums of their tokens (with word_index)
    TEXT_TOKEN = "text_token"  # [B, L, d] projected tokens (the "words" of GLoRIA)
    TEXT_SENTENCE = "text_sentence"  # [B, S, d] projected sentences t_k
    TEXT_GLOBAL = "text_global"  # [B, d] projected global t
    TEXT_WORD = "text_word"  # [B, W, d] projected whole words (GLoRIA's words; only with word_index)
    TOKEN_MASK = "token_mask"  # [B, L] bool, True for tokens that belong to a sentence
    SENTENCE_MASK = "sentence_mask"  # [B, S] bool, True for real (non-padding) sentences
    WORD_MASK = "word_mask"  # [B, W] bool, True for real whole words (only with word_index)
    # attention-pooling weights (networks that pool their global features by attention; optional)
    IMAGE_LOCAL_WEIGHTS = "image_local_weights"  # [B, N] weights of the regions in the image's global feature
    TEXT_SENTENCE_WEIGHTS = "text_sentence_weights"  # [B, S] weights of the sentences in the report's global feature
    # cross-modal attention
    IMAGE_LOCAL_ATTENDED = "image_local_attended"  # [B, N, d] text-attended regions v'_i
    TEXT_SENTENCE_ATTENDED = "text_sentence_attended"  # [B, S, d] image-attended sentences t'_k
