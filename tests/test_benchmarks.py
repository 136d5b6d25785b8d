"""The benchmark commands run and print the documented records (timings themselves are not asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from monai_elvis.benchmarks.__main__ import main
from monai_elvis.benchmarks.losses import LOSS_DESCRIPTIONS, LOSS_NAMES, _inputs, lovt_objective
from monai_elvis.benchmarks.references import gloria_code_reference, gloria_paper_reference, lovt_reference
from monai_elvis.keys import OutKeys
from monai_elvis.losses import GloriaLocalLoss

KEYS = {"loss", "batch", "regions", "dim", "units", "fwd_ms", "fwd_bwd_ms", "reference_fwd_bwd_ms", "speedup",
        "floor_fwd_bwd_ms"}  # fmt: skip


def test_losses_benchmark_json_records(capsys):
    main(["losses", "--json", "--batch", "2", "--grid", "2", "--dim", "8", "--repeats", "1"])
    records = json.loads(capsys.readouterr().out)
    assert [r["loss"] for r in records] == list(LOSS_NAMES)
    for r in records:
        assert set(r) == KEYS
        assert r["batch"] == 2 and r["regions"] == "2x2" and r["dim"] == 8
        assert r["units"] == (97 if r["loss"].startswith("gloria") else 12)
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        has_reference = r["loss"] in ("gloria_code", "gloria_paper", "lovt")
        assert (r["reference_fwd_bwd_ms"] is not None) == has_reference
        if has_reference:
            assert r["speedup"] == pytest.approx(r["reference_fwd_bwd_ms"] / r["fwd_bwd_ms"], rel=0.02, abs=0.01)
        assert (r["floor_fwd_bwd_ms"] is not None) == (r["loss"].startswith("gloria") or r["loss"] == "lovt")


def test_losses_benchmark_table_says_what_each_row_is(capsys):
    main(["losses", "--loss", "gloria_code", "--loss", "elvis_local", "--batch", "2", "--grid", "2", "--dim", "8",
          "--repeats", "1"])  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["loss", "batch", "regions", "dim", "units", "fwd_ms", "fwd_bwd_ms",
                              "reference_fwd_bwd_ms", "speedup", "floor_fwd_bwd_ms"]  # fmt: skip
    assert out[1].split()[:5] == ["gloria_code", "2", "2x2", "8", "97"]
    assert out[2].split()[:5] == ["elvis_local", "2", "2x2", "8", "12"] and out[2].split()[-3:] == ["-", "-", "-"]
    assert f"gloria_code: {LOSS_DESCRIPTIONS['gloria_code']}" in out
    assert f"elvis_local: {LOSS_DESCRIPTIONS['elvis_local']}" in out
    assert not any("published code" in line and "loop" in line for line in out)


@pytest.mark.parametrize("form,reference", [("code", gloria_code_reference), ("paper", gloria_paper_reference)])
def test_gloria_references_agree_with_the_losses(form, reference):
    x = {k: (v.detach().double().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
         for k, v in _inputs(3, 2, 8, 4, 6, seed=1).items()}  # fmt: skip
    args = (x[OutKeys.TEXT_TOKEN], x[OutKeys.IMAGE_LOCAL], x[OutKeys.TOKEN_MASK])
    ours, ref = GloriaLocalLoss(form=form)(*args), reference(*args)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-9)
    for a, b in zip(torch.autograd.grad(ours, args[:2]), torch.autograd.grad(ref, args[:2])):
        assert torch.allclose(a, b, atol=1e-9)


def test_lovt_reference_agrees_with_the_objective():
    x = {k: (v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
         for k, v in _inputs(3, 3, 8, 4, 6, seed=2).items()}  # fmt: skip
    ours = lovt_objective()(x)["loss"]
    ref = lovt_reference(
        x[OutKeys.IMAGE_LOCAL], x[OutKeys.IMAGE_LOCAL_ATTENDED], x[OutKeys.TEXT_SENTENCE],
        x[OutKeys.TEXT_SENTENCE_ATTENDED], x[OutKeys.SENTENCE_MASK], x[OutKeys.IMAGE_GLOBAL], x[OutKeys.TEXT_GLOBAL],
        x[OutKeys.IMAGE_GRID], x[OutKeys.IMAGE_LOCAL_WEIGHTS], x[OutKeys.TEXT_SENTENCE_WEIGHTS],
    )  # fmt: skip
    assert ours.item() == pytest.approx(ref.item(), abs=1e-9)
    leaves = [v for v in x.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    used = 0
    for a, b in zip(torch.autograd.grad(ours, leaves, allow_unused=True), torch.autograd.grad(ref, leaves, allow_unused=True)):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-9)
            used += 1
    assert used == 6  # local, attended and global features of both modalities


def test_transforms_benchmark_records(capsys):
    main(["transforms", "--json", "--pairs", "2", "--size", "64", "--prepared-size", "128"])
    records = json.loads(capsys.readouterr().out)
    assert [r["format"] for r in records] == ["dicom", "png16", "jpeg8", "prepared_png8", "prepared_png16",
                                              "prepared_png8_disk_cache"]  # fmt: skip
    stages = ["decode_ms", "spatial_ms", "augmentation_ms", "tokenisation_ms"]
    for r in records:
        assert set(r) == {"format", "source", "pairs", "size", "pairs_per_s", "ms_per_pair", *stages}
        assert r["pairs"] == 2 and r["size"] == 64 and r["pairs_per_s"] > 0
        assert r["ms_per_pair"] == pytest.approx(1000 / r["pairs_per_s"], rel=0.02)
        assert r["ms_per_pair"] == pytest.approx(sum(r[s] for s in stages), abs=0.05)
        assert r["source"] == ("full size 1955x1841" if not r["format"].startswith("prepared") else
                               "prepared 128x121" + (", disk cache" if r["format"].endswith("cache") else ""))  # fmt: skip
    assert records[-1]["spatial_ms"] == 0 and records[3]["spatial_ms"] > 0


def test_train_step_benchmark_records(capsys):
    main(["train-step", "--json", "--scale", "tiny", "--steps", "1", "--batch", "4"])
    (rec,) = json.loads(capsys.readouterr().out)
    assert rec["scale"] == "tiny" and rec["batch"] == 4 and rec["image_size"] == 128
    parts = [rec[k] for k in ("data_ms", "forward_ms", "loss_ms", "backward_ms")]
    assert all(p > 0 for p in parts)
    assert rec["step_ms"] == pytest.approx(sum(parts), abs=0.5)
    assert rec["loss_share"] == pytest.approx(rec["loss_ms"] / rec["step_ms"], rel=0.05, abs=1e-3)  # of rounded times
    assert rec["world_size"] == 1 and rec["gather_ms"] == 0 and rec["gather_share"] == 0


def test_train_step_benchmark_times_the_all_gather_of_two_processes(capsys):
    main(["train-step", "--json", "--world-size", "2", "--steps", "1", "--batch", "4"])
    (rec,) = json.loads(capsys.readouterr().out)
    assert rec["scale"] == "tiny" and rec["world_size"] == 2 and rec["batch"] == 4
    assert 0 < rec["gather_ms"] < rec["loss_ms"] + rec["backward_ms"]
    assert rec["gather_share"] == pytest.approx(rec["gather_ms"] / rec["step_ms"], abs=1e-3)
