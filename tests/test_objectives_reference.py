"""Each objective pinned to an independent implementation of its published math, in float64, values and gradients.

The references below are written here from the equations (one image-report pair, one sample, one unit at a time,
with plain cosines and explicit softmaxes), not from the library's code paths:

- ConVIRT: ``lambda * l(image -> report) + (1 - lambda) * l(report -> image)``, ``lambda = 0.75``, ``tau = 0.1``.
- GLoRIA, released code (``local_loss`` and ``global_loss`` of ``gloria/loss/gloria_loss.py``): per pair, scores
  ``s_kr = <w_k, v_r>``, a softmax over the words for each region, then ``softmax_r(gamma1 * .)``, contexts
  ``c_k = sum_r a_kr v_r``, ``z_k = cos(c_k, w_k)``, ``R = log sum_k exp(gamma2 z_k)``, logits ``gamma3 R``, the two
  cross-entropies summed; global: the two cross-entropies of ``cos / 0.1`` summed.
- GLoRIA, paper: a single softmax over regions and ``R = log(sum_k exp(gamma2 z_k)) / gamma2``, directions 0.5 / 0.5.
- LoVT (``LocalIntraSampleContrastiveLoss`` and the loss weights of ``LoVT_100.yaml``): per sample and modality,
  ``C_ij = cos(l_i, a_j) / 0.3``, ``l2att_i = -sum_j T_ij log softmax_j C_ij``, ``att2l_i = -sum_j T_ij log
  softmax_j C_ji``, weighted by the unit weights normalised over the valid units, averaged over the batch; ``T`` the
  spatial prior (threshold 0.5, ``exp(-d)``) for regions and the identity for sentences; total
  ``0.375 (l2att + att2l) per modality + 0.75 global(image -> report) + 0.25 global(report -> image)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from monai_elvis.keys import OutKeys
from monai_elvis.losses import ElvisLoss, GlobalContrastiveLoss, GloriaLocalLoss, LocalAlignmentLoss

ROOT = Path(__file__).resolve().parents[1]
DT = torch.float64
TOL = 1e-5


def _objective(name: str) -> ElvisLoss:
    """The objective of an overlay of ``configs/objective`` (its other keys set the bundle, not the loss)."""
    import json

    from monai.bundle import ConfigParser

    import monai_elvis.bundle  # the overlays read the bundle's on/off setting gather_negatives with its parse_flag

    overlay = json.loads((ROOT / "configs" / "objective" / f"{name}.json").read_text())
    config = {"gather_negatives": True, "objective": overlay["objective"]}
    return ConfigParser(config, globals={"monai_elvis": monai_elvis}).get_parsed_content("objective")


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def _xent_rows(logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows ``i`` of ``-log softmax(logits[i])[i]``, written out."""
    rows = [torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(logits.shape[0])]
    return torch.stack(rows).mean()


def convirt_reference(image, text, tau=0.1, lam=0.75):
    b = image.shape[0]
    sim = torch.stack([torch.stack([_cos(image[i], text[j]) for j in range(b)]) for i in range(b)]) / tau
    return lam * _xent_rows(sim) + (1 - lam) * _xent_rows(sim.T)


def gloria_pair_reference(w, v, form, g1=4.0, g2=5.0):
    """``R`` of one report's words ``w [T, d]`` against one image's regions ``v [N, d]``."""
    s = w @ v.T  # [T, N]
    if form == "code":
        a = torch.softmax(g1 * torch.softmax(s, dim=0), dim=1)
    else:
        a = torch.softmax(g1 * s, dim=1)
    c = a @ v
    z = torch.stack([_cos(c[k], w[k]) for k in range(w.shape[0])])
    r = torch.log(torch.exp(g2 * z).sum())
    return r if form == "code" else r / g2


def gloria_local_reference(words, regions, mask, form, g3=10.0):
    b = words.shape[0]
    logits = torch.stack(
        [torch.stack([gloria_pair_reference(words[j][mask[j]], regions[i], form) for j in range(b)]) for i in range(b)]
    ) * g3  # [image, report]
    weight = 1.0 if form == "code" else 0.5
    return weight * _xent_rows(logits) + weight * _xent_rows(logits.T)


def spatial_prior_reference(h, w, threshold=0.5, smoothing=1.0):
    diag = math.sqrt(h * h + w * w)
    cells = [(r, c) for r in range(h) for c in range(w)]
    prior = torch.zeros(h * w, h * w, dtype=DT)
    for i, (r1, c1) in enumerate(cells):
        for j, (r2, c2) in enumerate(cells):
            d = math.hypot(r1 - r2, c1 - c2) / diag
            prior[i, j] = math.exp(-smoothing * d) if d <= threshold else 0.0
    return prior / prior.sum(1, keepdim=True)


