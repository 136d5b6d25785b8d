"""``python -m study run|report|sweep|linear-probe``: the reproduction study (see README, "Reproduction study") and
the classification linear probe."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from study.runner import OBJECTIVES, TINY_SEG_SCHEDULE, StudyConfig, StudyRunner, default_processes, load_records
from study.sweep import VARIANTS, run_sweep, sweep_records, write_sweep_report


def _linear_probe(args: argparse.Namespace) -> int:
    import os

    from study.linear_probe import ProbeConfig, markdown, per_class_table, probe_table, run_linear_probe, text_table

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    cfg = ProbeConfig(pretrained_ckpt=args.pretrained_ckpt, work_dir=args.work_dir, dataset_dir=args.dataset_dir,
                      fractions=args.fractions, seeds=args.seeds, encoders=args.encoders, epochs=args.epochs,
                      iterations=args.iterations, batch_size=args.batch_size, learning_rate=args.learning_rate,
                      image_size=args.image_size)  # fmt: skip
    start, load = time.time(), os.getloadavg()[0]
    records = run_linear_probe(cfg, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    minutes, load_after = (time.time() - start) / 60, os.getloadavg()[0]
    rows = probe_table(records, args.fractions, args.encoders)
    print(text_table(rows))
    seconds = sum(r["seconds"] for r in records)
    seeds = ", ".join(map(str, args.seeds))
    summary = (f"Test AUROC, mean over the finding kinds, mean ± sample std over seeds {seeds}; linear probe "
               f"(frozen encoder), {cfg.epochs} epochs of {cfg.iterations} steps of batch {cfg.batch_size} "
               f"at every fraction, learning rate {cfg.learning_rate:g}, {cfg.image_size} px, model of the best "
               f"validation AUROC tested. {len(records)} runs, {seconds / 60:.1f} min of runs; this command "
               f"{minutes:.1f} min, 1-min load average {load:.1f} at the start and {load_after:.1f} at the "
               "end.")  # fmt: skip
    print(summary)
    if args.out:
        per_class = per_class_table(records, max(args.fractions), args.encoders)
        text = (markdown(rows) + f"\n\n{summary}\n\nPer class at {max(args.fractions) * 100:g}% of the labels "
                "(mean over the seeds):\n\n" + markdown(per_class) + "\n")  # fmt: skip
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the study (resumes from <work-dir>/records.jsonl), then write the report")
    report = sub.add_parser("report", help="write the report from <work-dir>/records.jsonl")
    sweep = sub.add_parser("sweep", help="ELVIS with one setting changed at a time, on the validation split")
    probe = sub.add_parser("linear-probe", help="classification linear probe at 1/10/100%% of the labels: a "
                           "pre-trained encoder against random initialisation, test AUROC mean ± std over seeds")
    for p in (run, report, sweep):
        p.add_argument("--work-dir", default="runs/sweep" if p is sweep else "runs/study")
        p.add_argument("--out", default="docs/results", help="tables and plots go here")
    for p in (run, sweep):
        p.add_argument("--dataset-dir", default="data/phantom")
        p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2] if p is sweep else list(StudyConfig.seeds),
                       help="seeds; more seeds after those of a work dir extend it")  # fmt: skip
        p.add_argument("--phantom-num", type=int, default=2000)
        p.add_argument("--image-size", type=int, default=None)
        p.add_argument("--num-workers", type=int, default=0)
        p.add_argument("--processes", type=int, default=None,
                       help="steps run at once, each in its own process on one thread (default: one per CPU core, "
                            "1 with a GPU); the figures do not depend on it")  # fmt: skip
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
    run.add_argument("--seg-objectives", nargs="*", default=list(StudyConfig.seg_objectives), choices=OBJECTIVES,
                     help="objectives whose encoders segment (default: %(default)s, the paper's comparison and its "
                          "floor, for the time budget; each further objective adds about 15 minutes on 2 cores)")
    run.add_argument("--seg-seeds", type=int, default=StudyConfig.seg_seeds,
                     help="how many of --seeds (the first ones) segment; 0: all")
    run.add_argument("--seg-iterations", type=int, default=StudyConfig.seg_iterations,
                     help="training steps of each segmentation run (the curve in the report says whether enough)")
    run.add_argument("--seg-curve-epochs", type=int, default=StudyConfig.seg_curve_epochs,
                     help="epochs of the from-scratch segmentation curve (0: none)")
    run.add_argument("--seg-curve-epoch-length", type=int, default=StudyConfig.seg_curve_epoch_length)
    run.add_argument("--seg-batch-size", type=int, default=None,
                     help="default: the --segmentation-overlay's batch_size, else %d" % TINY_SEG_SCHEDULE["batch_size"])
    run.add_argument("--seg-learning-rate", type=float, default=None,
                     help="constant; default: the --segmentation-overlay's learning_rate, else %g"
                          % TINY_SEG_SCHEDULE["learning_rate"])  # fmt: skip
    run.add_argument("--seg-fractions", nargs="+", type=float, default=[0.01, 0.1, 1.0])
    run.add_argument("--seg-modes", nargs="+", default=["frozen", "finetune"], choices=["frozen", "finetune"])
    run.add_argument("--segmentation-overlay", default=None, help="e.g. configs/segmentation/paper.json")
    probe.add_argument("--pretrained-ckpt", default="bundles/elvis_pretrain/models/model.pt",
                       help="the pre-training bundle's model.pt")
    probe.add_argument("--work-dir", default="runs/linear_probe")
    probe.add_argument("--out", default=None, help="also write the tables as Markdown to this file")
    probe.add_argument("--dataset-dir", default="data/phantom")
    probe.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.1, 1.0])
    probe.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    probe.add_argument("--encoders", nargs="+", default=["pretrained", "random"], choices=["pretrained", "random"])
    probe.add_argument("--epochs", type=int, default=4, help="validations; the best one's model is tested")
    probe.add_argument("--iterations", type=int, default=25, help="training steps per epoch, at every fraction")
    probe.add_argument("--batch-size", type=int, default=32)
    probe.add_argument("--learning-rate", type=float, default=0.01)
    probe.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args(argv)
    if args.command == "linear-probe":
        return _linear_probe(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from study.report import write_report

    processes = getattr(args, "processes", None)
    if processes is not None and processes < 1:
        parser.error(f"--processes must be at least 1, got {processes}.")
    processes = default_processes() if processes is None else processes
    if args.command == "run":
        cfg = StudyConfig(work_dir=args.work_dir, dataset_dir=args.dataset_dir, objectives=args.objectives,
                          seeds=args.seeds, scale=args.scale, pretrain_epochs=args.pretrain_epochs,
                          length_objectives=args.length_objectives, length_epochs=args.length_epochs,
                          hard_dataset_dir=args.hard_dataset_dir, hard_objectives=args.hard_objectives,
                          seg_objectives=args.seg_objectives, seg_curve_epochs=args.seg_curve_epochs,
                          seg_curve_epoch_length=args.seg_curve_epoch_length, seg_iterations=args.seg_iterations, seg_batch_size=args.seg_batch_size,
                          seg_seeds=args.seg_seeds or None, seg_learning_rate=args.seg_learning_rate,
                          seg_fractions=args.seg_fractions, seg_modes=args.seg_modes, segmentation_overlay=args.segmentation_overlay,
                          phantom_num=args.phantom_num, image_size=args.image_size, num_workers=args.num_workers,
                          tokenizer_dir=args.tokenizer_dir)  # fmt: skip
        start = time.time()
        records = StudyRunner(cfg).run(processes)
        logging.getLogger("study").info("study finished in %.1f min", (time.time() - start) / 60)
    elif args.command == "sweep":
        start = time.time()
        records = run_sweep(args.work_dir, args.variants, args.lengths, args.seeds, args.split,
                            dataset_dir=args.dataset_dir, phantom_num=args.phantom_num, image_size=args.image_size,
                            num_workers=args.num_workers, tokenizer_dir=args.tokenizer_dir,
                            processes=processes)  # fmt: skip
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
