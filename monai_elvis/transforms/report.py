"""Report text: sections, sentences, sentence augmentation and tokenisation with sentence indices."""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform, Transform

from monai_elvis.keys import Keys

__all__ = [
    "ReportError",
    "RequirePhrased",
    "parse_report_sections",
    "parse_iu_xray_xml",
    "ExtractReportSections",
    "ExtractReportSectionsd",
    "SplitSentences",
    "SplitSentencesd",
    "RandShuffleSentences",
    "RandShuffleSentencesd",
    "RandDropSentences",
    "RandDropSentencesd",
    "TokenizeReport",
    "TokenizeReportd",
    "TextToMetad",
    "load_tokenizer",
    "train_wordpiece_tokenizer",
]


class ReportError(ValueError):
    """A report is empty or cannot be parsed; the message names it where its source is known."""


# ------------------------------------------------------------------------------------------ sections
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z &/()-]{2,40}?)[ \t]*:[ \t]*", re.MULTILINE)


def parse_report_sections(text: str) -> dict[str, str]:
    """Split a MIMIC-CXR style free-text report into ``{section name (lower case): text}``.

    A section starts at a line that begins with an upper-case header followed by a colon
    (``FINDINGS:``, ``IMPRESSION:``, ``FINDINGS AND IMPRESSION:``); text before the first header is under
    ``"preamble"``. White space inside a section is folded to single spaces.
    """
    sections: dict[str, str] = {}
    matches = list(_HEADER.finditer(text))
    starts = [m.start() for m in matches] + [len(text)]
    preamble = text[: starts[0]]
    if preamble.strip():
        sections["preamble"] = " ".join(preamble.split())
    for m, end in zip(matches, starts[1:]):
        name = " ".join(m.group(1).lower().split())
        body = " ".join(text[m.end() : end].split())
        sections[name] = (sections[name] + " " + body).strip() if name in sections else body
    return sections


def parse_iu_xray_xml(source: str | bytes | os.PathLike) -> dict[str, Any]:
    """Parse one Indiana University chest X-ray report (the ``ecgen-radiology`` XML).

    Returns ``{"id": "CXR1", "sections": {"comparison": ..., "indication": ..., "findings": ...,
    "impression": ...}, "images": ["CXR1_1_IM-0001-3001", ...]}``; a missing section is an empty string.
    ``source`` is a file path, or the XML as bytes.
    """
    name = str(source) if not isinstance(source, bytes) else "<bytes>"
    try:
        root = ET.fromstring(source) if isinstance(source, bytes) else ET.parse(source).getroot()
    except (ET.ParseError, OSError) as e:
        raise ReportError(f"cannot parse IU X-ray report {name}: {e}") from e
    sections = {
        (a.get("Label") or "").strip().lower(): " ".join((a.text or "").split()) for a in root.iter("AbstractText")
    }
    uid = root.find("uId")
    return {
        "id": uid.get("id") if uid is not None else Path(name).stem,
        "sections": sections,
        "images": [im.get("id") for im in root.iter("parentImage") if im.get("id")],
    }


