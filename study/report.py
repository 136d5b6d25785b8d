"""Tables (Markdown, mean ± std over seeds) and plots (PNG) from the study's records."""

from __future__ import annotations

import textwrap

import json
import math
import shutil
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from study.runner import OBJECTIVES, legacy_settings
from study.stats import Difference, load_items, mean_auc, paired_bootstrap

# what the curve's val_mean_dice is: MONAI's MeanDice, the mean over each image's classes present, then over images
CURVE_MEAN = "Dice (per image, mean of its classes)"
LABELS = {"elvis": "ELVIS (intra-modal)", "lovt": "LoVT (spatial prior)", "one_hot": "one-hot local",
          "gloria": "GLoRIA", "convirt": "ConVIRT (global only)", "random": "random init"}  # fmt: skip


def _ms(values: Iterable[float]) -> tuple[float, float, int]:
    v = np.array([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], dtype=float)
    if not v.size:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def _fmt(mean: float, std: float, n: int, digits: int = 3) -> str:
    if n == 0:
        return "n/a"
    return f"{mean:.{digits}f} (1 seed)" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _objectives(records: Sequence[dict]) -> list[str]:
    present = {r.get("objective") for r in records}
    return [o for o in OBJECTIVES if o in present]


# (label, part of the items file, metric name, statistic, higher is better) of the measures of each model
MEASURES: tuple[tuple[str, str, str, str, bool], ...] = (
    ("zero-shot AUC", "validate", "val_zero_shot_auc", "auc", True),
    ("P@10 (class)", "validate", "val_precision_at_10", "mean", True),
    ("R@10", "validate", "val_recall_at_10", "mean", True),
    ("locality", "validate", "val_locality", "mean", True),
    ("map corr.", "validate", "val_map_correlation", "mean", False),
    ("CNR", "grounding", "cnr", "mean", True),
    ("mIoU", "grounding", "miou", "mean", True),
    ("pointing", "grounding", "pointing", "mean", True),
    ("side", "grounding", "side", "mean", True),
)
BASELINES = ("one_hot", "lovt", "gloria", "convirt", "random")


def _setting(records: Sequence[dict]) -> tuple[int, str]:
    """The main pre-training length (the most common one) and the default phantom's name."""
    lengths = [r["epochs"] for r in records if r.get("step") == "pretrain" and "epochs" in r]
    return (max(set(lengths), key=lengths.count) if lengths else 0), "easy"


def _run_name(phantom: str, objective: str, seed: int, epochs: int) -> str:
    return f"{phantom}_{objective}_s{seed}_e{epochs}"


def _values(items: dict, name: str, part: str, metric: str, statistic: str):
    """One seed's per-item values of a measure (or ``(scores, labels)`` for AUC); None when not recorded."""
    data = items.get(name, {}).get(part, {}).get("metrics", {}).get(metric)
    if data is None:
        return None
    if statistic == "auc":
        return np.asarray(data[0], float), np.asarray(data[1], float)
    return np.array([np.nan if v is None else v for v in data], float)


def _seed_stat(values, statistic: str) -> float:
    if values is None:
        return math.nan
    if statistic == "auc":
        return float(mean_auc(values[0][None], values[1][None])[0])
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


def _seeds(records: Sequence[dict]) -> list[int]:
    return sorted({r["seed"] for r in records if "seed" in r})


def _compare(items: dict, seeds: Sequence[int], a: str, b: str, phantom: str, epochs: int, part: str, metric: str,
             statistic: str) -> Difference | None:  # fmt: skip
    """ELVIS-style paired difference ``a - b`` over the seeds both have."""
    pairs = [(_values(items, _run_name(phantom, a, s, epochs), part, metric, statistic),
              _values(items, _run_name(phantom, b, s, epochs), part, metric, statistic)) for s in seeds]  # fmt: skip
    pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
    if not pairs:
        return None
    return paired_bootstrap([x for x, _ in pairs], [y for _, y in pairs], statistic)


def _cell(d: Difference | None) -> str:
    if d is None:
        return "n/a"
    text = str(d)
    return f"**{text}**" if d.significant else text


def _per_seed(items: dict, objective: str, seeds: Sequence[int], phantom: str, epochs: int,
              measure: str | tuple) -> list[float]:  # fmt: skip
    """One value per seed (those recorded) of ``measure`` (a ``MEASURES`` entry or its label) for ``objective``."""
    _, part, metric, statistic, _ = next(m for m in MEASURES if m[0] == measure) if isinstance(measure, str) else measure
    values = [_seed_stat(_values(items, _run_name(phantom, objective, s, epochs), part, metric, statistic), statistic)
              for s in seeds]  # fmt: skip
    return [v for v in values if not math.isnan(v)]