def lovt_modality_reference(local, attended, target, mask, weights, tau=0.3):
    """``(l2att, att2l)`` of one modality, averaged over the batch."""
    l2a, a2l = [], []
    for b in range(local.shape[0]):
        idx = mask[b].nonzero().flatten()
        x, y, t = local[b, idx], attended[b, idx], target[idx][:, idx]
        t = t / t.sum(1, keepdim=True)
        c = torch.stack([torch.stack([_cos(x[i], y[j]) for j in range(len(idx))]) for i in range(len(idx))]) / tau
        u = weights[b, idx] / weights[b, idx].sum()
        l2a.append(sum(u[i] * -(t[i] * torch.log_softmax(c[i], 0)).sum() for i in range(len(idx))))
        a2l.append(sum(u[i] * -(t[i] * torch.log_softmax(c[:, i], 0)).sum() for i in range(len(idx))))
    return torch.stack(l2a).mean(), torch.stack(a2l).mean()


def _inputs(seed: int, b: int = 3, grid: int = 3, s: int = 4, t: int = 6, d: int = 5, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.randn(*shape, generator=g, dtype=DT) * scale).requires_grad_(True)

    n = grid * grid
    smask = torch.ones(b, s, dtype=torch.bool)
    smask[0, 2:] = False
    smask[2, 3:] = False
    wmask = torch.ones(b, t, dtype=torch.bool)
    wmask[1, 3:] = False
    return {
        OutKeys.IMAGE_LOCAL: r(b, n, d), OutKeys.IMAGE_LOCAL_ATTENDED: r(b, n, d), OutKeys.IMAGE_GLOBAL: r(b, d),
        OutKeys.TEXT_SENTENCE: r(b, s, d), OutKeys.TEXT_SENTENCE_ATTENDED: r(b, s, d), OutKeys.TEXT_GLOBAL: r(b, d),
        OutKeys.TEXT_TOKEN: r(b, t, d), OutKeys.TEXT_WORD: r(b, t, d),
        OutKeys.IMAGE_LOCAL_WEIGHTS: torch.rand(b, n, generator=g, dtype=DT) + 0.1,
        OutKeys.TEXT_SENTENCE_WEIGHTS: torch.rand(b, s, generator=g, dtype=DT) + 0.1,
        OutKeys.SENTENCE_MASK: smask, OutKeys.TOKEN_MASK: wmask, OutKeys.WORD_MASK: wmask, OutKeys.IMAGE_GRID: (grid, grid),
    }  # fmt: skip


