"""Format the bundles' JSON files as model-zoo's pre-commit does (``pretty-format-json --autofix --no-sort-keys
--indent=4`` and ``end-of-file-fixer``): ``python .ci/format_json.py`` rewrites them, ``--check`` lists the ones
that differ and exits 1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def formatted(text: str) -> str:
    """``text`` as pretty-format-json writes it: 4-space indent, keys in their order, ASCII escapes, one newline."""
    return json.dumps(json.loads(text), indent=4, ensure_ascii=True) + "\n"


def bundle_json_files(root: Path = ROOT) -> list[Path]:
    return sorted((root / "bundles").glob("*/configs/*.json"))


def main(argv: list[str]) -> int:
    differ = [p for p in bundle_json_files() if p.read_text() != formatted(p.read_text())]
    if "--check" in argv:
        for p in differ:
            print(p.relative_to(ROOT))
        return 1 if differ else 0
    for p in differ:
        p.write_text(formatted(p.read_text()))
        print(f"formatted {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