def measures_table(items: dict, objectives: Sequence[str], seeds: Sequence[int], phantom: str, epochs: int,
                   measures=MEASURES) -> str:  # fmt: skip
    """Mean ± sample std over seeds of each measure, one row per objective."""
    lines = ["| objective | " + " | ".join(m[0] for m in measures) + " |", "| --- |" + " ---: |" * len(measures)]
    for o in objectives:
        cells = [_fmt(*_ms(_per_seed(items, o, seeds, phantom, epochs, m))) for m in measures]
        lines.append(f"| {LABELS[o]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def differences_table(items: dict, objectives: Sequence[str], seeds: Sequence[int], phantom: str, epochs: int,
                      reference: str = "elvis", measures=MEASURES) -> tuple[str, dict]:  # fmt: skip
    """``reference`` minus each other objective, per measure, with the 95% paired bootstrap interval (bold where it
    excludes 0); returns the table and ``{(baseline, measure label): Difference}``."""
    others = [o for o in BASELINES if o in objectives and o != reference]
    found: dict = {}
    lines = ["| measure | " + " | ".join(f"vs {LABELS[o]}" for o in others) + " |", "| --- |" + " ---: |" * len(others)]
    for label, part, metric, statistic, higher in measures:
        cells = []
        for o in others:
            d = _compare(items, seeds, reference, o, phantom, epochs, part, metric, statistic)
            found[(o, label)] = d
            cells.append(_cell(d))
        arrow = "" if higher else " (lower is better)"
        lines.append(f"| {label}{arrow} | " + " | ".join(cells) + " |")
    return "\n".join(lines), found


def _seg_name(objective: str, seed: int, mode: str, fraction: float) -> str:
    return f"seg_{objective}_s{seed}_{mode}_{fraction}"


def segmentation_tables(records: Sequence[dict], items: dict, seeds: Sequence[int]) -> tuple[str, str, dict]:
    """Test Dice mean ± std by (mode, fraction), and ELVIS minus each baseline with its interval."""
    seg = [r for r in records if r.get("step") == "segmentation"]
    if not seg:
        return "", "", {}
    objs = _objectives(seg)
    fracs = sorted({r["fraction"] for r in seg})
    modes = [m for m in ("frozen", "finetune") if any(r["mode"] == m for r in seg)]
    head = [f"{m} {_pct(f)}" for m in modes for f in fracs]
    lines = ["| objective | " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(head)]
    for o in objs:
        cells = [_fmt(*_ms(r.get("test_mean_dice") for r in seg if r["objective"] == o and r["mode"] == m
                           and r["fraction"] == f)) for m in modes for f in fracs]  # fmt: skip
        lines.append(f"| {LABELS[o]} | " + " | ".join(cells) + " |")
    dice = "\n".join(lines)
    others = [o for o in BASELINES if o in objs]
    found: dict = {}
    lines = ["| labels | " + " | ".join(f"vs {LABELS[o]}" for o in others) + " |", "| --- |" + " ---: |" * len(others)]
    for m in modes:
        for f in fracs:
            cells = []
            for o in others:
                pairs = [(_values(items, _seg_name("elvis", s, m, f), "segmentation", "test_mean_dice", "mean"),
                          _values(items, _seg_name(o, s, m, f), "segmentation", "test_mean_dice", "mean")) for s in seeds]  # fmt: skip
                pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
                d = paired_bootstrap([x for x, _ in pairs], [y for _, y in pairs]) if pairs else None
                found[(o, m, f)] = d
                cells.append(_cell(d))
            lines.append(f"| {m} {_pct(f)} | " + " | ".join(cells) + " |")
    return dice, "\n".join(lines), found


