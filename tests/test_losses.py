"""Objectives: hand-computed values, limits, invariances, padding and robustness."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from monai_elvis.keys import OutKeys
from monai_elvis.losses import (
    ElvisLoss,
    GlobalContrastiveLoss,
    GloriaLocalLoss,
    LocalAlignmentLoss,
    intra_modal_target,
    spatial_target,
)

T = torch.tensor


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


# ---------------------------------------------------------------- global
def test_global_hand_computed_symmetric():
    eye = T([[1.0, 0.0], [0.0, 1.0]])
    loss = GlobalContrastiveLoss(temperature=0.5)(eye, 3 * eye)  # scale does not matter: cosine
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)


def test_global_hand_computed_weighted_directions():
    image = T([[1.0, 0.0], [0.0, 1.0]])
    text = T([[1.0, 0.0], [2.0, 0.0]])
    # cosine logits / 0.5 = [[2, 2], [0, 0]]
    i2t = (math.log(2) + math.log(2)) / 2
    t2i = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 2
    loss = GlobalContrastiveLoss(0.5, image_to_text_weight=0.25, text_to_image_weight=0.75)(image, text)
    assert loss.item() == pytest.approx(0.25 * i2t + 0.75 * t2i, abs=1e-6)


def test_global_learnable_temperature_gets_gradient_and_is_clamped():
    loss_fn = GlobalContrastiveLoss(temperature=0.001, learnable_temperature=True, max_logit_scale=100.0)
    assert loss_fn.temperature == pytest.approx(0.01)
    x = torch.randn(4, 8)
    loss_fn(x, x + 0.1 * torch.randn(4, 8)).backward()
    assert isinstance(loss_fn.log_logit_scale, torch.nn.Parameter)
    loss_fn2 = GlobalContrastiveLoss(temperature=0.1, learnable_temperature=True)
    loss_fn2(x, torch.randn(4, 8)).backward()
    assert loss_fn2.log_logit_scale.grad is not None and loss_fn2.log_logit_scale.grad.abs() > 0


def test_learnable_temperature_past_its_bound_still_gets_gradient_and_is_clamped_by_value():
    """The bound is on the parameter's value (clamped after a step), not in the forward pass: an overshoot past the
    bound keeps a non-zero gradient (a forward clamp made it exactly 0, so the temperature could stick)."""
    loss_fn = GlobalContrastiveLoss(temperature=0.1, learnable_temperature=True, max_logit_scale=5.0)
    assert loss_fn.temperature == pytest.approx(0.2)  # the initial value is clamped
    with torch.no_grad():
        loss_fn.log_logit_scale.fill_(math.log(20.0))  # as if an optimizer step overshot the bound
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=g)
    loss_fn(x, torch.randn(4, 8, generator=g)).backward()
    assert loss_fn.log_logit_scale.grad.abs() > 1e-6
    loss_fn.clamp_parameters_()
    assert loss_fn.temperature == pytest.approx(0.2)


def test_clamp_parameters_handler_clamps_after_optimizer_steps_only():
    from types import SimpleNamespace

    from monai_elvis.engines import ClampParametersHandler, ObjectiveLoss

    objective = ElvisLoss(GlobalContrastiveLoss(0.1, learnable_temperature=True, max_logit_scale=5.0))
    engine = SimpleNamespace(loss_function=ObjectiveLoss(objective), network=torch.nn.Linear(2, 2),
                             accumulation_steps=2, state=SimpleNamespace(iteration=1, epoch_length=4))  # fmt: skip
    param = objective.global_loss.log_logit_scale
    with torch.no_grad():
        param.fill_(math.log(20.0))
    ClampParametersHandler()(engine)  # iteration 1 of an accumulation window of 2: no optimizer step yet
    assert param.item() == pytest.approx(math.log(20.0))
    engine.state.iteration = 2
    ClampParametersHandler()(engine)
    assert param.item() == pytest.approx(math.log(5.0))


# ---------------------------------------------------------------- local: hand-computed
V = T([[[1.0, 0.0], [0.0, 1.0]]])  # [1, 2, 2] regions
V_ATT = T([[[1.0, 0.0], [0.6, 0.8]]])  # cos(V, V_ATT) = [[1, .6], [0, .8]] -> /0.5 = [[2, 1.2], [0, 1.6]]
TXT = T([[[1.0, 0.0], [0.0, 1.0], [7.0, -3.0]]])  # third sentence is padding
TXT_ATT = T([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])  # cos = [[1, 0], [0, 1]] -> /0.5 = [[2, 0], [0, 2]]
MASK = T([[True, True, False]])
H = T([[[1.0, 0.0], [0.6, 0.8]]])  # intra-image cosine 0.6
G = T([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # intra-report cosine 0


def _local(loss: LocalAlignmentLoss, **kw):
    return loss.directional_losses(V, V_ATT, TXT, TXT_ATT, MASK, H, G, **kw)


def test_local_one_hot_hand_computed():
    region, sentence = _local(LocalAlignmentLoss("one_hot", temperature=0.5))
    expected_region = ((lse(2, 1.2) - 2) + (lse(0, 1.6) - 1.6)) / 2
    expected_sentence = math.log(1 + math.exp(-2))
    assert region.item() == pytest.approx(expected_region, abs=1e-6)
    assert sentence.item() == pytest.approx(expected_sentence, abs=1e-6)
    total = LocalAlignmentLoss("one_hot", temperature=0.5, region_weight=0.3, sentence_weight=0.7)(
        V, V_ATT, TXT, TXT_ATT, MASK
    )
    assert total.item() == pytest.approx(0.3 * expected_region + 0.7 * expected_sentence, abs=1e-6)


def test_local_intra_modal_hand_computed():
    # region target: softmax([1, .6] / 0.2) = softmax([5, 3]); sentence target: softmax([1, 0] / 0.2)
    p = 1 / (1 + math.exp(-2))
    q = 1 - p
    expected_region = ((lse(2, 1.2) - (p * 2 + q * 1.2)) + (lse(0, 1.6) - (q * 0 + p * 1.6))) / 2
    ps = 1 / (1 + math.exp(-5))
    expected_sentence = ((lse(2, 0) - ps * 2) + (lse(0, 2) - ps * 2)) / 2
    loss = LocalAlignmentLoss("intra_modal", temperature=0.5, target_temperature=0.2)
    region, sentence = _local(loss)
    assert region.item() == pytest.approx(expected_region, abs=1e-6)
    assert sentence.item() == pytest.approx(expected_sentence, abs=1e-6)


def test_local_intra_modal_projected_source_uses_detached_projections():
    loss = LocalAlignmentLoss("intra_modal", temperature=0.5, target_temperature=0.2, target_source="projected")
    # the projected regions V are orthogonal: the target is softmax([5, 0]) per row
    p = 1 / (1 + math.exp(-5))
    expected_region = ((lse(2, 1.2) - (p * 2 + (1 - p) * 1.2)) + (lse(0, 1.6) - p * 1.6)) / 2
    region, _ = loss.directional_losses(V, V_ATT, TXT, TXT_ATT, MASK)  # no pre-projection features needed
    assert region.item() == pytest.approx(expected_region, abs=1e-6)


def test_intra_modal_target_rows_and_stop_gradient():
    h = torch.randn(2, 5, 3, requires_grad=True)
    mask = T([[True] * 5, [True, True, True, False, False]])
    w = intra_modal_target(h, 0.1, mask)
    assert not w.requires_grad
    assert torch.allclose(w.sum(-1), torch.ones(2, 5))
    assert (w[1, :, 3:] == 0).all()


def test_intra_modal_tends_to_one_hot_as_temperature_goes_to_zero():
    torch.manual_seed(0)
    b, n, s, d = 3, 9, 4, 16
    args = [torch.randn(b, n, d), torch.randn(b, n, d), torch.randn(b, s, d), torch.randn(b, s, d), None]
    pre = dict(image_local_pre=torch.randn(b, n, 32), text_local_pre=torch.randn(b, s, 24))
    one_hot = LocalAlignmentLoss("one_hot")(*args)
    previous = None
    for tau in (1.0, 0.1, 0.01, 1e-4):
        gap = (LocalAlignmentLoss("intra_modal", target_temperature=tau)(*args, **pre) - one_hot).abs().item()
        if previous is not None:
            assert gap <= previous + 1e-7
        previous = gap
    assert previous < 1e-5


# ---------------------------------------------------------------- local: spatial (LoVT)
def test_spatial_target_reproduces_lovt_weights_on_3x3_grid():
    w = spatial_target((3, 3), threshold=0.3, smoothing=1.0)
    a = math.exp(-1 / math.sqrt(18))  # edge neighbours at distance 1 / diagonal; diagonal neighbours (1/3) excluded
    centre = torch.zeros(9)
    centre[4] = 1
    centre[[1, 3, 5, 7]] = a
    corner = torch.zeros(9)
    corner[0] = 1
    corner[[1, 3]] = a
    edge = torch.zeros(9)
    edge[1] = 1
    edge[[0, 2, 4]] = a
    assert torch.allclose(w[4], centre / centre.sum(), atol=1e-6)
    assert torch.allclose(w[0], corner / corner.sum(), atol=1e-6)
    assert torch.allclose(w[1], edge / edge.sum(), atol=1e-6)
    # symmetric support
    assert torch.equal(w > 0, (w > 0).T)


def test_spatial_loss_matches_explicit_sum_and_uses_identity_for_sentences():
    torch.manual_seed(1)
    v, va = torch.randn(2, 9, 4), torch.randn(2, 9, 4)
    t, ta = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    loss = LocalAlignmentLoss("spatial", temperature=0.3)
    region, sentence = loss.directional_losses(v, va, t, ta, grid_size=(3, 3))
    w = spatial_target((3, 3))
    logp = torch.log_softmax(F.cosine_similarity(v[:, :, None], va[:, None], dim=-1) / 0.3, dim=-1)
    expected = -(w * logp).sum(-1).mean()
    assert region.item() == pytest.approx(expected.item(), abs=1e-6)
    _, sentence_one_hot = LocalAlignmentLoss("one_hot", temperature=0.3).directional_losses(v, va, t, ta)
    assert sentence.item() == pytest.approx(sentence_one_hot.item(), abs=1e-7)
    with pytest.raises(ValueError, match="grid_size"):
        loss(v[:, :8], va[:, :8], t, ta)


def test_spatial_prior_follows_settings_changed_after_a_call():
    torch.manual_seed(7)
    v, va = torch.randn(2, 9, 4), torch.randn(2, 9, 4)
    t, ta = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    loss = LocalAlignmentLoss("spatial", temperature=0.3, spatial_threshold=0.3)
    first = loss(v, va, t, ta)
    loss.spatial_threshold, loss.spatial_smoothing = 0.5, 2.0  # diagonal neighbours now count, weighted differently
    changed = loss(v, va, t, ta)
    fresh = LocalAlignmentLoss("spatial", temperature=0.3, spatial_threshold=0.5, spatial_smoothing=2.0)(v, va, t, ta)
    assert changed.item() == pytest.approx(fresh.item(), abs=1e-7)
    assert abs(changed.item() - first.item()) > 1e-4


def test_local_unit_weights_are_normalised_per_sample():
    torch.manual_seed(2)
    args = [torch.randn(1, 4, 3), torch.randn(1, 4, 3), torch.randn(1, 2, 3), torch.randn(1, 2, 3)]
    loss = LocalAlignmentLoss("one_hot")
    only_first = loss.directional_losses(*args, region_weights=T([[2.0, 0.0, 0.0, 0.0]]))[0]
    logits = F.cosine_similarity(args[0][0, :, None], args[1][0, None], dim=-1) / 0.1
    assert only_first.item() == pytest.approx(-torch.log_softmax(logits[0], 0)[0].item(), abs=1e-5)


# ---------------------------------------------------------------- padding invariance
def _with_padding(fill: float | None, seed: int):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(3)
    b, n, s, d = 3, 4, 5, 6
    x = {
        OutKeys.IMAGE_LOCAL: torch.randn(b, n, d),
        OutKeys.IMAGE_LOCAL_ATTENDED: torch.randn(b, n, d),
        OutKeys.IMAGE_LOCAL_PRE: torch.randn(b, n, 7),
        OutKeys.TEXT_SENTENCE: torch.randn(b, s, d),
        OutKeys.TEXT_SENTENCE_ATTENDED: torch.randn(b, s, d),
        OutKeys.TEXT_SENTENCE_PRE: torch.randn(b, s, 8),
        OutKeys.TEXT_TOKEN: torch.randn(b, 7, d),
        OutKeys.IMAGE_GLOBAL: torch.randn(b, d),
        OutKeys.TEXT_GLOBAL: torch.randn(b, d),
        OutKeys.IMAGE_GRID: (2, 2),
    }
    smask = torch.ones(b, s, dtype=torch.bool)
    smask[0, 2:] = False
    smask[2, 4:] = False
    wmask = torch.ones(b, 7, dtype=torch.bool)
    wmask[1, 3:] = False
    x[OutKeys.SENTENCE_MASK], x[OutKeys.TOKEN_MASK] = smask, wmask
    for key, mask in ((OutKeys.TEXT_SENTENCE, smask), (OutKeys.TEXT_SENTENCE_ATTENDED, smask),
                      (OutKeys.TEXT_SENTENCE_PRE, smask), (OutKeys.TEXT_TOKEN, wmask)):
        junk = torch.randn(x[key].shape, generator=g) * 50 if fill is None else torch.full_like(x[key], fill)
        x[key] = torch.where(mask.unsqueeze(-1), x[key], junk)
    for key, val in x.items():
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            val.requires_grad_(True)
    return x


@pytest.mark.parametrize(
    "local",
    [LocalAlignmentLoss("one_hot"), LocalAlignmentLoss("spatial"), LocalAlignmentLoss("intra_modal"),
     LocalAlignmentLoss("intra_modal", target_source="projected"), GloriaLocalLoss(),
     LocalAlignmentLoss("spatial", directions="both"), LocalAlignmentLoss("intra_modal", directions="both"),
     GloriaLocalLoss(form="code")],
    ids=["one_hot", "spatial", "intra_modal", "intra_modal_projected", "gloria", "lovt", "intra_modal_both",
         "gloria_code"],
)
def test_padded_features_change_neither_loss_nor_gradients(local):
    loss_fn = ElvisLoss(local_loss=local)
    results = []
    for fill, seed in ((None, 0), (None, 1), (float("nan"), 0), (float("inf"), 0)):
        x = _with_padding(fill, seed)
        loss = loss_fn(x)["loss"]
        loss.backward()
        grads = {k: v.grad.clone() for k, v in x.items() if isinstance(v, torch.Tensor) and v.grad is not None}
        results.append((loss.detach(), grads, x))
    ref_loss, ref_grads, ref_x = results[0]
    assert torch.isfinite(ref_loss)
    for loss, grads, x in results[1:]:
        assert torch.equal(loss, ref_loss)
        assert grads.keys() == ref_grads.keys()
        for k in grads:
            assert torch.equal(grads[k], ref_grads[k]), k
    # and padded positions receive no gradient at all
    smask = ref_x[OutKeys.SENTENCE_MASK]
    for k in (OutKeys.TEXT_SENTENCE, OutKeys.TEXT_SENTENCE_ATTENDED):
        if k in ref_grads:
            assert (ref_grads[k][~smask] == 0).all()


# ---------------------------------------------------------------- permutation invariance
@pytest.mark.parametrize("local", [None, LocalAlignmentLoss("intra_modal"), LocalAlignmentLoss("spatial"), GloriaLocalLoss(),
                                   LocalAlignmentLoss("spatial", directions="both"), GloriaLocalLoss(form="code")])
def test_global_and_total_losses_are_invariant_to_batch_permutation(local):
    x = _with_padding(None, 0)
    perm = torch.tensor([2, 0, 1])
    px = {k: (v[perm] if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    loss_fn = ElvisLoss(local_loss=local)
    a, b = loss_fn(x), loss_fn(px)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].item() == pytest.approx(b[k].item(), abs=1e-6), k
    g = GlobalContrastiveLoss()
    assert g(x[OutKeys.IMAGE_GLOBAL], x[OutKeys.TEXT_GLOBAL]).item() == pytest.approx(
        g(px[OutKeys.IMAGE_GLOBAL], px[OutKeys.TEXT_GLOBAL]).item(), abs=1e-6
    )


# ---------------------------------------------------------------- GLoRIA
def _gloria_per_pair_loop(words, regions, mask, a1=4.0, a2=5.0, a3=10.0):
    """Plain loop over every (image, report) pair, materialising each word's region context."""
    b = words.shape[0]
    sim = torch.zeros(b, b, dtype=words.dtype)
    rows = []
    for i in range(b):
        row = []
        for j in range(b):
            w = words[j][mask[j]]  # [T_j, d]
            attn = torch.softmax(a1 * (w @ regions[i].T), dim=1)  # [T_j, N]
            ctx = attn @ regions[i]  # [T_j, d]
            z = F.cosine_similarity(ctx, w, dim=1, eps=1e-8)
            row.append(torch.log(torch.exp(a2 * z).sum()) / a2)
        rows.append(torch.stack(row))
    sim = torch.stack(rows) * a3  # [image, report]
    target = torch.arange(b)
    return 0.5 * F.cross_entropy(sim, target) + 0.5 * F.cross_entropy(sim.T, target)


