"""Every bundle's metadata.json against MONAI's bundle metadata schema, offline (as model-zoo's CI checks it).

The schema is read from the shared folder beside the repository (``../shared/schemas``), or from
``$MONAI_ELVIS_META_SCHEMA``; it is checked against its published sha256 and never downloaded or copied here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_SHA256 = "cd64aa8a5904426f6fc6855dabe46af8c742d5bad644b4e9cfb78ebad09ad678"
SCHEMA = Path(os.environ.get("MONAI_ELVIS_META_SCHEMA", ROOT.parent / "shared" / "schemas" / "meta_schema_20240725.json"))
BUNDLES = sorted(p.parent.parent for p in (ROOT / "bundles").glob("*/configs/metadata.json"))


@pytest.fixture(scope="module")
def schema(tmp_path_factory) -> Path:
    pytest.importorskip("jsonschema")
    if not SCHEMA.is_file():
        pytest.skip(f"MONAI's metadata schema is not at {SCHEMA} (set MONAI_ELVIS_META_SCHEMA)")
    copy = tmp_path_factory.mktemp("schema") / SCHEMA.name  # verify_metadata may write where it reads
    shutil.copyfile(SCHEMA, copy)
    return copy


@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.name for b in BUNDLES])
def test_metadata_follows_monai_schema(bundle, schema):
    from monai.bundle import verify_metadata

    meta = bundle / "configs" / "metadata.json"
    assert json.loads(meta.read_text())["schema"].endswith(SCHEMA.name)  # the schema it names is the one checked
    verify_metadata(meta_file=str(meta), filepath=str(schema), hash_val=SCHEMA_SHA256, hash_type="sha256")


def test_a_metadata_file_breaking_the_schema_is_caught(schema, tmp_path):
    from monai.bundle import verify_metadata

    meta = json.loads((BUNDLES[0] / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]  # required by the schema
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(Exception, match="network_data_format"):
        verify_metadata(meta_file=str(bad), filepath=str(schema), hash_val=SCHEMA_SHA256, hash_type="sha256")