def dice_by_class_table(records: Sequence[dict]) -> str:
    """Test Dice of each class at the largest label fraction, mean ± std over seeds, a row per objective and mode
    (no interval; ``""`` when those runs have no per-class values). A class no test image of a run holds (None) is
    left out of that run's figure."""
    seg = [r for r in records if r.get("step") == "segmentation"]
    fraction = max((r["fraction"] for r in seg), default=None)
    seg = [r for r in seg if r["fraction"] == fraction and r.get("test_dice_per_class")]
    if not seg:
        return ""
    classes = list(dict.fromkeys(k for r in seg for k in r["test_dice_per_class"]))
    modes = [m for m in ("frozen", "finetune") if any(r["mode"] == m for r in seg)]
    lines = [f"| objective ({_pct(fraction)} of the labels) | " + " | ".join(classes) + " |",
             "| --- |" + " ---: |" * len(classes)]  # fmt: skip
    for m in modes:
        for o in _objectives(seg):
            runs = [r for r in seg if r["objective"] == o and r["mode"] == m]
            if runs:
                cells = [_fmt(*_ms(r["test_dice_per_class"].get(c) for r in runs)) for c in classes]
                lines.append(f"| {LABELS[o]}, {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def length_table(items: dict, records: Sequence[dict], seeds: Sequence[int]) -> tuple[str, dict]:
    """For each pre-training length run for both ELVIS and one-hot: their means, and ELVIS minus one-hot."""
    lengths = sorted({r["epochs"] for r in records if r.get("step") == "locality" and r.get("phantom") == "easy"
                      and r.get("objective") == "elvis"} & {r["epochs"] for r in records if r.get("step") == "locality"
                      and r.get("phantom") == "easy" and r.get("objective") == "one_hot"})  # fmt: skip
    chosen = [m for m in MEASURES if m[0] in ("zero-shot AUC", "locality", "CNR", "pointing")]
    head = [f"{m[0]} ELVIS" for m in chosen] + [f"{m[0]} one-hot" for m in chosen] + [f"{m[0]} ELVIS − one-hot" for m in chosen]
    lines = ["| epochs | " + " | ".join(head) + " |", "| ---: |" + " ---: |" * len(head)]
    found: dict = {}
    for e in lengths:
        means = []
        for o in ("elvis", "one_hot"):
            for _, part, metric, statistic, _ in chosen:
                per_seed = [_seed_stat(_values(items, _run_name("easy", o, s, e), part, metric, statistic), statistic)
                            for s in seeds]  # fmt: skip
                means.append(_fmt(*_ms(per_seed)))
        diffs = []
        for label, part, metric, statistic, higher in chosen:
            d = _compare(items, seeds, "elvis", "one_hot", "easy", e, part, metric, statistic)
            found[(e, label)] = d
            diffs.append(_cell(d))
        lines.append(f"| {e} | " + " | ".join(means + diffs) + " |")
    return ("\n".join(lines) if lengths else ""), found


def summary_tables(records: Sequence[dict], items: dict | None = None) -> dict[str, str]:
    """Markdown tables: ``measures`` and ``differences`` (default phantom, main length), ``cnr_by_category``,
    ``lengths``, ``hard_measures`` and ``hard_differences`` (realistic phantom), ``dice``, ``dice_differences``,
    ``dice_by_class`` and ``seg_curve``; and the differences found (``found``, for the text)."""
    items = items or {}
    epochs, phantom = _setting(records)
    seeds = _seeds(records)
    main = [r for r in records if r.get("phantom", phantom) == phantom and r.get("epochs", epochs) == epochs]
    objs = _objectives(main)
    out: dict = {"measures": measures_table(items, objs, seeds, phantom, epochs)}
    out["differences"], out["found"] = differences_table(items, objs, seeds, phantom, epochs)

    grounding = [r for r in main if r.get("step") == "grounding"]
    cats = sorted({row["category"] for r in grounding for row in r["table"]} - {"all"})
    lines = ["| objective | " + " | ".join(cats) + " |", "| --- |" + " ---: |" * len(cats)]
    for o in objs:
        cells = []
        for c in cats:
            cnr = [row.get("cnr") for r in grounding if r["objective"] == o for row in r["table"] if row["category"] == c]
            hit = [row.get("pointing") for r in grounding if r["objective"] == o for row in r["table"] if row["category"] == c]
            cells.append(f"{_fmt(*_ms(cnr), digits=2)} / {_fmt(*_ms(hit), digits=2)}")
        lines.append(f"| {LABELS[o]} | " + " | ".join(cells) + " |")
    out["cnr_by_category"] = "\n".join(lines)

    out["lengths"], out["found_lengths"] = length_table(items, records, seeds)
    hard = [r for r in records if r.get("phantom") == "realistic"]
    hard_objs = _objectives(hard)
    if hard_objs:
        out["hard_measures"] = measures_table(items, hard_objs, seeds, "realistic", epochs)
        out["hard_differences"], out["found_hard"] = differences_table(items, hard_objs, seeds, "realistic", epochs)
    out["dice"], out["dice_differences"], out["found_dice"] = segmentation_tables(records, items, seeds)
    out["dice_by_class"] = dice_by_class_table(records)
    curve = next((r for r in records if r.get("step") == "seg_curve"), None)
    if curve:
        classes = list(curve["curve"][0].get("per_class", {})) if curve["curve"] else []
        lines = [f"| steps | {CURVE_MEAN} | " + " | ".join(classes) + (" |" if classes else ""),
                 "| ---: | ---: |" + " ---: |" * len(classes)]  # fmt: skip
        for c in curve["curve"]:
            if c["val_mean_dice"] is not None:
                per = [f"{c['per_class'][k]:.3f}" if c["per_class"].get(k) is not None else "n/a" for k in classes]
                lines.append(f"| {c['iterations']} | {c['val_mean_dice']:.3f} |" + "".join(f" {v} |" for v in per))
        out["seg_curve"] = "\n".join(lines)
    return out


def conclusions(tables: dict) -> list[str]:
    """Sentences of what the intervals say: for each baseline, where ELVIS is clearly better, clearly worse, or not
    distinguishable (the 95% interval of the difference includes 0)."""
    text = []

    def sentence(subject: str, found: dict, keys: Sequence, label_of) -> str | None:
        better, worse, unclear = [], [], []
        for key in keys:
            d = found.get(key)
            if d is None or str(d) == "n/a":
                continue
            higher = label_of(key)[1]
            name = label_of(key)[0]
            if not d.significant:
                unclear.append(name)
            elif (d.value > 0) == higher:
                better.append(f"{name} ({d})")
            else:
                worse.append(f"{name} ({d})")
        if not (better or worse or unclear):
            return None
        parts = []
        if better:
            parts.append("better on " + ", ".join(better))
        if worse:
            parts.append("worse on " + ", ".join(worse))
        if unclear:
            parts.append("not distinguishable on " + ", ".join(unclear))
        return f"{subject}: ELVIS is " + "; ".join(parts) + "."

    higher = {m[0]: m[4] for m in MEASURES}
    measure = lambda k: (k[-1], higher[k[-1]])  # noqa: E731  # keys ending in a measure's label
    groups = [(f"Against {LABELS[o]} (default phantom)", tables.get("found", {}), lambda k, o=o: k[0] == o, measure)
              for o in BASELINES]  # fmt: skip
    lengths = tables.get("found_lengths", {})
    groups += [(f"Against one-hot after {e} epochs", lengths, lambda k, e=e: k[0] == e, measure)
               for e in sorted({k[0] for k in lengths})]  # fmt: skip
    groups += [(f"Against {LABELS[o]} (realistic phantom)", tables.get("found_hard", {}), lambda k, o=o: k[0] == o,
                measure) for o in BASELINES]  # fmt: skip
    groups += [(f"Segmentation Dice against {LABELS[o]}", tables.get("found_dice", {}), lambda k, o=o: k[0] == o,
                lambda k: (f"{k[1]} {_pct(k[2])}", True)) for o in BASELINES]  # fmt: skip
    for subject, found, wanted, label_of in groups:
        s = sentence(subject, found, [k for k in found if wanted(k)], label_of)
        if s:
            text.append(s)
    return text


def _sweep_grounding(sweep_records: Sequence[dict]) -> tuple[int, dict[str, dict[str, tuple[float, float, int]]]]:
    """The sweep's longest training length and ``{variant: {"CNR" | "pointing": (mean, std, n)}}`` over seeds at
    that length, from its grounding records (the "all" row); ``(0, {})`` without any."""
    grounding = [r for r in sweep_records if r.get("step") == "grounding"]
    if not grounding:
        return 0, {}
    longest = max(r["epochs"] for r in grounding)
    out: dict = defaultdict(dict)
    for variant in dict.fromkeys(r["variant"] for r in grounding):
        rows = [next(t for t in r["table"] if t["category"] == "all") for r in grounding
                if r["variant"] == variant and r["epochs"] == longest]  # fmt: skip
        out[variant] = {"CNR": _ms(t.get("cnr") for t in rows), "pointing": _ms(t.get("pointing") for t in rows)}
    return longest, dict(out)


def one_hot_reasons(records: Sequence[dict], items: dict, found: dict,
                    sweep_records: Sequence[dict] = ()) -> list[str]:  # fmt: skip
    """Sentences of what the measurements say about why ELVIS does not beat one-hot local on grounding, written
    only when its CNR or pointing interval against one-hot contains 0: how much locality one-hot loses (beside an
    untrained encoder and ELVIS), how the grounding measures vary between seeds against the difference, and, from a
    sweep's records, how far ELVIS's settings move them against one-hot's seed spread."""
    unclear = [m for m in ("CNR", "pointing") if found.get(("one_hot", m)) is not None
               and not found[("one_hot", m)].significant]  # fmt: skip
    if not unclear:
        return []
    epochs, phantom = _setting(records)
    seeds = _seeds(records)
    text = []
    loc = {o: _ms(_per_seed(items, o, seeds, phantom, epochs, "locality")) for o in ("elvis", "one_hot", "random")}
    if all(v[2] for v in loc.values()):
        lost = loc["random"][0] - loc["one_hot"][0]
        kept = (f"they lose {lost:.3f} of it" if lost > 0 else "they lose none of it")
        text.append(f"One-hot local targets keep a locality of {loc['one_hot'][0]:.3f} after {epochs} epochs, against "
                    f"{loc['random'][0]:.3f} for an untrained encoder and {loc['elvis'][0]:.3f} for ELVIS: {kept}. The "
                    f"loss of intra-image similarity that ELVIS's targets guard against is "
                    f"{'small' if lost < 0.05 else 'large'} at this length, so there is "
                    f"{'little' if lost < 0.05 else 'much'} for ELVIS to win back.")  # fmt: skip
    for m in unclear:
        e, o = (_ms(_per_seed(items, x, seeds, phantom, epochs, m)) for x in ("elvis", "one_hot"))
        d = found[("one_hot", m)]
        if e[2] > 1 and o[2] > 1:
            text.append(f"{m[0].upper() + m[1:]} varies between seeds (sample std {e[1]:.3f} for ELVIS, {o[1]:.3f} for one-hot) "
                        f"{'more' if max(e[1], o[1]) > abs(d.value) else 'less'} than it differs between the two "
                        f"({d}): {len(seeds)} seeds cannot separate them.")  # fmt: skip
    longest, sweep = _sweep_grounding(sweep_records)
    if "one_hot" in sweep and len(sweep) > 1:
        settings = [v for v in sweep if v != "one_hot"]
        for m in unclear:
            ref = sweep["one_hot"][m]
            means = {v: sweep[v][m][0] for v in settings}
            best = max(means, key=means.get)
            beyond = [v for v in settings if means[v] - ref[0] > ref[1]]
            text.append(f"In the sweep ({len(settings)} ELVIS settings, {longest} epochs, validation split), {m} "
                        f"ranges {min(means.values()):.3f} to {max(means.values()):.3f} (best: {best}) against "
                        f"one-hot's {ref[0]:.3f} ± {ref[1]:.3f}; "
                        + (f"{', '.join(beyond)} {'is' if len(beyond) == 1 else 'are'} above it by more than "
                           f"one-hot's seed spread." if beyond else
                           "no setting is above it by more than one-hot's seed spread."))  # fmt: skip
    return text


def _yerr(stats: Sequence[tuple[float, float, int]], top: float | None = None) -> np.ndarray:
    """``[2, K]`` error bars of ``(mean, std, n)`` clipped to the figure's range: no bar below 0 (and, with
    ``top``, none above it); a NaN std (one seed) draws no bar."""
    mean = np.array([st[0] for st in stats], float)
    std = np.nan_to_num(np.array([st[1] for st in stats], float))
    low = np.minimum(std, np.clip(np.nan_to_num(mean), 0.0, None))
    high = std if top is None else np.minimum(std, np.clip(top - np.nan_to_num(mean), 0.0, None))
    return np.stack([low, high])


def _save(fig, path: Path, plt, dpi: int = 110) -> Path:
    """Lay ``fig`` out, write it to ``path`` and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _length_plot(records: Sequence[dict], items: dict, out_dir: Path, plt) -> list[Path]:
    """``length_axis.png``: locality, pointing and CNR of ELVIS and one-hot against the pre-training length."""
    seeds = _seeds(records)
    lengths = sorted({r["epochs"] for r in records if r.get("step") == "locality" and r.get("phantom") == "easy"})
    chosen = [m for m in MEASURES if m[0] in ("locality", "pointing", "CNR", "zero-shot AUC")]
    if len(lengths) < 2:
        return []
    fig, axes = plt.subplots(1, len(chosen), figsize=(4 * len(chosen), 3.4), squeeze=False)
    for ax, (label, part, metric, statistic, _) in zip(axes[0], chosen):
        for o in ("elvis", "one_hot"):
            stats = [_ms(_seed_stat(_values(items, _run_name("easy", o, s, e), part, metric, statistic), statistic)
                         for s in seeds) for e in lengths]  # fmt: skip
            ax.errorbar(lengths, [st[0] for st in stats], yerr=[st[1] if st[2] > 1 else 0 for st in stats], marker="o",
                        capsize=2, label=LABELS[o])  # fmt: skip
        ax.set_xticks(lengths)
        ax.set_xlabel("pre-training epochs")
        ax.set_ylabel(f"{label} (mean ± std over seeds)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Training length, default phantom, test split")
    return [_save(fig, out_dir / "length_axis.png", plt)]


def classes_learnt_at(points: Sequence[dict], share: float = 0.5, least: float = 0.1) -> dict[str, int]:
    """For each class of the curve's ``per_class`` Dice that the model learns (a best of at least ``least``), the
    first step at which its Dice reaches ``share`` of its best on the curve. A class whose best stays below
    ``least`` is left out: the model does not learn it in the curve's length, and half of a best near 0 would say
    nothing."""
    classes = {k for c in points for k in c.get("per_class", {})}
    out = {}
    for k in sorted(classes):
        values = [(c["iterations"], c["per_class"].get(k)) for c in points if c.get("per_class", {}).get(k) is not None]
        best = max((v for _, v in values), default=0.0)
        if best >= least:
            out[k] = next(i for i, v in values if v >= share * best)
    return out


def schedule_summary(records: Sequence[dict], seg_iterations: int | None, share: float = 0.95,
                     least: float = 0.1) -> str:  # fmt: skip
    """What the from-scratch curve says of the study's segmentation schedule: its Dice at ``seg_iterations``
    against the curve's best, the first step at ``share`` of that best, when each class it learns (a best of at
    least ``least``, see :func:`classes_learnt_at`) reaches half its best, and what a schedule of that length would
    cost for every segmentation run of the study (each run's measured time outside its steps, plus that many steps
    at the curve's time per step). ``""`` without a curve."""
    curve = next((r for r in records if r.get("step") == "seg_curve"), None)
    points = [c for c in (curve or {}).get("curve", []) if c.get("val_mean_dice") is not None]
    if not points or not seg_iterations:
        return ""
    best = max(points, key=lambda c: c["val_mean_dice"])
    reach = next(c for c in points if c["val_mean_dice"] >= share * best["val_mean_dice"])
    below = [c for c in points if c["iterations"] <= seg_iterations]
    at = below[-1] if below else None
    per_step = curve["seconds"] / points[-1]["iterations"]
    runs = [r for r in records if r.get("step") == "segmentation"]
    text = (f"The curve's best validation Dice (each image's mean over its classes) is {best['val_mean_dice']:.3f} (at "
            f"{best['iterations']} steps); it first reaches {share:.0%} of that at {reach['iterations']} steps.")
    if best is points[-1]:
        text += " The best is the curve's last point: it has not levelled off, and a longer curve may find more."
    if at is not None:
        text += (f" At {at['iterations']} steps, the nearest point at or below the study's {seg_iterations}, it is "
                 f"{at['val_mean_dice']:.3f}.")
    learnt = classes_learnt_at(points, least=least)
    unlearnt = sorted({k for c in points for k in c.get("per_class", {})} - set(learnt))
    if learnt:
        last = max(learnt.values())
        text += (" Every class it learns reaches half its best Dice by " + f"{last} steps ("
                 + ", ".join(f"{k} {v}" for k, v in sorted(learnt.items(), key=lambda kv: (kv[1], kv[0]))) + ")"
                 + (f"; {', '.join(unlearnt)} below {least:g} throughout" if unlearnt else "")
                 + (f", within the study's {seg_iterations}." if last <= seg_iterations
                    else f", after the study's {seg_iterations}."))  # fmt: skip
    if runs and reach["iterations"] > seg_iterations:
        outside = sum(max(0.0, r["seconds"] - seg_iterations * per_step) for r in runs) / len(runs)
        minutes = len(runs) * (outside + reach["iterations"] * per_step) / 60
        spent = sum(r["seconds"] for r in runs) / 60
        text += (f" The study's schedule is short of the plateau: at {per_step:.2f} s a step (the curve's "
                 f"time, validations included), its {len(runs)} segmentation runs at {reach['iterations']} steps "
                 f"would take about {minutes:.0f} minutes of worker time, against {spent:.0f} for "
                 f"{seg_iterations} steps.")
    return text


def _curve_plot(records: Sequence[dict], out_dir: Path, plt, seg_iterations: int | None = None) -> list[Path]:
    """``seg_curve.png``: validation Dice of the from-scratch segmentation model against its training steps."""
    curve = next((r for r in records if r.get("step") == "seg_curve"), None)
    if not curve:
        return []
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    points = [c for c in curve["curve"] if c["val_mean_dice"] is not None]
    ax.plot([c["iterations"] for c in points], [c["val_mean_dice"] for c in points], marker="o", color="black",
            label=CURVE_MEAN)  # fmt: skip
    for k in sorted({k for c in points for k in c.get("per_class", {})}):
        xy = [(c["iterations"], c["per_class"][k]) for c in points if c.get("per_class", {}).get(k) is not None]
        ax.plot([x for x, _ in xy], [y for _, y in xy], linewidth=1, alpha=0.8, label=k)
    if seg_iterations:
        ax.axvline(seg_iterations, color="grey", linestyle="--", label=f"the study's schedule ({seg_iterations} steps)")
    ax.set_xlabel("training steps")
    ax.set_ylabel("validation Dice")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("From scratch, 100% of the labels: the curve that chooses the schedule", fontsize=9)
    return [_save(fig, out_dir / "seg_curve.png", plt)]


def _forest_plot(found: dict, out_dir: Path, plt) -> Path:
    """``differences.png``: ELVIS minus each baseline per measure, with the 95% paired bootstrap interval."""
    labels = [m[0] for m in MEASURES]
    others = [o for o in BASELINES if any(k[0] == o for k in found)]
    fig, axes = plt.subplots(1, len(labels), figsize=(2.2 * len(labels), 0.45 * len(others) + 1.6), sharey=True,
                             squeeze=False)  # fmt: skip
    for ax, label in zip(axes[0], labels):
        for i, o in enumerate(others):
            d = found.get((o, label))
            if d is None:
                continue
            ax.errorbar([d.value], [i], xerr=[[d.value - d.low], [d.high - d.value]], fmt="o",
                        color="C2" if d.significant else "grey", capsize=3)  # fmt: skip
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(label + ("" if dict((m[0], m[4]) for m in MEASURES)[label] else " (lower better)"), fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_yticks(range(len(others)), [f"vs {LABELS[o]}" for o in others], fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle("ELVIS minus baseline, default phantom test split: 95% paired bootstrap interval (green: excludes 0)",
                 fontsize=9)  # fmt: skip
    return _save(fig, out_dir / "differences.png", plt)


def plots(records: Sequence[dict], out_dir: Path, heatmap_dirs: dict[str, Path] | None = None,
          phrases: Sequence[dict] | None = None, items: dict | None = None,
          differences: dict | None = None, seg_iterations: int | None = None) -> list[Path]:  # fmt: skip
    """``cnr_per_category.png``, ``dice_vs_fraction.png``, ``locality.png``, ``length_axis.png``, ``seg_curve.png``,
    ``differences.png`` and, with heatmap folders, ``heatmaps.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    epochs, phantom = _setting(records)
    all_records, records = records, [r for r in records if r.get("phantom", phantom) == phantom
                                     and r.get("epochs", epochs) == epochs]  # fmt: skip
    objs = _objectives(records)
    written = []

    grounding = [r for r in records if r.get("step") == "grounding"]
    cats = sorted({row["category"] for r in grounding for row in r["table"]} - {"all"}) + ["all"]
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / max(len(objs), 1)
    for i, o in enumerate(objs):
        stats = [_ms(row.get("cnr") for r in grounding if r["objective"] == o for row in r["table"] if row["category"] == c)
                 for c in cats]  # fmt: skip
        ax.bar(np.arange(len(cats)) + i * width, [s[0] for s in stats], width, yerr=_yerr(stats),
               label=LABELS[o], capsize=2)  # fmt: skip
    ax.set_xticks(np.arange(len(cats)) + 0.4 - width / 2, cats, rotation=15)
    ax.set_ylabel("CNR (mean ± std over seeds)")
    ax.set_title("Phrase-grounding CNR per category, phantom test split")
    ax.legend(fontsize=8, ncol=3)
    written.append(_save(fig, out_dir / "cnr_per_category.png", plt))

    seg = [r for r in records if r.get("step") == "segmentation"]
    if seg:
        modes = [m for m in ("frozen", "finetune") if any(r["mode"] == m for r in seg)]
        fracs = sorted({r["fraction"] for r in seg})
        fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
        for ax, m in zip(axes[0], modes):
            for o in objs:
                stats = [_ms(r.get("test_mean_dice") for r in seg if r["objective"] == o and r["mode"] == m
                             and r["fraction"] == f) for f in fracs]  # fmt: skip
                ax.errorbar([100 * f for f in fracs], [s[0] for s in stats], yerr=_yerr(stats, top=1.0), marker="o",
                            capsize=2, label=LABELS[o])  # fmt: skip
            ax.set_xscale("log")
            ax.set_xticks([100 * f for f in fracs], [_pct(f) for f in fracs])
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            ax.set_xlabel("labels used")
            ax.set_ylabel("test mean Dice")
            ax.set_title(f"encoder {m}")
        axes[0][0].legend(fontsize=8)
        written.append(_save(fig, out_dir / "dice_vs_fraction.png", plt))

    loc = [r for r in records if r.get("step") == "locality"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    stats = [_ms(r.get("val_locality") for r in loc if r["objective"] == o) for o in objs]
    ax.bar(range(len(objs)), [s[0] for s in stats], yerr=_yerr(stats, top=1.0), capsize=3)
    ax.set_xticks(range(len(objs)), [LABELS[o] for o in objs], rotation=15, fontsize=8)
    ax.set_ylabel("locality preservation (Pearson r)")
    ax.set_title("Intra-image similarity before vs after projection")
    written.append(_save(fig, out_dir / "locality.png", plt))

    written += _length_plot(all_records, items or {}, out_dir, plt)
    written += _curve_plot(all_records, out_dir, plt, seg_iterations)
    if differences:
        written.append(_forest_plot(differences, out_dir, plt))

    if heatmap_dirs and phrases:
        from PIL import Image

        from monai_elvis.engines import phrase_slug

        fig, axes = plt.subplots(len(phrases), len(heatmap_dirs), figsize=(2.2 * len(heatmap_dirs), 2.4 * len(phrases)),
                                 squeeze=False)  # fmt: skip
        for i, p in enumerate(phrases):
            for j, (o, folder) in enumerate(heatmap_dirs.items()):
                ax = axes[i][j]
                f = Path(folder) / f"{Path(p['image']).stem}_{phrase_slug(p['phrase'])}_overlay.png"
                if f.is_file():
                    ax.imshow(np.asarray(Image.open(f)))
                    for x, y, w, h in p.get("boxes", []):
                        ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, edgecolor="white", linewidth=1))
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(LABELS[o], fontsize=8)
                if j == 0:
                    ax.set_ylabel("\n".join(textwrap.wrap(p["phrase"], 22)), fontsize=7)
        from matplotlib.colors import ListedColormap

        from monai_elvis.engines import heat_colormap

        cmap = ListedColormap(heat_colormap(np.linspace(0, 1, 256)[None])[0])
        fig.tight_layout(rect=(0, 0, 0.92, 1))
        bar = fig.add_axes((0.94, 0.15, 0.015, 0.7))
        fig.colorbar(plt.cm.ScalarMappable(cmap=cmap), cax=bar, label="phrase-region similarity (scaled)")
        written.append(out_dir / "heatmaps.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def _shown_path(path: Path) -> str:
    """``path`` relative to the current folder when it lies below it (a repository path), else absolute."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def _tokenizer_dir(work: Path) -> Path:
    """The tokenizer a study's work dir used: its ``config.json``'s ``tokenizer_dir``, else ``<work>/tokenizer``."""
    config = work / "config.json"
    given = json.loads(config.read_text()).get("tokenizer_dir") if config.is_file() else None
    return Path(given) if given else work / "tokenizer"


def _settings_text(config: dict, records: Sequence[dict]) -> list[str]:
    """What was run, from the study's ``config.json``."""
    if not config:
        return []
    seg_objs = config.get("seg_objectives") or config.get("objectives", [])
    rate = config["seg_learning_rate"] if "seg_learning_rate" in config else legacy_settings(config)["seg_learning_rate"]
    return [
        f"- Seeds {config.get('seeds')}; every objective pre-trained for {config.get('pretrain_epochs')} epochs on the "
        f"default (easy) phantom, scale `{config.get('scale')}`; measured on its **{config.get('split')}** split.",
        f"- Training-length axis: {', '.join(LABELS[o] for o in config.get('length_objectives', []))} also for "
        f"{config.get('length_epochs')} epochs.",
        f"- Realistic (harder) phantom: {', '.join(LABELS[o] for o in config.get('hard_objectives', []))}.",
        f"- Segmentation: {', '.join(LABELS[o] for o in seg_objs)}; {_seg_seeds(config)}{config.get('seg_iterations')} "
        f"steps of batch {config.get('seg_batch_size')} at a constant learning rate of {rate:g}, at "
        f"{', '.join(_pct(f) for f in config.get('seg_fractions', []))} "
        "of the labels, encoder frozen (a decoder trained on it) and fine-tuned; random init fine-tuned is training "
        "from scratch.",
        "- Intervals: ELVIS minus the baseline, 95% paired bootstrap over seeds and test items (2,000 resamples, "
        "`study/stats.py`); **bold** where the interval excludes 0. Mean ± sample standard deviation over seeds "
        "elsewhere.",
    ]


def _seg_seeds(config: dict) -> str:
    seeds, count = list(config.get("seeds", [])), config.get("seg_seeds")
    return "" if count is None or count >= len(seeds) else f"seeds {seeds[:count]}; "


def write_report(records: Sequence[dict], out_dir: str | Path, work_dir: str | Path | None = None) -> Path:
    """Write ``results.md`` with the tables and the text of what they say, ``records.json``, the per-item values
    (``items/``) and the plots into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config: dict = {}
    items = load_items(work_dir) if work_dir is not None else {}
    if work_dir is not None and (Path(work_dir) / "config.json").is_file():
        config = json.loads((Path(work_dir) / "config.json").read_text())
    if items and Path(work_dir, "items").resolve() != (out_dir / "items").resolve():  # the values behind the intervals
        current = {p.name for p in (Path(work_dir) / "items").glob("*.json")}
        for stale in (out_dir / "items").glob("*.json") if (out_dir / "items").is_dir() else []:
            if stale.name not in current:  # a copy of a step the study no longer has (e.g. superseded segmentation)
                stale.unlink()
        shutil.copytree(Path(work_dir) / "items", out_dir / "items", dirs_exist_ok=True)
    if not items:
        items = load_items(out_dir)
    if config:
        (out_dir / "study_config.json").write_text(json.dumps(config, indent=1))
    elif (out_dir / "study_config.json").is_file():
        config = json.loads((out_dir / "study_config.json").read_text())
    tables = summary_tables(records, items)
    heatmap_dirs, phrases = None, None
    if work_dir is not None:
        work = Path(work_dir)
        if (work / "heatmap_phrases.json").is_file():
            phrases = json.loads((work / "heatmap_phrases.json").read_text())
            heatmap_dirs = {o: work / "heatmaps" / o for o in _objectives(records) if (work / "heatmaps" / o).is_dir()}
    pngs = plots(records, out_dir, heatmap_dirs, phrases, items, tables.get("found"), config.get("seg_iterations"))
    if not heatmap_dirs and config.get("heatmap_phrases") and (out_dir / "heatmaps.png").is_file():
        pngs.append(out_dir / "heatmaps.png")  # drawn from a work folder this one lacks: kept
    tokenizer_note = []
    if work_dir is not None:  # say which tokenizer the runs used (ids differ between tokenizer versions)
        work = Path(work_dir).resolve()
        tokenizer = _tokenizer_dir(work).resolve()
        if tokenizer.is_dir() and tokenizer.is_relative_to(work):  # trained by the study: ship a copy
            if tokenizer != (out_dir / "tokenizer").resolve():
                shutil.copytree(tokenizer, out_dir / "tokenizer", dirs_exist_ok=True)
            tokenizer_note = [f"The tokenizer of these runs is in `tokenizer/`: `python -m study run --tokenizer-dir "
                              f"{(out_dir / 'tokenizer').as_posix()}` repeats them with it.", ""]  # fmt: skip
        elif tokenizer.is_dir():  # given with --tokenizer-dir (e.g. an earlier study's): point at it, no second copy
            shown = _shown_path(tokenizer)
            tokenizer_note = [f"These runs used the tokenizer in `{shown}` (given with `--tokenizer-dir`): `python -m "
                              f"study run --tokenizer-dir {shown}` repeats them with it.", ""]  # fmt: skip
    steps = sum(r.get("seconds", 0) for r in records if r.get("step") not in ("session", None))
    sessions = [r for r in records if r.get("step") == "session"]
    at_once = f", {sessions[-1]['processes']} at a time" if sessions and sessions[-1].get("processes") else ""
    text = ["# Reproduction study results", ""]
    text += [f"Time of the steps: {steps / 60:.1f} min in all (pre-training, evaluation, grounding, segmentation, each "
             f"summed over the processes that ran them{at_once}); {len(sessions)} invocation(s) of the study command, "
             f"the last {sessions[-1]['seconds'] / 60:.1f} min of wall time." if sessions
             else f"Time of the steps so far: {steps / 60:.1f} min (the study has not finished).", ""]
    text += tokenizer_note
    text += _settings_text(config, records) + ([""] if config else [])
    said = conclusions(tables)
    if said:
        text += ["## What the data say", "", "Generated from the intervals below: a difference is named only where its "
                 "95% interval excludes 0.", ""] + [f"- {s}" for s in said] + [""]  # fmt: skip
    sweep_file = out_dir / "sweep_validation_records.json"  # written by `python -m study sweep --out` the same folder
    sweep_records = json.loads(sweep_file.read_text()) if sweep_file.is_file() else []
    why = one_hot_reasons(records, items, tables.get("found", {}), sweep_records)
    if why:
        text += ["## Why ELVIS does not beat one-hot on grounding", "",
                 "Generated from the measures" + (" and from `sweep_validation.md`" if sweep_records else "") + ":",
                 ""] + [f"- {s}" for s in why] + [""]  # fmt: skip
    text += ["## Pre-training measures, default phantom", "", tables["measures"], "",
             "## ELVIS minus each baseline, default phantom", "", tables["differences"], "",
             "## Grounding per category: CNR / pointing", "", tables["cnr_by_category"], ""]  # fmt: skip
    if tables.get("lengths"):
        text += ["## Training length: ELVIS and one-hot", "", tables["lengths"], ""]
    if tables.get("hard_measures"):
        text += ["## Realistic (harder) phantom", "", tables["hard_measures"], "", tables["hard_differences"], ""]
    if tables.get("dice"):
        text += ["## Segmentation test Dice by label fraction", "", tables["dice"], "",
                 "ELVIS minus each baseline:", "", tables["dice_differences"], ""]  # fmt: skip
        if tables.get("dice_by_class"):
            text += ["Test Dice of each class at the largest label fraction, mean ± std over seeds (by class; "
                     "no interval):", "", tables["dice_by_class"], ""]  # fmt: skip
    if tables.get("seg_curve"):
        text += ["## The segmentation schedule", "", "Validation Dice of a model trained from scratch on every label, "
                 "in all and of each class, after each epoch of its run, at the batch size and constant learning rate "
                 "of the study's runs (the study's schedule is marked on `seg_curve.png`):", "",
                 tables["seg_curve"], ""]  # fmt: skip
        summary = schedule_summary(records, config.get("seg_iterations"))
        text += [textwrap.fill(summary, 120), ""] if summary else []
    text += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    (out_dir / "results.md").write_text("\n".join(text) + "\n")
    (out_dir / "records.json").write_text(json.dumps(list(records), indent=1))
    return out_dir / "results.md"