@pytest.mark.parametrize("n_regions,dim", [(4, 6), (9, 4)], ids=["gram", "context"])
def test_gloria_equals_per_pair_loop_values_and_gradients(n_regions, dim):
    torch.manual_seed(4)
    b, t = 3, 5
    words = (torch.randn(b, t, dim, dtype=torch.float64)).requires_grad_(True)
    regions = (torch.randn(b, n_regions, dim, dtype=torch.float64)).requires_grad_(True)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 2:] = False
    mask[2, 4:] = False
    ref = _gloria_per_pair_loop(words, regions, mask)
    gw_ref, gr_ref = torch.autograd.grad(ref, (words, regions))
    out = GloriaLocalLoss()(words.float(), regions.float(), mask)
    gw, gr = torch.autograd.grad(out, (words, regions))
    assert out.item() == pytest.approx(ref.item(), abs=1e-5)
    assert torch.allclose(gw, gw_ref, atol=1e-5)
    assert torch.allclose(gr, gr_ref, atol=1e-5)


def test_gloria_hand_computed_single_word():
    # one word per report, one region per image: the context is the region, z = cos(word, region)
    words = T([[[1.0, 0.0]], [[0.0, 1.0]]])
    regions = T([[[2.0, 0.0]], [[1.0, 1.0]]])
    c = 1 / math.sqrt(2)
    # R[image, report] = z: [[1, 0], [c, c]] ; logits x10
    i2t = ((lse(10, 0) - 10) + (lse(10 * c, 10 * c) - 10 * c)) / 2
    t2i = ((lse(10, 10 * c) - 10) + (lse(0, 10 * c) - 10 * c)) / 2
    assert GloriaLocalLoss()(words, regions).item() == pytest.approx(0.5 * i2t + 0.5 * t2i, abs=1e-5)