class ExtractReportSections(Transform):
    """Keep the chosen sections of a report, joined in the given order.

    Args:
        sections: section names to keep, in output order (MIMIC-CXR: ``findings``, ``impression``).
        fallback: when none of ``sections`` is present: ``"last"`` uses the last section of the report,
            ``"all"`` the whole text, ``None`` raises :class:`ReportError`.
        aliases: other header names that count as a section, e.g. ``"findings and impression"``.

    Input: the report text (headers as in MIMIC-CXR) or a ``{section: text}`` mapping (e.g. from
    :func:`parse_iu_xray_xml`). Output: a string. An empty result raises :class:`ReportError`.
    """

    def __init__(
        self,
        sections: Sequence[str] = ("findings", "impression"),
        fallback: str | None = "last",
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        if fallback not in ("last", "all", None):
            raise ValueError(f"fallback must be 'last', 'all' or None, got {fallback!r}.")
        self.sections = [s.lower() for s in sections]
        self.fallback = fallback
        self.aliases = {"findings and impression": "findings", "finding": "findings", "impressions": "impression"}
        self.aliases.update({k.lower(): v.lower() for k, v in (aliases or {}).items()})

    def __call__(self, report: str | Mapping[str, str], source: str | None = None) -> str:
        where = f" ({source})" if source else ""
        if isinstance(report, Mapping):
            found = {str(k).lower(): str(v or "") for k, v in report.items()}
            full = " ".join(v for v in found.values() if v)
        elif isinstance(report, str):
            found = parse_report_sections(report)
            full = " ".join(report.split())
        else:
            raise ReportError(f"report{where} must be a string or a mapping of sections, got {type(report).__name__}.")
        for name in list(found):
            alias = self.aliases.get(name)
            if alias and not found.get(alias):
                found[alias] = found[name]
        kept = [found[s].strip() for s in self.sections if found.get(s, "").strip()]
        if not kept:
            if self.fallback == "all":
                kept = [full]
            elif self.fallback == "last":
                body = [v for k, v in found.items() if v.strip() and k != "preamble"] or [found.get("preamble", "")]
                kept = [body[-1].strip()]
            else:
                raise ReportError(f"report{where} has none of the sections {self.sections}.")
        text = " ".join(t for t in kept if t)
        if not text.strip():
            raise ReportError(f"report{where} is empty.")
        return text


# ------------------------------------------------------------------------------------------ sentences
_ABBREVIATIONS = {
    "dr", "mr", "mrs", "ms", "vs", "approx", "e.g", "i.e", "etc", "fig", "st", "cf", "incl", "pt", "pts",
    "lat", "hx", "y.o", "resp", "sr", "jr", "al",
}  # fmt: skip
_LIST_MARKER = re.compile(r"(?:(?<=\s)|^)\(?\d{1,2}[.)](?=\s+\S)")
_BOUNDARY = re.compile(r"([.!?;])\s+")
_DEID = re.compile(r"X{2,}|_{3,}")


class SplitSentences(Transform):
    """Split report text into sentences.

    Boundaries are ``.``, ``!``, ``?`` (and ``;`` when ``split_semicolons``) followed by white space, except
    after common abbreviations (``e.g.``, ``approx.``, ``Dr.``...) and inside decimals (``2.5 cm``), and
    numbered-list markers (``1.``, ``2)``), which are removed. De-identification placeholders (MIMIC-CXR's
    ``___``, IU X-ray's ``XXXX``) are kept as words, or replaced by ``deid_token`` when given.

    Input: a string. Output: a list of non-empty sentences (a report with no words gives ``[]``).
    """

    def __init__(self, split_semicolons: bool = False, deid_token: str | None = None, min_chars: int = 2) -> None:
        self.split_semicolons = split_semicolons
        self.deid_token = deid_token
        self.min_chars = min_chars

    def __call__(self, text: str) -> list[str]:
        if not isinstance(text, str):
            raise ReportError(f"SplitSentences expects a string, got {type(text).__name__}.")
        text = " ".join(text.split())
        if self.deid_token is not None:
            text = _DEID.sub(self.deid_token, text)
        text = _LIST_MARKER.sub("\n", text)  # list items always start a sentence
        sentences: list[str] = []
        for chunk in text.split("\n"):
            start = 0
            for m in _BOUNDARY.finditer(chunk):
                if m.group(1) == ";" and not self.split_semicolons:
                    continue
                if m.group(1) == ".":
                    words = chunk[start : m.start()].split()
                    last = words[-1].lower().rstrip(".") if words else ""
                    if last in _ABBREVIATIONS:
                        continue
                sentences.append(chunk[start : m.end(1)])
                start = m.end()
            sentences.append(chunk[start:])
        return [s.strip() for s in sentences if len(s.strip().strip(".;!? ")) >= self.min_chars]


class RandShuffleSentences(RandomizableTransform):
    """Shuffle the order of a report's sentences with probability ``prob`` (a list in, a new list out)."""

    def __init__(self, prob: float = 0.5) -> None:
        RandomizableTransform.__init__(self, prob)

    def __call__(self, sentences: Sequence[str], randomize: bool = True) -> list[str]:
        if randomize:
            self.randomize(None)
        out = list(sentences)
        if self._do_transform and len(out) > 1:
            out = [out[i] for i in self.R.permutation(len(out))]
        return out


class RandDropSentences(RandomizableTransform):
    """Drop each sentence with probability ``drop_prob`` (when the transform fires, with probability ``prob``),
    always keeping at least ``min_keep`` sentences."""

    def __init__(self, prob: float = 0.5, drop_prob: float = 0.2, min_keep: int = 1) -> None:
        RandomizableTransform.__init__(self, prob)
        self.drop_prob = drop_prob
        self.min_keep = min_keep

    def __call__(self, sentences: Sequence[str], randomize: bool = True) -> list[str]:
        if randomize:
            self.randomize(None)
        out = list(sentences)
        if not self._do_transform or len(out) <= self.min_keep:
            return out
        keep = self.R.random_sample(len(out)) >= self.drop_prob
        if keep.sum() < self.min_keep:
            keep[self.R.choice(len(out), self.min_keep, replace=False)] = True
        return [s for s, k in zip(out, keep) if k]


# ------------------------------------------------------------------------------------------ tokenisation
def load_tokenizer(tokenizer: Any):
    """A transformers tokenizer from a local folder or hub name (``AutoTokenizer``), or the object itself."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    return tokenizer


class TokenizeReport(Transform):
    """Tokenise a report's sentences into ``input_ids``, ``attention_mask`` and ``sentence_index``.

    The layout is ``[CLS] sentence 0 ... sentence k [SEP]``; ``sentence_index`` is ``k`` for the tokens of
    sentence ``k`` and ``-1`` for the special tokens. Truncation happens at sentence boundaries: whole
    sentences are kept while they fit in ``max_length``; only a first sentence longer than everything is cut.
    Padding is left to the collate function (:func:`monai_elvis.data.collate_reports`) unless
    ``pad_to_max_length``.

    With ``word_index``, a fourth tensor ``word_index`` numbers the whole words, as GLoRIA groups sub-word tokens:
    ``0`` for [CLS], ``1, 2, ...`` for the words in order (every token of a word, e.g. ``pneum ##othorax``, has the
    word's number; a word never spans two sentences) and ``-1`` for [SEP] and padding. Word boundaries come from
    the tokenizer's ``word_ids`` (fast tokenizers), else from WordPiece's ``##`` continuation prefix.

    Args:
        tokenizer: any transformers tokenizer, or a folder / hub name for ``AutoTokenizer``.
        max_length: total length including the special tokens.
        pad_to_max_length: pad every output to ``max_length`` (ids with the pad id, mask 0, indices -1).
        word_index: also return ``word_index`` (for GLoRIA's whole words, ``GloriaLocalLoss(word_units="whole_word")``).

    Input: a list of sentences (or one string, taken as a single sentence). Output: a dict of three (four with
    ``word_index``) ``torch.long`` tensors of shape ``[L]``.
    """

    def __init__(self, tokenizer: Any, max_length: int = 128, pad_to_max_length: bool = False,
                 word_index: bool = False) -> None:  # fmt: skip
        self.tokenizer = load_tokenizer(tokenizer)
        if max_length < 3:
            raise ValueError(f"max_length must be at least 3, got {max_length}.")
        self.max_length = max_length
        self.pad_to_max_length = pad_to_max_length
        self.word_index = word_index
        tok = self.tokenizer
        self.cls_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        self.sep_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        if self.cls_id is None or self.sep_id is None:
            raise ValueError("the tokenizer has neither CLS/SEP nor BOS/EOS tokens.")

    def __call__(self, sentences: str | Sequence[str], name: str = "report") -> dict[str, torch.Tensor]:
        """``name`` (``"report"``, ``"phrase"``) words the errors: a missing or empty text raises
        :class:`ReportError`."""
        if sentences is None:
            raise ReportError(f"no {name} to tokenise (got None).")
        if isinstance(sentences, str):
            sentences = [sentences]
        sentences = [s for s in sentences if s and s.strip()]
        if not sentences:
            raise ReportError(f"cannot tokenise an empty {name}: it has no sentence.")
        encoded = self.tokenizer(list(sentences), add_special_tokens=False)
        pieces = encoded["input_ids"]
        budget = self.max_length - 2
        ids, index, words = [self.cls_id], [-1], [0]
        for k, piece in enumerate(pieces):
            if not piece:
                continue
            if len(ids) - 1 + len(piece) > budget:
                if len(ids) == 1:  # the first sentence alone is too long: cut it
                    piece = piece[:budget]
                else:
                    break
            if self.word_index:
                starts = self._word_starts(encoded, k, piece)
                for start in starts:
                    words.append(words[-1] + 1 if start else words[-1])
            ids += piece
            index += [k] * len(piece)
        ids.append(self.sep_id)
        index.append(-1)
        words.append(-1)
        # renumber so that the sentence indices are 0..S-1 without gaps (empty pieces are skipped)
        kept = sorted({i for i in index if i >= 0})
        remap = {old: new for new, old in enumerate(kept)}
        index = [remap.get(i, -1) for i in index]
        mask = [1] * len(ids)
        if self.pad_to_max_length:
            pad = self.max_length - len(ids)
            ids, mask, index, words = ids + [self.pad_id] * pad, mask + [0] * pad, index + [-1] * pad, words + [-1] * pad
        out = {
            Keys.INPUT_IDS: torch.tensor(ids, dtype=torch.long),
            Keys.ATTENTION_MASK: torch.tensor(mask, dtype=torch.long),
            Keys.SENTENCE_INDEX: torch.tensor(index, dtype=torch.long),
        }
        if self.word_index:
            out[Keys.WORD_INDEX] = torch.tensor(words, dtype=torch.long)
        return out

    def _word_starts(self, encoded: Any, k: int, piece: list[int]) -> list[bool]:
        """Whether each token of sentence ``k`` (``piece``, possibly cut) starts a new word."""
        word_ids = None
        if getattr(encoded, "is_fast", False):
            word_ids = encoded.word_ids(k)[: len(piece)]
        if word_ids is not None and None not in word_ids:
            return [t == 0 or word_ids[t] != word_ids[t - 1] for t in range(len(piece))]
        tokens = self.tokenizer.convert_ids_to_tokens(piece)
        return [t == 0 or not str(tok).startswith("##") for t, tok in enumerate(tokens)]


def train_wordpiece_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 4096,
    min_frequency: int = 2,
    lowercase: bool = True,
    model_max_length: int = 512,
):
    """Train a BERT WordPiece tokenizer (``tokenizers``) and save it where ``AutoTokenizer`` loads it.

    The vocabulary keeps the word pieces that the words of ``texts`` are split into and the single characters, in a
    fixed order (``[PAD] [UNK] [CLS] [SEP] [MASK]``, then the pieces sorted). The trainer breaks ties between
    equally frequent merges at random (huggingface/tokenizers#1794) and so keeps other intermediate pieces, in
    another order, from run to run; what is kept here is the same in every run whenever the runs split the words
    of ``texts`` alike, as they do when ``vocab_size`` leaves room for every word (the phantom's reports). A corpus
    larger than ``vocab_size`` can still be split otherwise from run to run at the ties of the last merges.

    Returns the :class:`transformers.PreTrainedTokenizerFast`; ``out_dir`` holds ``tokenizer.json`` and the
    tokenizer config.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials)
    texts = list(texts)
    tok.train_from_iterator(texts, trainer=trainer)
    # The trainer breaks ties between equally frequent merges at random (huggingface/tokenizers#1794): runs on the
    # same texts keep different intermediate pieces, in a different order, even where they split every word of
    # the texts alike. Keep the pieces the texts' words use and the single characters, in a fixed order.
    words = {w for t in texts for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(t))}
    used = {piece.value for w in words for piece in tok.model.tokenize(w)}
    alphabet = {t for t in tok.get_vocab() if len(t) == 1 or (t.startswith("##") and len(t) == 3)}
    order = specials + sorted((used | alphabet) - set(specials))
    tok.model = models.WordPiece(vocab={t: i for i, t in enumerate(order)}, unk_token="[UNK]")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )
    fast.save_pretrained(os.fspath(out_dir))
    return fast


# ------------------------------------------------------------------------------------------ dict forms
class _ReportMapTransform(MapTransform):
    """Applies ``self.transform`` to each key; subclasses set it."""

    transform: Any

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class ExtractReportSectionsd(_ReportMapTransform):
    """Dictionary form of :class:`ExtractReportSections`; errors name ``d[source_key]`` when present."""

    def __init__(self, keys: KeysCollection = Keys.REPORT, source_key: str | None = "report_file",
                 allow_missing_keys: bool = False, **kwargs: Any) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = ExtractReportSections(**kwargs)
        self.source_key = source_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        source = d.get(self.source_key) if self.source_key else None
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], source=None if source is None else str(source))
        return d


