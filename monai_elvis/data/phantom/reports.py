"""Report text for phantom studies: FINDINGS and IMPRESSION naming side, lobe or zone, size and severity,
with paraphrases, and negated statements for what is absent."""

from __future__ import annotations

import numpy as np

from monai_elvis.data.phantom.findings import Finding

__all__ = ["describe", "compose_report", "MS_CXR_CATEGORY", "NEGATIONS"]

# finding kind -> MS-CXR style category name
MS_CXR_CATEGORY = {
    "nodule": "Nodule", "opacity": "Consolidation", "effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax",
    "cardiomegaly": "Cardiomegaly", "atelectasis": "Atelectasis",
}  # fmt: skip

NEGATIONS = {
    "nodule": ["No pulmonary nodules or masses.", "No suspicious pulmonary nodule.", "No focal mass is seen."],
    "opacity": ["No focal consolidation.", "The lungs are clear without focal consolidation.", "No airspace opacity."],
    "effusion": ["No pleural effusion.", "There is no pleural effusion.", "The costophrenic angles are sharp."],
    "pneumothorax": ["No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."],
    "cardiomegaly": ["Heart size is normal.", "The cardiac silhouette is within normal limits.", "Normal heart size."],
    "atelectasis": ["No atelectasis.", "No volume loss."],
}


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def describe(f: Finding, rng: np.random.Generator) -> tuple[str, str, str]:
    """``(findings sentence, impression sentence, grounding phrase)`` for one finding, with a random paraphrase."""
    a, side = f.attributes, f.side
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    if f.kind == "nodule":
        noun = "mass" if a["mass"] else "nodule"
        phrase = f"{a['size']} {noun} in the {a['lobe']}"
        sentence = pick([f"There is a {a['size']} {noun} in the {a['lobe']}.",
                         f"A {a['size']} {'mass' if a['mass'] else 'nodular opacity'} is seen in the {a['lobe']}.",
                         f"{_cap(a['lobe'])} {noun} measuring {a['size']}."])  # fmt: skip
        impression = f"{_cap(a['lobe'])} {noun}; further evaluation with chest CT is recommended."
    elif f.kind == "opacity":
        what = a["appearance"]
        phrase = f"{a['severity']} {what} in the {a['lobe']}"
        sentence = pick([f"There is {a['severity']} {what} in the {a['lobe']}.",
                         f"{_cap(a['severity'])} {what} is present in the {side} {a['zone']} zone, in the {a['lobe']}.",
                         f"{_cap(a['lobe'])} {what}, {a['severity']}."])  # fmt: skip
        impression = pick([f"{_cap(a['lobe'])} {what}, possibly pneumonia.", f"{_cap(side)} {a['zone']} zone {what}."])
    elif f.kind == "effusion":
        phrase = f"{a['size']} {side} pleural effusion"
        sentence = pick([f"There is a {a['size']} {side} pleural effusion.",
                         f"{_cap(a['size'])} {side}-sided pleural effusion.",
                         f"Blunting of the {side} costophrenic angle, consistent with a {a['size']} pleural effusion."])  # fmt: skip
        impression = f"{_cap(a['size'])} {side} pleural effusion."
    elif f.kind == "pneumothorax":
        phrase = f"{a['size']} {side} {a['location']} pneumothorax"
        sentence = pick([f"There is a {a['size']} {side} {a['location']} pneumothorax.",
                         f"{_cap(a['size'])} {a['location']} pneumothorax on the {side}.",
                         f"A {side} {a['location']} pneumothorax is seen, {a['size']} in size."])  # fmt: skip
        impression = f"{_cap(a['size'])} {side} pneumothorax."
    elif f.kind == "cardiomegaly":
        phrase = "enlarged cardiac silhouette"
        sentence = pick([f"The heart is {a['severity']} enlarged.", f"The cardiac silhouette is {a['severity']} enlarged.",
                         f"{_cap(a['severity'])} enlarged cardiac silhouette."])  # fmt: skip
        impression = pick(["Cardiomegaly.", f"{_cap(a['severity'])} enlarged heart."])
    elif f.kind == "atelectasis":
        phrase = f"{a['pattern']} atelectasis in the {a['lobe']}"
        sentence = pick([f"{_cap(a['pattern'])} atelectasis in the {a['lobe']}.",
                         f"There is {a['pattern']} atelectasis of the {a['lobe']}."])  # fmt: skip
        impression = f"{_cap(a['lobe'])} atelectasis."
    else:
        raise ValueError(f"unknown finding kind {f.kind!r}")
    return sentence, impression, phrase


def compose_report(findings: list[Finding], rng: np.random.Generator, negations: int = 3) -> tuple[str, list[dict]]:
    """The report text (``FINDINGS:`` and ``IMPRESSION:`` sections) and, per finding, its sentence and phrase."""
    described = []
    for f in findings:
        sentence, impression, phrase = describe(f, rng)
        described.append({"sentence": sentence, "impression": impression, "phrase": phrase})
    present = {f.kind for f in findings}
    absent = [k for k in NEGATIONS if k not in present]
    chosen = [absent[i] for i in rng.permutation(len(absent))[: max(0, negations)]]
    negated = [NEGATIONS[k][int(rng.integers(len(NEGATIONS[k])))] for k in chosen]
    heart_first = [s for s in negated if "heart" in s.lower() or "cardiac" in s.lower()]
    body = [d["sentence"] for d in described] + [s for s in negated if s not in heart_first]
    body = heart_first + [body[i] for i in rng.permutation(len(body))]
    impressions = [d["impression"] for d in described] or [
        ["No acute cardiopulmonary process.", "Normal chest radiograph.", "No acute intrathoracic abnormality."][
            int(rng.integers(3))]
    ]  # fmt: skip
    text = "FINDINGS: " + " ".join(body) + "\nIMPRESSION: " + " ".join(impressions) + "\n"
    return text, described