# ---------------------------------------------------------------- numerics
def test_finite_under_bfloat16_autocast_with_large_features():
    torch.manual_seed(5)
    b, n, s, t, d = 4, 16, 5, 9, 32
    lin = torch.nn.Linear(d, d)
    raw = {k: torch.randn(b, m, d) for k, m in
           ((OutKeys.IMAGE_LOCAL, n), (OutKeys.IMAGE_LOCAL_ATTENDED, n), (OutKeys.IMAGE_LOCAL_PRE, n),
            (OutKeys.TEXT_SENTENCE, s), (OutKeys.TEXT_SENTENCE_ATTENDED, s), (OutKeys.TEXT_SENTENCE_PRE, s),
            (OutKeys.TEXT_TOKEN, t))}
    raw[OutKeys.IMAGE_GLOBAL] = torch.randn(b, d)
    raw[OutKeys.TEXT_GLOBAL] = torch.randn(b, d)
    smask = torch.ones(b, s, dtype=torch.bool)
    smask[0, 3:] = False
    for local in (LocalAlignmentLoss("intra_modal"), LocalAlignmentLoss("spatial"), GloriaLocalLoss(),
                  LocalAlignmentLoss("spatial", directions="both"), GloriaLocalLoss(form="code")):
        lin.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = {k: lin(v) * 100 for k, v in raw.items()}
            assert x[OutKeys.IMAGE_LOCAL].dtype == torch.bfloat16
            x.update({OutKeys.SENTENCE_MASK: smask, OutKeys.TOKEN_MASK: torch.ones(b, t, dtype=torch.bool),
                      OutKeys.IMAGE_GRID: (4, 4)})
            terms = ElvisLoss(GlobalContrastiveLoss(learnable_temperature=True), local)(x)
        assert all(torch.isfinite(v) for v in terms.values())
        terms["loss"].backward()
        assert torch.isfinite(lin.weight.grad).all() and lin.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- bad input
