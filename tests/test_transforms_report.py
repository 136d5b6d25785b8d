"""Report transforms on the real IU X-ray reports and on MIMIC-CXR style text."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from monai_elvis.data.builders import iter_iu_xray_xml
from monai_elvis.keys import Keys
from monai_elvis.transforms import (
    ExtractReportSections,
    ExtractReportSectionsd,
    RandDropSentences,
    RandDropSentencesd,
    RandShuffleSentences,
    RandShuffleSentencesd,
    ReportError,
    SplitSentences,
    SplitSentencesd,
    TokenizeReport,
    TokenizeReportd,
    parse_iu_xray_xml,
    parse_report_sections,
)

MIMIC = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough  // ? pneumonia

 COMPARISON:  ___

 FINDINGS:

 PA and lateral views of the chest provided.   There is no focal consolidation,
 effusion, or pneumothorax.  The heart size is normal.

 IMPRESSION:

 No acute intrathoracic process.
"""


def test_all_iu_xray_reports_parse(iu_reports_tgz):
    reports = [parse_iu_xray_xml(xml) for _, xml in iter_iu_xray_xml(iu_reports_tgz)]
    assert len(reports) == 3955
    assert sum(bool(r["sections"].get("findings")) for r in reports) == 3425
    first = next(r for r in reports if r["id"] == "CXR1")
    assert first["images"] == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]
    assert first["sections"]["impression"] == "Normal chest x-XXXX."


def test_sentence_splitting_of_chosen_iu_reports(iu_reports_tgz):
    by_id = {}
    for _, xml in iter_iu_xray_xml(iu_reports_tgz):
        r = parse_iu_xray_xml(xml)
        if r["id"] in ("CXR1", "CXR101", "CXR1339"):
            by_id[r["id"]] = r["sections"]
    split = SplitSentences()
    assert split(by_id["CXR1"]["findings"]) == [
        "The cardiac silhouette and mediastinum size are within normal limits.",
        "There is no pulmonary edema.",
        "There is no focal consolidation.",
        "There are no XXXX of a pleural effusion.",
        "There is no evidence of pneumothorax.",
    ]
    assert split(by_id["CXR101"]["impression"]) == [  # a numbered list
        "Mild stable cardiomegaly and central vascular congestion.",
        "Low lung volumes with elevated left hemidiaphragm and basilar subsegmental atelectasis.",
        "Extensive bilateral shoulder degenerative changes with subluxation/dislocation left shoulder, possibly chronic.",
        "Suggest clinical correlation.",
    ]
    assert split(by_id["CXR1339"]["findings"])[0] == (  # a decimal is not a boundary
        "Small 3.3 mm right-sided pneumothorax only visible on the left lateral decubitus film."
    )


def test_split_sentences_rules():
    split = SplitSentences()
    assert split("Dr. Smith was called e.g. by phone. Opacity measures 2.5 cm. ___ was notified.") == [
        "Dr. Smith was called e.g. by phone.", "Opacity measures 2.5 cm.", "___ was notified.",
    ]  # fmt: skip
    assert split("1) Clear lungs 2) No effusion") == ["Clear lungs", "No effusion"]
    assert SplitSentences(deid_token="[DEID]")("Normal chest x-XXXX. Seen by ___.") == [
        "Normal chest x-[DEID].", "Seen by [DEID].",
    ]  # fmt: skip
    assert SplitSentences(split_semicolons=True)("Lungs clear; no effusion.") == ["Lungs clear;", "no effusion."]
    assert split("   ") == []
    assert SplitSentencesd()({"report": "A b. C d."})["report"] == ["A b.", "C d."]


