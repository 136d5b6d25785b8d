"""Fill a bundle's ``metadata.json`` ``eval_metrics`` from the figures its evaluation wrote.

model-zoo's metadata carries the bundle's evaluation figures (``eval_metrics``). They are copied, never typed: each
bundle's ``evaluate.json`` writes its figures to a JSON file (:class:`~monai_elvis.engines.MetricsJSONHandler`:
``{"epoch": ..., "metrics": {...}}``), and this command puts the names the metadata declares into it::

    python -m monai_elvis.eval_metrics bundles/elvis_pretrain/configs/metadata.json \\
        bundles/elvis_pretrain/eval/test_metrics.json

A declared name that none of the files holds is an error that names it and the names they do hold.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_elvis.errors import InputError, MissingInputError

__all__ = ["read_metrics", "update_eval_metrics"]


def read_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """The figures of a metrics file: the ``metrics`` of a :class:`MetricsJSONHandler` file, or a flat mapping."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"metrics file not found: {path} (run the bundle's evaluate.json first).")
    try:
        content = json.loads(path.read_text())
    except ValueError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from e
    metrics = content.get("metrics", content) if isinstance(content, Mapping) else None
    if not isinstance(metrics, Mapping):
        raise InputError(f"{path} holds no mapping of metric names to values.")
    return dict(metrics)


def update_eval_metrics(metadata_file: str | os.PathLike, metrics_files: Sequence[str | os.PathLike],
                        names: Sequence[str] | None = None, digits: int = 4) -> dict[str, float]:  # fmt: skip
    """Set ``eval_metrics`` of ``metadata_file`` to the values of ``names`` (default: the names it declares) read from
    ``metrics_files`` (a later file's value wins), rounded to ``digits``; write the file as model-zoo formats it
    (4-space indent, keys in their order, a final newline). Returns the new ``eval_metrics``."""
    metadata_file = Path(metadata_file)
    metadata = json.loads(metadata_file.read_text())
    names = list(names) if names else list(metadata.get("eval_metrics") or {})
    if not names:
        raise InputError(f"{metadata_file} declares no eval_metrics: give the names to copy (--names).")
    found: dict[str, Any] = {}
    for f in metrics_files:
        found.update(read_metrics(f))
    missing = [n for n in names if not isinstance(found.get(n), (int, float)) or isinstance(found.get(n), bool)]
    if missing:
        scalars = sorted(k for k, v in found.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise InputError(f"{', '.join(missing)} not among the figures of {', '.join(map(str, metrics_files))}; "
                         f"they hold {', '.join(scalars) or 'no single figures'}.")  # fmt: skip
    metadata["eval_metrics"] = {n: round(float(found[n]), digits) for n in names}
    tmp = metadata_file.with_name(metadata_file.name + ".tmp")
    tmp.write_text(json.dumps(metadata, indent=4, ensure_ascii=False) + "\n")
    os.replace(tmp, metadata_file)
    return metadata["eval_metrics"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m monai_elvis.eval_metrics", description=__doc__.split("\n\n")[0])
    parser.add_argument("metadata", help="the bundle's configs/metadata.json")
    parser.add_argument("metrics", nargs="+", help="metrics JSON files written by the bundle's evaluate.json")
    parser.add_argument("--names", nargs="+", default=None, help="figures to copy (default: those declared)")
    args = parser.parse_args(argv)
    values = update_eval_metrics(args.metadata, args.metrics, args.names)
    for name, value in values.items():
        print(f"{name:32s} {value}")


if __name__ == "__main__":
    main()
