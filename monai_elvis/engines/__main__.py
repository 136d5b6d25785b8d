"""``python -m monai_elvis.engines learning-curve HISTORY [--out FILE]``: the per-epoch table of a pre-training run's
figures (its ``eval/metrics_history.jsonl``) with their chance levels and goals, as Markdown.
``python -m monai_elvis.engines summary METRICS_JSON``: the last evaluation's figures beside chance and goals."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from monai_elvis.engines.evaluation import LEARNING_FIGURES, learning_curve_table, summarize_metrics

SHORT = {
    "val_zero_shot_auc": "zero-shot AUC", "val_grounding_pointing": "pointing", "val_grounding_cnr": "CNR",
    "val_grounding_side": "side", "val_map_correlation": "map corr.", "val_precision_at_10": "P@10 (class)",
    "val_recall_at_10": "R@10", "val_locality": "locality", "val_grounding_miou": "mIoU",
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monai_elvis.engines", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("learning-curve", help="Markdown table of the figures after each epoch")
    p.add_argument("history", help="eval/metrics_history.jsonl of a pre-training run")
    p.add_argument("--out", help="write the table here instead of printing it")
    p = sub.add_parser("summary", help="the last evaluation's figures beside chance and goals")
    p.add_argument("metrics", help="eval/metrics.json (or a test_metrics.json)")
    args = parser.parse_args(argv)
    if args.command == "summary":
        print(summarize_metrics(args.metrics, log=False))
        return 0
    goals = {k: g for k, (_, g) in LEARNING_FIGURES.items() if g}
    table = learning_curve_table(args.history, SHORT, goals)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