def test_mimic_sections_and_fallbacks():
    sections = parse_report_sections(MIMIC)
    assert sections["findings"] == (
        "PA and lateral views of the chest provided. There is no focal consolidation, effusion, or pneumothorax. "
        "The heart size is normal."
    )
    assert sections["impression"] == "No acute intrathoracic process."
    assert sections["comparison"] == "___"
    assert ExtractReportSections(["impression"])(MIMIC) == "No acute intrathoracic process."
    both = ExtractReportSections()(MIMIC)
    assert both.startswith("PA and lateral") and both.endswith("No acute intrathoracic process.")
    no_sections = " EXAMINATION: CHEST\n INDICATION: cough\n NOTE: Lungs are clear.\n"
    assert ExtractReportSections(fallback="last")(no_sections) == "Lungs are clear."
    assert ExtractReportSections(fallback="all")("Lungs are clear.") == "Lungs are clear."
    with pytest.raises(ReportError, match=r"report \(s123.txt\) has none of the sections"):
        ExtractReportSections(fallback=None)(no_sections, source="s123.txt")
    with pytest.raises(ReportError, match=r"report \(s9.txt\) is empty"):
        ExtractReportSectionsd(fallback="all")({"report": "   ", "report_file": "s9.txt"})
    # IU X-ray sections as a mapping; "FINDINGS AND IMPRESSION" counts as findings
    assert ExtractReportSections()({"findings": "", "impression": "Normal."}) == "Normal."
    assert ExtractReportSections(["findings"])(" FINDINGS AND IMPRESSION: Clear.") == "Clear."


def test_random_sentence_transforms_are_seeded_and_keep_content():
    sentences = [f"s{i}." for i in range(8)]
    shuffled = RandShuffleSentences(prob=1.0).set_random_state(0)(sentences)
    assert sorted(shuffled) == sorted(sentences) and shuffled != sentences
    assert RandShuffleSentences(prob=1.0).set_random_state(0)(sentences) == shuffled
    assert RandShuffleSentences(prob=0.0)(sentences) == sentences
    dropped = RandDropSentences(prob=1.0, drop_prob=0.5).set_random_state(1)(sentences)
    assert 1 <= len(dropped) < 8 and all(s in sentences for s in dropped)
    assert [sentences.index(s) for s in dropped] == sorted(sentences.index(s) for s in dropped)
    assert RandDropSentences(prob=1.0, drop_prob=1.0, min_keep=2)(sentences).__len__() == 2
    d = RandShuffleSentencesd(prob=1.0).set_random_state(0)({"report": sentences})
    assert d["report"] == shuffled
    assert len(RandDropSentencesd(prob=1.0, drop_prob=1.0).set_random_state(0)({"report": sentences})["report"]) == 1


def test_tokenize_report_sentence_index_and_truncation(iu_tokenizer):
    tok = AutoTokenizer.from_pretrained(str(iu_tokenizer))
    sentences = ["The heart size is normal.", "There is no pneumothorax.", "Lungs are clear."]
    out = TokenizeReport(iu_tokenizer, max_length=64)(sentences)
    ids, mask, idx = out[Keys.INPUT_IDS], out[Keys.ATTENTION_MASK], out[Keys.SENTENCE_INDEX]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert idx[0] == -1 and idx[-1] == -1 and mask.tolist() == [1] * len(ids)
    for k, s in enumerate(sentences):
        assert tok.decode(ids[idx == k]) == s.lower()
    lengths = [len(tok(s, add_special_tokens=False)["input_ids"]) for s in sentences]
    # room for the first two sentences only: the third is dropped whole
    short = TokenizeReport(tok, max_length=2 + lengths[0] + lengths[1] + 1)(sentences)
    assert short[Keys.SENTENCE_INDEX].max() == 1 and len(short[Keys.INPUT_IDS]) == 2 + lengths[0] + lengths[1]
    # a first sentence longer than everything is cut
    cut = TokenizeReport(tok, max_length=5)(sentences)
    assert cut[Keys.SENTENCE_INDEX].tolist() == [-1, 0, 0, 0, -1]
    padded = TokenizeReport(tok, max_length=40, pad_to_max_length=True)(sentences)
    assert len(padded[Keys.INPUT_IDS]) == 40 and padded[Keys.ATTENTION_MASK].sum() == len(ids)
    assert (padded[Keys.SENTENCE_INDEX][len(ids):] == -1).all()
    d = TokenizeReportd(tokenizer=tok)({"report": sentences})
    assert torch.equal(d[Keys.INPUT_IDS], ids) and d["report"] == sentences
    with pytest.raises(ReportError, match="no sentence"):
        TokenizeReport(tok)([])
    # the errors name the key the text came from: a grounding phrase is not a "report"
    with pytest.raises(ReportError, match=r"^cannot tokenise an empty phrase: it has no sentence\.$"):
        TokenizeReportd("phrase", tokenizer=tok)({"phrase": "  "})
    with pytest.raises(ReportError, match=r"^no phrase to tokenise \(got None\)\.$"):
        TokenizeReportd("phrase", tokenizer=tok)({"phrase": None})
    with pytest.raises(ValueError, match="needs a tokenizer"):
        TokenizeReportd()