def test_bad_input_errors_name_tensor_and_shape():
    v, t = torch.randn(2, 4, 8), torch.randn(2, 3, 8)
    loss = LocalAlignmentLoss("one_hot")
    with pytest.raises(ValueError, match=r"batch sizes differ: image_local \(2, 4, 8\), text_local \(3, 3, 8\)"):
        loss(v, v, torch.randn(3, 3, 8), torch.randn(3, 3, 8))
    with pytest.raises(ValueError, match=r"image_local must have shape \[B, N, d\], got shape \(4, 8\)"):
        loss(v[0], v[0], t, t)
    with pytest.raises(ValueError, match=r"sentence_mask \(shape \(2, 3\)\): batch item\(s\) \[1\] have no valid sentence"):
        loss(v, v, t, t, T([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match=r"text_attended must have the shape \(2, 3, 8\)"):
        loss(v, v, t, t[:, :2])
    with pytest.raises(ValueError, match="image_local_pre is required"):
        LocalAlignmentLoss("intra_modal")(v, v, t, t)
    with pytest.raises(ValueError, match=r"image must have shape \[B, d\], got shape \(2, 4, 8\)"):
        GlobalContrastiveLoss()(v, t[:, 0])
    with pytest.raises(ValueError, match=r"batch sizes differ: image \(2, 8\), text \(3, 8\)"):
        GlobalContrastiveLoss()(v[:, 0], torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"word_mask \(shape \(2, 3\)\): batch item\(s\) \[0\] have no valid word"):
        GloriaLocalLoss()(t, v, T([[False] * 3, [True] * 3]))
    with pytest.raises(ValueError, match="target must be one of"):
        LocalAlignmentLoss("cosine")
    with pytest.raises(ValueError, match=r"directions must be one of \('local_to_attended', 'both'\), got 'all'"):
        LocalAlignmentLoss(directions="all")
    with pytest.raises(ValueError, match="unit_weights must be one of"):
        LocalAlignmentLoss(unit_weights="pooling")
    with pytest.raises(ValueError, match=r"form must be one of \('paper', 'code'\), got 'released'"):
        GloriaLocalLoss(form="released")
    with pytest.raises(ValueError, match="word_units must be one of"):
        GloriaLocalLoss(word_units="words")
    x = _with_padding(None, 0)
    with pytest.raises(KeyError, match="text_word.*word_index=True"):
        ElvisLoss(local_loss=GloriaLocalLoss(word_units="whole_word"))(x)
    with pytest.raises(KeyError, match="image_local_weights.*attention_pooling"):
        ElvisLoss(local_loss=LocalAlignmentLoss("one_hot", unit_weights="attention_pooling"))(x)
    with pytest.raises(KeyError, match="image_global"):
        ElvisLoss()({})
    with pytest.raises(ValueError, match="no term"):
        ElvisLoss(global_weight=0.0)


@pytest.mark.parametrize("form", ["code", "paper"])
@pytest.mark.parametrize("n_regions,dim,blocks", [(4, 6, False), (4, 6, True), (9, 4, False)],
                         ids=["gram", "gram-symmetric-blocks", "context"])  # fmt: skip
def test_gloria_word_region_context_gradcheck(form, n_regions, dim, blocks, monkeypatch):
    """The hand-written backward of ``_WordRegionContext`` against finite differences, float64."""
    from monai_elvis.losses import gloria

    if blocks:  # the 3 x 3 block split of the symmetric products, on a grid small enough for gradcheck
        monkeypatch.setattr(gloria, "_SYMMETRIC_BLOCK_MIN", 3)
    torch.manual_seed(7)
    words = torch.randn(5, dim, dtype=torch.float64, requires_grad=True)  # two reports: rows 0-1 and 2-4
    regions = torch.randn(2, n_regions, dim, dtype=torch.float64, requires_grad=True)
    bounds = ((0, 2), (2, 5))

    def fn(w, v):
        return gloria._WordRegionContext.apply(w, v, bounds, gloria.GloriaForm(form), 4.0)

    assert torch.autograd.gradcheck(fn, (words, regions))
    # and the values are the plain per-pair contexts
    dot, csq = fn(words, regions)
    for i in range(2):
        for start, end in bounds:
            s = words[start:end] @ regions[i].T  # [T, N]
            x = torch.softmax(s, dim=0) if form == "code" else s
            c = torch.softmax(4.0 * x, dim=1) @ regions[i]  # [T, d]
            assert torch.allclose(dot[start:end, i], (c * words[start:end]).sum(1))
            assert torch.allclose(csq[start:end, i], (c * c).sum(1))


def test_gloria_symmetric_product_blocks():
    from monai_elvis.losses.gloria import _SYMMETRIC_BLOCK_MIN, _symmetric_bmm

    torch.manual_seed(8)
    v = torch.randn(2, _SYMMETRIC_BLOCK_MIN + 7, 5, dtype=torch.float64)  # blocks of unequal size
    e = torch.randn(2, 1, 5, dtype=torch.float64)  # A^T diag(e) A with A = v^T
    assert torch.allclose(_symmetric_bmm(v, v.transpose(1, 2)), v @ v.transpose(1, 2))
    assert torch.allclose(_symmetric_bmm(v, (v * e).transpose(1, 2)), v @ (v * e).transpose(1, 2))


def test_elvis_loss_passes_detached_attention_pooling_weights_and_reports_every_direction():
    x = _with_padding(None, 0)
    b, n, s = 3, 4, 5
    x[OutKeys.IMAGE_LOCAL_WEIGHTS] = torch.rand(b, n, requires_grad=True)
    x[OutKeys.TEXT_SENTENCE_WEIGHTS] = torch.rand(b, s, requires_grad=True)
    local = LocalAlignmentLoss("spatial", directions="both", unit_weights="attention_pooling")
    terms = ElvisLoss(local_loss=local)(x)
    expected = local.losses(x[OutKeys.IMAGE_LOCAL], x[OutKeys.IMAGE_LOCAL_ATTENDED], x[OutKeys.TEXT_SENTENCE],
                            x[OutKeys.TEXT_SENTENCE_ATTENDED], x[OutKeys.SENTENCE_MASK],
                            region_weights=x[OutKeys.IMAGE_LOCAL_WEIGHTS], sentence_weights=x[OutKeys.TEXT_SENTENCE_WEIGHTS],
                            grid_size=(2, 2))  # fmt: skip
    for k, v in expected.items():
        assert terms[f"local_{k}"].item() == pytest.approx(v.item(), abs=1e-6), k
    uniform = ElvisLoss(local_loss=LocalAlignmentLoss("spatial", directions="both"))(x)
    assert abs(uniform["local"].item() - terms["local"].item()) > 1e-4
    terms["loss"].backward()
    assert x[OutKeys.IMAGE_LOCAL_WEIGHTS].grad is None  # stop-gradient, as LoVT
