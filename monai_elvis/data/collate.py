"""Collate for batches with variable-length text."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data.utils import list_data_collate

from monai_elvis.keys import Keys

__all__ = ["collate_reports", "TEXT_PAD_VALUES"]

# key -> padding value
TEXT_PAD_VALUES: dict[str, int] = {Keys.INPUT_IDS: 0, Keys.ATTENTION_MASK: 0, Keys.SENTENCE_INDEX: -1, Keys.WORD_INDEX: -1}


def collate_reports(batch: Sequence[Mapping[str, Any]], pad_values: Mapping[str, int] | None = None) -> dict:
    """Collate dict samples, right-padding the token tensors to the longest in the batch.

    ``input_ids`` are padded with 0 (override with ``pad_values``, e.g. the tokenizer's pad id),
    ``attention_mask`` with 0, ``sentence_index`` and ``word_index`` (when present) with -1; the ``report`` (text
    or list of sentences) and any other list-valued entry are kept as lists of the samples' values; every other key
    goes through MONAI's
    :func:`~monai.data.utils.list_data_collate`.
    Samples that are ``None`` (skipped as bad by :class:`~monai_elvis.data.SkippingCacheDataset`) are dropped.
    Usable as ``collate_fn`` of MONAI's and PyTorch's data loaders.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch.")
    pads = {**TEXT_PAD_VALUES, **(pad_values or {})}
    # a list sample holds several crops of one item; None is a sample skipped as bad (SkippingCacheDataset)
    batch = [item for sample in batch for item in (sample if isinstance(sample, list) else [sample]) if item is not None]
    if not batch:
        raise ValueError("every sample of this batch was skipped as bad.")
    text_keys = [k for k in pads if k in batch[0]]
    # text and other variable-length lists (sentences, finding names) stay lists of per-sample values
    list_keys = [k for k, v in batch[0].items() if k == Keys.REPORT or (k not in text_keys and isinstance(v, (list, tuple)))]
    rest = [{k: v for k, v in s.items() if k not in text_keys and k not in list_keys} for s in batch]
    out = dict(list_data_collate(rest)) if rest[0] else {}
    for key in list_keys:
        out[key] = [s[key] for s in batch]
    for key in text_keys:
        seqs = [torch.as_tensor(s[key]) for s in batch]
        bad = [i for i, t in enumerate(seqs) if t.ndim != 1]
        if bad:
            raise ValueError(f"{key} of batch item(s) {bad} must be 1D [L], got shapes {[tuple(seqs[i].shape) for i in bad]}.")
        out[key] = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pads[key])
    return out
