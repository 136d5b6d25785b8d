"""The benchmark commands run and print the documented records (timings themselves are not asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from monai_elvis.benchmarks.__main__ import main
from monai_elvis.benchmarks.losses import LOSS_NAMES, gloria_local_loop
from monai_elvis.losses import GloriaLocalLoss

KEYS = {"loss", "batch", "regions", "dim", "units", "fwd_ms", "fwd_bwd_ms"}


def test_losses_benchmark_json_records(capsys):
    main(["losses", "--json", "--batch", "2", "--grid", "2", "--dim", "8", "--repeats", "1"])
    records = json.loads(capsys.readouterr().out)
    assert [r["loss"] for r in records] == list(LOSS_NAMES)
    for r in records:
        assert set(r) == KEYS
        assert r["batch"] == 2 and r["regions"] == "2x2" and r["dim"] == 8
        assert r["units"] == (97 if r["loss"].startswith("gloria") else 12)
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0


def test_losses_benchmark_table(capsys):
    main(["losses", "--loss", "elvis_local", "--batch", "2", "--grid", "2", "--dim", "8", "--repeats", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["loss", "batch", "regions", "dim", "units", "fwd_ms", "fwd_bwd_ms"]
    assert out[1].split()[:5] == ["elvis_local", "2", "2x2", "8", "12"]


def test_gloria_loop_baseline_equals_vectorised_loss():
    torch.manual_seed(0)
    words, regions = torch.randn(3, 6, 8, dtype=torch.float64), torch.randn(3, 4, 8, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 3:] = False
    loss = GloriaLocalLoss()
    assert gloria_local_loop(words, regions, mask, loss).item() == pytest.approx(
        loss(words, regions, mask).item(), abs=1e-5
    )


def test_transforms_benchmark_records(capsys):
    main(["transforms", "--json", "--pairs", "2", "--size", "64"])
    records = json.loads(capsys.readouterr().out)
    assert [r["format"] for r in records] == ["dicom", "png16", "jpeg8"]
    for r in records:
        assert set(r) == {"format", "pairs", "size", "pairs_per_s", "ms_per_pair"}
        assert r["pairs"] == 2 and r["size"] == 64 and r["pairs_per_s"] > 0
        assert r["ms_per_pair"] == pytest.approx(1000 / r["pairs_per_s"], rel=0.02)


def test_train_step_benchmark_records(capsys):
    main(["train-step", "--json", "--scale", "tiny", "--steps", "1", "--batch", "4"])
    (rec,) = json.loads(capsys.readouterr().out)
    assert rec["scale"] == "tiny" and rec["batch"] == 4 and rec["image_size"] == 128
    parts = [rec[k] for k in ("data_ms", "forward_ms", "loss_ms", "backward_ms")]
    assert all(p > 0 for p in parts)
    assert rec["step_ms"] == pytest.approx(sum(parts), abs=0.5)
    assert rec["loss_share"] == pytest.approx(rec["loss_ms"] / rec["step_ms"], abs=1e-3)
