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

from study.runner import OBJECTIVES

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


def summary_tables(records: Sequence[dict]) -> dict[str, str]:
    """Markdown tables: ``overall`` (grounding, locality, retrieval), ``cnr_by_category``, ``dice``."""
    objs = _objectives(records)
    by = defaultdict(list)
    for r in records:
        by[(r.get("step"), r.get("objective"))].append(r)
    seeds = sorted({r["seed"] for r in records if "seed" in r})
    lines = [f"Mean ± sample standard deviation over the seeds run ({seeds}); test split of the phantom.", "",
             "| objective | CNR | mIoU | pointing | locality | R@10 |", "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for o in objs:
        g = [next(row for row in r["table"] if row["category"] == "all") for r in by[("grounding", o)]]
        loc = by[("locality", o)]
        cells = [_fmt(*_ms(x.get(m) for x in g)) for m in ("cnr", "miou", "pointing")]
        cells += [_fmt(*_ms(x.get("val_locality") for x in loc)), _fmt(*_ms(x.get("val_recall_at_10") for x in loc))]
        lines.append(f"| {LABELS[o]} | " + " | ".join(cells) + " |")
    overall = "\n".join(lines)

    cats = sorted({row["category"] for r in records if r.get("step") == "grounding" for row in r["table"]} - {"all"})
    lines = ["| objective | " + " | ".join(cats) + " |", "| --- |" + " ---: |" * len(cats)]
    for o in objs:
        cells = []
        for c in cats:
            vals = [row.get("cnr") for r in by[("grounding", o)] for row in r["table"] if row["category"] == c]
            cells.append(_fmt(*_ms(vals), digits=2))
        lines.append(f"| {LABELS[o]} | " + " | ".join(cells) + " |")
    cnr_table = "\n".join(lines)

    seg = [r for r in records if r.get("step") == "segmentation"]
    fracs = sorted({r["fraction"] for r in seg})
    modes = [m for m in ("frozen", "finetune") if any(r["mode"] == m for r in seg)]
    head = [f"{m} {f:g}" for m in modes for f in fracs]
    lines = ["| objective | " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(head)]
    for o in objs:
        cells = [_fmt(*_ms(r.get("test_mean_dice") for r in seg if r["objective"] == o and r["mode"] == m
                           and r["fraction"] == f)) for m in modes for f in fracs]  # fmt: skip
        lines.append(f"| {LABELS[o]} | " + " | ".join(cells) + " |")
    dice = "\n".join(lines)
    return {"overall": overall, "cnr_by_category": cnr_table, "dice": dice}


def _yerr(stats: Sequence[tuple[float, float, int]], top: float | None = None) -> np.ndarray:
    """``[2, K]`` error bars of ``(mean, std, n)`` clipped to the figure's range: no bar below 0 (and, with
    ``top``, none above it); a NaN std (one seed) draws no bar."""
    mean = np.array([st[0] for st in stats], float)
    std = np.nan_to_num(np.array([st[1] for st in stats], float))
    low = np.minimum(std, np.clip(np.nan_to_num(mean), 0.0, None))
    high = std if top is None else np.minimum(std, np.clip(top - np.nan_to_num(mean), 0.0, None))
    return np.stack([low, high])


def plots(records: Sequence[dict], out_dir: Path, heatmap_dirs: dict[str, Path] | None = None,
          phrases: Sequence[dict] | None = None) -> list[Path]:  # fmt: skip
    """``cnr_per_category.png``, ``dice_vs_fraction.png``, ``locality.png`` and, with heatmap folders,
    ``heatmaps.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
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
    fig.tight_layout()
    written.append(out_dir / "cnr_per_category.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

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
            ax.set_xticks([100 * f for f in fracs], [f"{100 * f:g}%" for f in fracs])
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            ax.set_xlabel("labels used")
            ax.set_ylabel("test mean Dice")
            ax.set_title(f"encoder {m}")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "dice_vs_fraction.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    loc = [r for r in records if r.get("step") == "locality"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    stats = [_ms(r.get("val_locality") for r in loc if r["objective"] == o) for o in objs]
    ax.bar(range(len(objs)), [s[0] for s in stats], yerr=_yerr(stats, top=1.0), capsize=3)
    ax.set_xticks(range(len(objs)), [LABELS[o] for o in objs], rotation=15, fontsize=8)
    ax.set_ylabel("locality preservation (Pearson r)")
    ax.set_title("Intra-image similarity before vs after projection")
    fig.tight_layout()
    written.append(out_dir / "locality.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

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


def write_report(records: Sequence[dict], out_dir: str | Path, work_dir: str | Path | None = None) -> Path:
    """Write ``results.md`` with the tables, ``records.json`` and the plots into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = summary_tables(records)
    heatmap_dirs, phrases = None, None
    if work_dir is not None:
        work = Path(work_dir)
        if (work / "heatmap_phrases.json").is_file():
            phrases = json.loads((work / "heatmap_phrases.json").read_text())
            heatmap_dirs = {o: work / "heatmaps" / o for o in _objectives(records) if (work / "heatmaps" / o).is_dir()}
    pngs = plots(records, out_dir, heatmap_dirs, phrases)
    tokenizer_note = []
    if work_dir is not None:  # WordPiece training is not deterministic: say which tokenizer the runs used
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
    sessions = [r["seconds"] for r in records if r.get("step") == "session"]
    text = ["# Reproduction study results", ""]
    text += [f"Time of the steps: {steps / 60:.1f} min in all (pre-training, evaluation, grounding, segmentation); "
             f"{len(sessions)} invocation(s) of the study command, the last {sessions[-1] / 60:.1f} min." if sessions
             else f"Time of the steps so far: {steps / 60:.1f} min (the study has not finished).", ""]
    text += tokenizer_note
    text += ["## Grounding, locality and retrieval", "", tables["overall"], "",
             "## Grounding CNR per category", "", tables["cnr_by_category"], "",
             "## Segmentation test Dice by label fraction", "", tables["dice"], "",
             "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs]  # fmt: skip
    (out_dir / "results.md").write_text("\n".join(text) + "\n")
    (out_dir / "records.json").write_text(json.dumps(list(records), indent=1))
    return out_dir / "results.md"
