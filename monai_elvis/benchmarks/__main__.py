"""Command line of the benchmarks:
``python -m monai_elvis.benchmarks {losses,transforms,train-step,phantom-probe} [--json]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cell(value) -> str:
    return "-" if value is None else str(value)


def _table(records: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_cell(r[c])) for r in records)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(_cell(r[c]).ljust(widths[c]) for c in columns) for r in records]
    return "\n".join(lines)


LOSS_COLUMNS = ["loss", "batch", "regions", "dim", "units", "fwd_ms", "fwd_bwd_ms", "reference_fwd_bwd_ms", "speedup",
                "floor_fwd_bwd_ms"]  # fmt: skip


def _losses(args: argparse.Namespace) -> None:
    from monai_elvis.benchmarks.losses import LOSS_DESCRIPTIONS, LOSS_NAMES, run_loss_benchmark

    def progress(rec: dict) -> None:
        if not args.json:
            ref = "" if rec["speedup"] is None else f"  reference {rec['reference_fwd_bwd_ms']:9.2f} ms ({rec['speedup']}x)"
            floor = "" if rec["floor_fwd_bwd_ms"] is None else f"  floor {rec['floor_fwd_bwd_ms']:9.2f} ms"
            print(f"  {rec['loss']:<14} B={rec['batch']:<3} {rec['regions']:<6} d={rec['dim']:<4} "
                  f"fwd {rec['fwd_ms']:9.2f} ms  fwd+bwd {rec['fwd_bwd_ms']:9.2f} ms{ref}{floor}", file=sys.stderr,
                  flush=True)  # fmt: skip

    losses = tuple(args.loss or LOSS_NAMES)
    records = run_loss_benchmark(
        losses=losses,
        batches=tuple(args.batch),
        grids=tuple(args.grid),
        dims=tuple(args.dim),
        repeats=args.repeats,
        threads=args.threads,
        progress=progress,
        clock=args.clock,
    )
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print(_table(records, LOSS_COLUMNS))
        print(f"\nms ({args.clock} clock): best of {args.repeats} on {args.threads} thread(s); "
              "speedup = reference / fwd_bwd.")
        for name in dict.fromkeys(losses):
            print(f"{name}: {LOSS_DESCRIPTIONS[name]}")


def _transforms(args: argparse.Namespace) -> None:
    from monai_elvis.benchmarks.transforms import run_transform_benchmark

    records = run_transform_benchmark(
        n=args.pairs, size=args.size, tokenizer=args.tokenizer, prepared_size=args.prepared_size, clock=args.clock,
        progress=None if args.json else (lambda msg: print(f"  {msg}", file=sys.stderr, flush=True)),
    )  # fmt: skip
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print(_table(records, ["format", "source", "pairs", "size", "pairs_per_s", "ms_per_pair", "decode_ms",
                               "spatial_ms", "augmentation_ms", "tokenisation_ms"]))  # fmt: skip
        print(f"\n{args.clock} clock. One process, one thread: the rate of one DataLoader worker. ms per pair by "
              "stage: decode (LoadCXR; for the disk cache, reading the cached decode + spatial output), spatial "
              "(resize, z-score, pad), augmentation (affine, blur, contrast), tokenisation (sentence split, shuffle, "
              "drop, tokenizer).")  # fmt: skip


def _train_step(args: argparse.Namespace) -> None:
    from monai_elvis.benchmarks.train_step import run_train_step_benchmark

    scales = args.scale or (["tiny", "paper"] if args.world_size <= 1 else ["tiny"])
    records = run_train_step_benchmark(
        scales=tuple(scales), steps=args.steps, batch=args.batch, world_size=args.world_size,
        progress=None if args.json else (lambda msg: print(f"  {msg}", file=sys.stderr, flush=True)),
    )  # fmt: skip
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        cols = ["scale", "world_size", "batch", "image_size", "data_ms", "forward_ms", "loss_ms", "backward_ms",
                "step_ms", "loss_share", "gather_ms", "gather_share"]  # fmt: skip
        print(_table(records, cols))
        if args.world_size > 1:
            print(f"\nrank 0 of {args.world_size} CPU processes (gloo, one thread each, DDP), batch per process; "
                  "gather_ms: inside the all-gathers of the global features (forward and backward), part of loss_ms "
                  "and backward_ms.")  # fmt: skip


def _phantom_probe(args: argparse.Namespace) -> None:
    from monai_elvis.benchmarks.phantom_probe import run_phantom_probe
    from monai_elvis.data.phantom import prepare_phantom

    say = (lambda msg: None) if args.json else (lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
    data_dir = args.data_dir or ("data/phantom" if args.difficulty == "easy" else f"data/phantom_{args.difficulty}")
    say(f"phantom: {data_dir} ({args.difficulty}); written first if missing")
    prepare_phantom(data_dir, num=args.num, seed=args.seed, difficulty=args.difficulty)
    result = run_phantom_probe(data_dir, image_size=args.size, epochs=args.epochs, seed=args.seed,
                               encoder_kwargs={"output_stride": args.output_stride}, progress=say)  # fmt: skip
    if args.json:
        print(json.dumps(result["records"], indent=1))
        return
    rows = [{**r, "auc": f"{r['auc']:.3f}", "side_accuracy": "-" if r["side_accuracy"] is None else f"{r['side_accuracy']:.3f}"}
            for r in result["records"]]  # fmt: skip
    summary = (f"{args.difficulty} phantom ({data_dir}): {result['train']} training / {result['test']} test studies "
               f"at {result['image_size']} px, {result['steps']} steps; {result['seconds']:.0f} s in all "
               f"({result['train_seconds']:.0f} s training)")  # fmt: skip
    print(_table(rows, ["kind", "auc", "side_accuracy", "test_positives", "contrast"]))
    print(summary)
    if args.out:
        md = ["| kind | AUC | side accuracy | test positives | median lesion contrast |",
              "| --- | ---: | ---: | ---: | ---: |"]
        md += [f"| {r['kind']} | {r['auc']} | {r['side_accuracy']} | {r['test_positives']} | {r['contrast']} |"
               for r in rows]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(md) + f"\n\n{summary}.\n", encoding="utf-8")
        print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m monai_elvis.benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("losses", help="forward and forward+backward time of the objectives against reference "
                       "implementations of the published math, one thread")
    p.add_argument("--json", action="store_true", help="print a JSON list of records instead of a table")
    p.add_argument("--loss", action="append", help="only this loss (repeatable)")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 32])
    p.add_argument("--grid", type=int, nargs="+", default=[7, 19], help="region grid side (7 -> 7x7)")
    p.add_argument("--dim", type=int, nargs="+", default=[768])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed time; cpu: the thread's CPU time (steadier on a shared machine; one thread)")
    p.set_defaults(func=_losses)
    p = sub.add_parser("transforms", help="image-report pairs per second through the pre-training preprocessing")
    p.add_argument("--json", action="store_true")
    p.add_argument("--pairs", type=int, default=40, help="pairs timed per format")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--prepared-size", type=int, default=512, help="longest side of the prepared files (default 512)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed time; cpu: the process's CPU time (steadier on a shared machine)")
    p.add_argument("--tokenizer", help="tokenizer folder or name (default: one trained on the IU X-ray reports)")
    p.set_defaults(func=_transforms)
    p = sub.add_parser("train-step", help="per-step time breakdown of pre-training at the tiny and paper scales, "
                       "in one process or several (--world-size, with the all-gathers' share)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--scale", nargs="+", choices=["tiny", "paper"],
                   help="default: tiny and paper in one process, tiny with --world-size > 1")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, help="override the scale's batch size (per process)")
    p.add_argument("--world-size", type=int, default=1,
                   help="CPU processes of a data-parallel run (gloo); > 1 also times the all-gathers")
    p.set_defaults(func=_train_step)
    p = sub.add_parser("phantom-probe", help="per-kind test AUC and side accuracy of a supervised probe on the phantom")
    p.add_argument("--json", action="store_true", help="print one record per kind: kind, auc, side_accuracy")
    p.add_argument("--difficulty", default="easy", choices=["easy", "realistic"])
    p.add_argument("--data-dir", help="phantom folder (default data/phantom, or data/phantom_<difficulty>)")
    p.add_argument("--num", type=int, default=2000, help="studies, when the phantom is written")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="training resolution (the pre-training bundle's)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--output-stride", type=int, default=16, choices=[8, 16, 32])
    p.add_argument("--out", help="also write the table as Markdown to this file")
    p.set_defaults(func=_phantom_probe)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