def _assert_same(ours: torch.Tensor, ref: torch.Tensor, x: dict) -> None:
    leaves = [k for k, v in x.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    g_ours = torch.autograd.grad(ours, [x[k] for k in leaves], allow_unused=True)
    g_ref = torch.autograd.grad(ref, [x[k] for k in leaves], allow_unused=True)
    assert ours.dtype == DT
    assert abs(ours.item() - ref.item()) <= TOL * max(1.0, abs(ref.item())), (ours.item(), ref.item())
    compared = 0
    for k, a, b in zip(leaves, g_ours, g_ref):
        if b is None:
            assert a is None or a.abs().max() == 0, k
            continue
        assert a is not None, k
        assert torch.allclose(a, b, atol=TOL, rtol=TOL), (k, (a - b).abs().max().item())
        compared += 1
    assert compared >= 2


# ------------------------------------------------------------------------------------------ ConVIRT
def test_convirt_overlay_matches_the_paper():
    objective = _objective("convirt")
    x = _inputs(0)
    ours = objective(x)["loss"]
    _assert_same(ours, convirt_reference(x[OutKeys.IMAGE_GLOBAL], x[OutKeys.TEXT_GLOBAL]), x)


def test_convirt_reference_is_not_symmetric_in_its_directions():
    # the pin can fail: lambda = 0.5 (the old overlay) gives another value on the same inputs
    x = _inputs(1)
    image, text = x[OutKeys.IMAGE_GLOBAL], x[OutKeys.TEXT_GLOBAL]
    ours = _objective("convirt")(x)["loss"].item()
    assert abs(ours - convirt_reference(image, text, lam=0.5).item()) > 1e-3


# ------------------------------------------------------------------------------------------ GLoRIA
@pytest.mark.parametrize("form", ["code", "paper"])
@pytest.mark.parametrize("grid,dim", [(2, 6), (3, 4)], ids=["gram", "context"])  # N <= d and N > d
@pytest.mark.parametrize("scale", [1.0, 8.0], ids=["unit", "raw"])  # raw: peaky attention, as unnormalised features
def test_gloria_local_matches_reference(form, grid, dim, scale):
    x = _inputs(2, grid=grid, d=dim, scale=scale)
    words, regions, mask = x[OutKeys.TEXT_TOKEN], x[OutKeys.IMAGE_LOCAL], x[OutKeys.TOKEN_MASK]
    ours = GloriaLocalLoss(form=form)(words, regions, mask)
    _assert_same(ours, gloria_local_reference(words, regions, mask, form), x)


def test_gloria_overlay_is_the_released_code_on_whole_words():
    objective = _objective("gloria")
    local = objective.local_loss
    assert (local.form, local.word_units) == ("code", "whole_word")
    x = _inputs(3)
    ours = objective(x)["loss"]
    image, text = x[OutKeys.IMAGE_GLOBAL], x[OutKeys.TEXT_GLOBAL]
    ref = 2 * convirt_reference(image, text, lam=0.5) + gloria_local_reference(
        x[OutKeys.TEXT_WORD], x[OutKeys.IMAGE_LOCAL], x[OutKeys.WORD_MASK], "code"
    )
    _assert_same(ours, ref, x)


def test_gloria_code_and_paper_forms_differ():
    x = _inputs(4, scale=4.0)
    args = (x[OutKeys.TEXT_TOKEN], x[OutKeys.IMAGE_LOCAL], x[OutKeys.TOKEN_MASK])
    code, paper = GloriaLocalLoss(form="code")(*args), GloriaLocalLoss(form="paper")(*args)
    assert abs(code.item() - paper.item()) > 1e-2
    # and the code form is not the paper form with summed directions
    assert abs(code.item() - 2 * paper.item()) > 1e-2


def test_gloria_code_form_hand_computed_similarity():
    # one report (words (1, 0), (0, 1)) against one image (regions (1, 0), (0, 2)): s = [[1, 0], [0, 2]]
    words = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=DT)
    regions = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=DT)
    sig = math.e / (math.e + 1)  # softmax over the words of region 1: (sig, 1 - sig)
    q = 1 / (1 + math.e**2)  # region 2: (q, 1 - q)
    p = [[sig, q], [1 - sig, 1 - q]]  # p[word][region]
    a = [[math.exp(4 * p[k][r]) / sum(math.exp(4 * p[k][rr]) for rr in range(2)) for r in range(2)] for k in range(2)]
    z1 = a[0][0] / math.sqrt(a[0][0] ** 2 + 4 * a[0][1] ** 2)  # c_1 = (a11, 2 a12), cos with (1, 0)
    z2 = 2 * a[1][1] / math.sqrt(a[1][0] ** 2 + 4 * a[1][1] ** 2)
    expected = math.log(math.exp(5 * z1) + math.exp(5 * z2))
    ours = GloriaLocalLoss(form="code").similarity(words, regions)
    assert ours.item() == pytest.approx(expected, abs=1e-12)
    paper_z = [1.0 / 1.0, None]  # paper: a = softmax(4 s): word 1 -> (e^4, 1) / (e^4 + 1); word 2 -> (1, e^8) / ...
    a1 = [math.exp(4) / (math.exp(4) + 1), 1 / (math.exp(4) + 1)]
    a2 = [1 / (1 + math.exp(8)), math.exp(8) / (1 + math.exp(8))]
    paper_z = [a1[0] / math.sqrt(a1[0] ** 2 + 4 * a1[1] ** 2), 2 * a2[1] / math.sqrt(a2[0] ** 2 + 4 * a2[1] ** 2)]
    expected_paper = math.log(math.exp(5 * paper_z[0]) + math.exp(5 * paper_z[1])) / 5
    assert GloriaLocalLoss(form="paper").similarity(words, regions).item() == pytest.approx(expected_paper, abs=1e-12)


