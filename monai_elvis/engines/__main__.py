"""``python -m monai_elvis.engines learning-curve HISTORY [--out FILE]``: the per-epoch table of a pre-training run's
figures (its ``eval/metrics_history.jsonl``) with their chance levels and goals, as Markdown.
``python -m monai_elvis.engines summary METRICS_JSON``: the last evaluation's figures beside chance and goals.
``python -m monai_elvis.engines grounding-figure --ckpt-dir DIR --images A.png B.png --phrases P Q --out F.png``:
maps of each phrase on each image with the grounding bundle, side by side."""

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
    p = sub.add_parser("grounding-figure", help="grounding maps of several phrases on the same images, side by side")
    p.add_argument("--ckpt-dir", required=True, help="the pre-training run's models folder (model.pt, tokenizer/)")
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--phrases", nargs="+", required=True)
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[2] / "bundles/elvis_grounding/configs/inference.json"))
    args = parser.parse_args(argv)
    if args.command == "grounding-figure":
        from monai_elvis.engines.figures import draw_grounding_figure, grounding_maps

        try:
            images, maps = grounding_maps([args.config], args.images, args.phrases, ckpt_dir=args.ckpt_dir)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        out = draw_grounding_figure(images, maps, args.phrases, args.out, [Path(i).stem for i in args.images])
        print(f"wrote {out}")
        return 0
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