def _vocab_tokenizers(tmp_path):
    from transformers import BertTokenizer, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "pneum", "##othorax", ".", "the", "heart", "is",
             "normal", "card", "##io", "##megaly"]  # fmt: skip
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(str(path)), BertTokenizer(str(path))


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "slow"])
def test_tokenize_report_word_index_groups_sub_words_with_cls_as_word_0(tmp_path, fast):
    tok = _vocab_tokenizers(tmp_path)[0 if fast else 1]
    sentences = ["No pneumothorax.", "The heart is normal.", "Cardiomegaly."]
    out = TokenizeReport(tok, max_length=32, word_index=True)(sentences)
    tokens = tok.convert_ids_to_tokens(out[Keys.INPUT_IDS].tolist())
    assert tokens == ["[CLS]", "no", "pneum", "##othorax", ".", "the", "heart", "is", "normal", ".", "card", "##io",
                      "##megaly", ".", "[SEP]"]  # fmt: skip
    assert out[Keys.WORD_INDEX].tolist() == [0, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 10, -1]
    assert out[Keys.SENTENCE_INDEX].tolist() == [-1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, -1]
    padded = TokenizeReport(tok, max_length=20, pad_to_max_length=True, word_index=True)(sentences)
    assert padded[Keys.WORD_INDEX].tolist() == out[Keys.WORD_INDEX].tolist() + [-1] * 5
    cut = TokenizeReport(tok, max_length=4, word_index=True)(sentences)  # the first sentence cut inside a word
    assert cut[Keys.WORD_INDEX].tolist() == [0, 1, 2, -1]
    assert Keys.WORD_INDEX not in TokenizeReport(tok)(sentences)  # optional: off by default
    assert Keys.WORD_INDEX in TokenizeReportd(tokenizer=tok, word_index=True)({"report": sentences})


TRAIN_TWICE = """
import json, sys
from monai_elvis.data.phantom.reports import NEGATIONS
from monai_elvis.transforms import train_wordpiece_tokenizer
texts = [s for v in NEGATIONS.values() for s in v] * 3 + [
    "There is a moderate left pleural effusion.", "Right upper lobe nodule measuring 2 cm.",
    "Subsegmental atelectasis in the right lower lobe.", "The cardiac silhouette is mildly enlarged."] * 2
tok = train_wordpiece_tokenizer(texts, sys.argv[1])
print(json.dumps(tok.get_vocab(), sort_keys=True))
print(json.dumps(tok("Moderate left pleural effusion. Bibasilar opacities.")["input_ids"]))
"""


def test_wordpiece_tokenizer_is_the_same_in_every_process(tmp_path):
    """tokenizers' trainer breaks ties at random per process (huggingface/tokenizers#1794): without the fixed
    vocabulary these processes disagree on the ids (4 of 4 differed when this test was written)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    outs = [subprocess.run([sys.executable, "-c", TRAIN_TWICE, str(tmp_path / f"tok{i}")], capture_output=True,
                           text=True, timeout=120, env=env, check=True).stdout for i in range(3)]  # fmt: skip
    assert outs[0] == outs[1] == outs[2]
    vocab = AutoTokenizer.from_pretrained(str(tmp_path / "tok0")).get_vocab()
    assert [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])][:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert "effusion" in vocab and "b" in vocab and "##b" in vocab  # the texts' words, and their alphabet