# ------------------------------------------------------------------------------------------ LoVT
def test_lovt_overlay_matches_lovt_code_math():
    objective = _objective("lovt")
    local = objective.local_loss
    assert (local.target, local.directions, local.temperature, local.spatial_threshold) == ("spatial", "both", 0.3, 0.5)
    x = _inputs(5)
    terms = objective(x)
    pooled = local.unit_weights == "attention_pooling"
    n, s = x[OutKeys.IMAGE_LOCAL].shape[1], x[OutKeys.TEXT_SENTENCE].shape[1]
    b = x[OutKeys.IMAGE_LOCAL].shape[0]
    wv = x[OutKeys.IMAGE_LOCAL_WEIGHTS] if pooled else torch.ones(b, n, dtype=DT)
    wt = x[OutKeys.TEXT_SENTENCE_WEIGHTS] if pooled else torch.ones(b, s, dtype=DT)
    r_l2a, r_a2l = lovt_modality_reference(
        x[OutKeys.IMAGE_LOCAL], x[OutKeys.IMAGE_LOCAL_ATTENDED], spatial_prior_reference(3, 3),
        torch.ones(b, n, dtype=torch.bool), wv,
    )  # fmt: skip
    s_l2a, s_a2l = lovt_modality_reference(
        x[OutKeys.TEXT_SENTENCE], x[OutKeys.TEXT_SENTENCE_ATTENDED], torch.eye(s, dtype=DT), x[OutKeys.SENTENCE_MASK], wt
    )
    for key, ref in (("local_region_local_to_attended", r_l2a), ("local_region_attended_to_local", r_a2l),
                     ("local_sentence_local_to_attended", s_l2a), ("local_sentence_attended_to_local", s_a2l)):  # fmt: skip
        assert terms[key].item() == pytest.approx(ref.item(), abs=TOL), key
    ref = 0.375 * (r_l2a + r_a2l + s_l2a + s_a2l) + convirt_reference(x[OutKeys.IMAGE_GLOBAL], x[OutKeys.TEXT_GLOBAL])
    _assert_same(terms["loss"], ref, x)


@pytest.mark.parametrize("target", ["one_hot", "intra_modal"])
def test_both_directions_match_reference_for_other_targets(target):
    x = _inputs(6)
    b, n, s = 3, 9, 4
    pre_v = torch.randn(b, n, 7, dtype=DT, generator=torch.Generator().manual_seed(1))
    pre_t = torch.randn(b, s, 7, dtype=DT, generator=torch.Generator().manual_seed(2))
    loss = LocalAlignmentLoss(target, temperature=0.2, target_temperature=0.5, directions="both")
    terms = loss.losses(x[OutKeys.IMAGE_LOCAL], x[OutKeys.IMAGE_LOCAL_ATTENDED], x[OutKeys.TEXT_SENTENCE],
                        x[OutKeys.TEXT_SENTENCE_ATTENDED], x[OutKeys.SENTENCE_MASK], pre_v, pre_t)  # fmt: skip
    for name, local, att, pre, mask in (
        ("region", x[OutKeys.IMAGE_LOCAL], x[OutKeys.IMAGE_LOCAL_ATTENDED], pre_v, torch.ones(b, n, dtype=torch.bool)),
        ("sentence", x[OutKeys.TEXT_SENTENCE], x[OutKeys.TEXT_SENTENCE_ATTENDED], pre_t, x[OutKeys.SENTENCE_MASK]),
    ):
        l2a, a2l = [], []
        for i in range(b):  # a per-sample target: build the reference sample by sample
            m = mask[i : i + 1]
            if target == "one_hot":
                tgt = torch.eye(local.shape[1], dtype=DT)
            else:  # softmax_j(cos(h_i, h_j) / 0.5) over the valid units
                h = pre[i]
                cos = torch.stack([torch.stack([_cos(h[p], h[q]) for q in range(len(h))]) for p in range(len(h))])
                tgt = torch.softmax((cos / 0.5).masked_fill(~m[0][None, :], float("-inf")), dim=1)
            one = lovt_modality_reference(local[i : i + 1], att[i : i + 1], tgt, m, torch.ones(1, local.shape[1], dtype=DT), 0.2)
            l2a.append(one[0])
            a2l.append(one[1])
        assert terms[f"{name}_local_to_attended"].item() == pytest.approx(torch.stack(l2a).mean().item(), abs=TOL)
        assert terms[f"{name}_attended_to_local"].item() == pytest.approx(torch.stack(a2l).mean().item(), abs=TOL)
        ref = torch.stack(l2a).mean() + torch.stack(a2l).mean()
        _assert_same(terms[name], ref, x)


def test_lovt_directions_hand_computed():
    # cos(V, V_ATT) / 0.5 = [[2, 1.2], [0, 1.6]]: rows are local -> attended, columns attended -> local
    v = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=DT)
    va = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]], dtype=DT)
    t = torch.tensor([[[1.0, 0.0]]], dtype=DT)

    def lse(*xs):
        return math.log(sum(math.exp(z) for z in xs))

    terms = LocalAlignmentLoss("one_hot", temperature=0.5, directions="both").losses(v, va, t, t)
    l2a = ((lse(2, 1.2) - 2) + (lse(0, 1.6) - 1.6)) / 2
    a2l = ((lse(2, 0) - 2) + (lse(1.2, 1.6) - 1.6)) / 2
    assert terms["region_local_to_attended"].item() == pytest.approx(l2a, abs=1e-12)
    assert terms["region_attended_to_local"].item() == pytest.approx(a2l, abs=1e-12)
    assert terms["region"].item() == pytest.approx(l2a + a2l, abs=1e-12)