class SplitSentencesd(_ReportMapTransform):
    """Dictionary form of :class:`SplitSentences`."""

    def __init__(self, keys: KeysCollection = Keys.REPORT, allow_missing_keys: bool = False, **kwargs: Any) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = SplitSentences(**kwargs)


class _RandReportMapTransform(_ReportMapTransform, RandomizableTransform):
    def __init__(self, keys: KeysCollection, transform: RandomizableTransform, allow_missing_keys: bool) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, 1.0)
        self.transform = transform

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed, state)
        return self


class RandShuffleSentencesd(_RandReportMapTransform):
    """Dictionary form of :class:`RandShuffleSentences`."""

    def __init__(self, keys: KeysCollection = Keys.REPORT, prob: float = 0.5, allow_missing_keys: bool = False):
        super().__init__(keys, RandShuffleSentences(prob), allow_missing_keys)


class RandDropSentencesd(_RandReportMapTransform):
    """Dictionary form of :class:`RandDropSentences`."""

    def __init__(self, keys: KeysCollection = Keys.REPORT, prob: float = 0.5, drop_prob: float = 0.2,
                 min_keep: int = 1, allow_missing_keys: bool = False):
        super().__init__(keys, RandDropSentences(prob, drop_prob, min_keep), allow_missing_keys)


