"""``python -m study run|report``: the reproduction study (see README, "Reproduction study")."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from study.runner import OBJECTIVES, StudyConfig, StudyRunner, load_records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the study (resumes from <work-dir>/records.jsonl), then write the report")
    report = sub.add_parser("report", help="write the report from <work-dir>/records.jsonl")
    for p in (run, report):
        p.add_argument("--work-dir", default="runs/study")
        p.add_argument("--out", default="docs/results", help="tables and plots go here")
    run.add_argument("--dataset-dir", default="data/phantom")
    run.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    run.add_argument("--scale", default="tiny", help="configs/scale overlay of pre-training (tiny or paper)")
    run.add_argument("--pretrain-epochs", type=int, default=4)
    run.add_argument("--seg-iterations", type=int, default=30)
    run.add_argument("--seg-batch-size", type=int, default=16)
    run.add_argument("--seg-fractions", nargs="+", type=float, default=[0.01, 0.1, 1.0])
    run.add_argument("--segmentation-overlay", default=None, help="e.g. configs/segmentation/paper.json")
    run.add_argument("--phantom-num", type=int, default=2000)
    run.add_argument("--image-size", type=int, default=None)
    run.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from study.report import write_report

    if args.command == "run":
        cfg = StudyConfig(work_dir=args.work_dir, dataset_dir=args.dataset_dir, objectives=args.objectives,
                          seeds=args.seeds, scale=args.scale, pretrain_epochs=args.pretrain_epochs,
                          seg_iterations=args.seg_iterations, seg_batch_size=args.seg_batch_size,
                          seg_fractions=args.seg_fractions, segmentation_overlay=args.segmentation_overlay,
                          phantom_num=args.phantom_num, image_size=args.image_size, num_workers=args.num_workers)  # fmt: skip
        start = time.time()
        records = StudyRunner(cfg).run()
        logging.getLogger("study").info("study finished in %.1f min", (time.time() - start) / 60)
    else:
        records_file = Path(args.work_dir) / "records.jsonl"
        if not records_file.is_file():
            parser.error(f"no records in {records_file}: run the study first.")
        records = load_records(records_file)
    path = write_report(records, args.out, args.work_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
