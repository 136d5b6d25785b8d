"""``python -m study run|report``: the reproduction study (see README, "Reproduction study")."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from study.runner import OBJECTIVES, StudyConfig, StudyRunner, load_records
from study.sweep import VARIANTS, run_sweep, sweep_records, write_sweep_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the study (resumes from <work-dir>/records.jsonl), then write the report")
    report = sub.add_parser("report", help="write the report from <work-dir>/records.jsonl")
    sweep = sub.add_parser("sweep", help="ELVIS with one setting changed at a time, on the validation split")
    for p in (run, report, sweep):
        p.add_argument("--work-dir", default="runs/sweep" if p is sweep else "runs/study")
        p.add_argument("--out", default="docs/results", help="tables and plots go here")
    for p in (run, sweep):
        p.add_argument("--dataset-dir", default="data/phantom")
        p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
        p.add_argument("--phantom-num", type=int, default=2000)
        p.add_argument("--image-size", type=int, default=None)
        p.add_argument("--num-workers", type=int, default=0)
        p.add_argument("--tokenizer-dir", default=None,
                       help="a tokenizer folder to share (e.g. docs/results/tokenizer to repeat those results); "
                            "default: one trained into the work dir")  # fmt: skip
    report.add_argument("--sweep", action="store_true", help="the sweep's report, from <work-dir>/*/records.jsonl")
    sweep.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    sweep.add_argument("--lengths", nargs="+", type=int, default=[3], help="pre-training epochs")
    sweep.add_argument("--split", default="validation", help="tune on validation; test only to confirm a pick")
    run.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    run.add_argument("--scale", default="tiny", help="configs/scale overlay of pre-training (tiny or paper)")
    run.add_argument("--pretrain-epochs", type=int, default=StudyConfig.pretrain_epochs)
    run.add_argument("--length-objectives", nargs="*", default=list(StudyConfig.length_objectives), choices=OBJECTIVES,
                     help="objectives also pre-trained for each of --length-epochs (the training-length axis)")
    run.add_argument("--length-epochs", nargs="*", type=int, default=list(StudyConfig.length_epochs))
    run.add_argument("--hard-dataset-dir", default=StudyConfig.hard_dataset_dir)
    run.add_argument("--hard-objectives", nargs="*", default=list(StudyConfig.hard_objectives), choices=OBJECTIVES,
                     help="objectives also pre-trained and measured on the realistic (harder) phantom")
    run.add_argument("--seg-objectives", nargs="*", default=None, choices=OBJECTIVES,
                     help="objectives whose encoders are fine-tuned for segmentation (default: all)")
    run.add_argument("--seg-iterations", type=int, default=StudyConfig.seg_iterations)
    run.add_argument("--seg-curve-epochs", type=int, default=StudyConfig.seg_curve_epochs,
                     help="epochs of the from-scratch segmentation curve (0: none)")
    run.add_argument("--seg-curve-epoch-length", type=int, default=StudyConfig.seg_curve_epoch_length)
    run.add_argument("--seg-batch-size", type=int, default=16)
    run.add_argument("--seg-fractions", nargs="+", type=float, default=[0.01, 0.1, 1.0])
    run.add_argument("--seg-modes", nargs="+", default=["frozen", "finetune"], choices=["frozen", "finetune"])
    run.add_argument("--segmentation-overlay", default=None, help="e.g. configs/segmentation/paper.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from study.report import write_report

    if args.command == "run":
        cfg = StudyConfig(work_dir=args.work_dir, dataset_dir=args.dataset_dir, objectives=args.objectives,
                          seeds=args.seeds, scale=args.scale, pretrain_epochs=args.pretrain_epochs,
                          length_objectives=args.length_objectives, length_epochs=args.length_epochs,
                          hard_dataset_dir=args.hard_dataset_dir, hard_objectives=args.hard_objectives,
                          seg_objectives=args.seg_objectives, seg_curve_epochs=args.seg_curve_epochs,
                          seg_curve_epoch_length=args.seg_curve_epoch_length, seg_iterations=args.seg_iterations, seg_batch_size=args.seg_batch_size,
                          seg_fractions=args.seg_fractions, seg_modes=args.seg_modes, segmentation_overlay=args.segmentation_overlay,
                          phantom_num=args.phantom_num, image_size=args.image_size, num_workers=args.num_workers,
                          tokenizer_dir=args.tokenizer_dir)  # fmt: skip
        start = time.time()
        records = StudyRunner(cfg).run()
        logging.getLogger("study").info("study finished in %.1f min", (time.time() - start) / 60)
    elif args.command == "sweep":
        start = time.time()
        records = run_sweep(args.work_dir, args.variants, args.lengths, args.seeds, args.split,
                            dataset_dir=args.dataset_dir, phantom_num=args.phantom_num, image_size=args.image_size,
                            num_workers=args.num_workers, tokenizer_dir=args.tokenizer_dir)  # fmt: skip
        logging.getLogger("study").info("sweep finished in %.1f min", (time.time() - start) / 60)
        print(f"wrote {write_sweep_report(records, args.out)}")
        return 0
    elif args.sweep:
        records = sweep_records(args.work_dir)
        if not records:
            parser.error(f"no finished variant in {args.work_dir}: run the sweep first.")
        print(f"wrote {write_sweep_report(records, args.out)}")
        return 0
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