class TokenizeReportd(MapTransform):
    """Dictionary form of :class:`TokenizeReport`: reads the sentences under ``keys`` (default ``report``) and
    adds ``input_ids``, ``attention_mask`` and ``sentence_index`` (and ``word_index`` with ``word_index=True``;
    the report itself is kept)."""

    def __init__(self, keys: KeysCollection = Keys.REPORT, tokenizer: Any = None, max_length: int = 128,
                 pad_to_max_length: bool = False, allow_missing_keys: bool = False, word_index: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if tokenizer is None:
            raise ValueError("TokenizeReportd needs a tokenizer (an object, a folder or a hub name).")
        self.transform = TokenizeReport(tokenizer, max_length, pad_to_max_length, word_index)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d.update(self.transform(d[key], name=str(key)))
        return d


class RequirePhrased(MapTransform):
    """Check that each key holds a phrase (non-empty text), and strip it; otherwise raise
    :class:`~monai_elvis.errors.RequestInputError` naming the key, the image and what to give.

    Put it first in a grounding preprocessing: a request without a phrase (MONAI Label's default for the bundle's
    ``displayable_configs`` is an empty phrase) is then refused with a message, which a MONAI Label server returns as
    ``400 Bad Request``, before anything is loaded.

    Args:
        keys: the phrase entries.
        image_key: named in the message when present.
        example: an example phrase for the message.
    """

    def __init__(self, keys: KeysCollection = Keys.PHRASE, image_key: str = Keys.IMAGE,
                 example: str = "left pleural effusion") -> None:  # fmt: skip
        super().__init__(keys, allow_missing_keys=True)
        self.image_key = image_key
        self.example = example

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai_elvis.errors import RequestInputError

        d = dict(data)
        image = d.get(self.image_key)
        image = getattr(image, "meta", {}).get("filename_or_obj", image) if image is not None else None
        on = f" for image {image}" if isinstance(image, (str, os.PathLike)) else ""
        for key in self.keys:
            value = d.get(key)
            if not isinstance(value, str) or not value.strip():
                got = "none" if value is None else f"{value!r}" if isinstance(value, str) else f"{type(value).__name__} {value!r}"
                raise RequestInputError(
                    f"grounding needs a {key!r} parameter: the text to find on the image, e.g. "
                    f'{{"{key}": "{self.example}"}} (got {got}{on}).'
                )
            d[key] = value.strip()
        return d


class TextToMetad(MapTransform):
    """Copy the token tensors (``input_ids``, ``attention_mask``, ``sentence_index``) into ``d[image_key].meta``.

    For callers that pass only the image to the inferer, such as MONAI Label's bundle infer task: the phrase of
    the request is tokenised by :class:`TokenizeReportd` and travels with the image to
    :class:`~monai_elvis.inferers.PhraseGroundingInferer`. ``[L]`` tensors; the entries stay in ``d`` too.
    """

    def __init__(self, keys: KeysCollection = (Keys.INPUT_IDS, Keys.ATTENTION_MASK, Keys.SENTENCE_INDEX),
                 image_key: str = Keys.IMAGE, allow_missing_keys: bool = False) -> None:  # fmt: skip
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.data import MetaTensor

        d = dict(data)
        image = d[self.image_key]
        if not isinstance(image, MetaTensor):
            raise TypeError(f"{self.image_key!r} must be a MetaTensor to carry the tokens, got {type(image).__name__}.")
        for key in self.key_iterator(d):
            image.meta[key] = torch.as_tensor(d[key])
        return d
