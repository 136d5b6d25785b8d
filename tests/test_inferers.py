"""Phrase grounding inferer and the grounding pieces of the engines."""

from __future__ import annotations

import json

import pytest
import torch

from monai_elvis.engines import MetricsJSONHandler
from monai_elvis.inferers import PhraseGroundingInferer, region_similarity_map, upsample_region_map
from monai_elvis.inferers.grounding import smooth_map
from monai_elvis.keys import OutKeys
from monai_elvis.metrics import GroundingMetric
from monai_elvis.networks import CXRImageEncoder, ElvisNet, ReportTextEncoder


def test_region_similarity_map_hand_computed():
    # 2x2 regions; the phrase points along region 3's direction
    out = {
        OutKeys.IMAGE_LOCAL: torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]]]),
        OutKeys.TEXT_SENTENCE: torch.tensor([[[2.0, 2.0], [5.0, -1.0]]]),  # only the first sentence counts
        OutKeys.IMAGE_GRID: (2, 2),
    }
    raw = region_similarity_map(out, normalize=False)
    c = 2**-0.5
    assert torch.allclose(raw, torch.tensor([[[[c, c], [-c, 1.0]]]]), atol=1e-6)
    norm = region_similarity_map(out, size=(4, 4))
    assert norm.shape == (1, 1, 4, 4) and float(norm.min()) == 0.0 and float(norm.max()) == 1.0


def test_upsample_region_map_places_regions_at_receptive_field_centres():
    heat = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    # stride 2: region i at pixel 2i; pixel 1 halfway between regions 0 and 1; pixel 3 past the last region
    aligned = upsample_region_map(heat, (4, 4), stride=2)
    assert torch.allclose(aligned[0, 0], torch.tensor([[0.0, 0.5, 1.0, 1.0], [1.0, 1.5, 2.0, 2.0],
                                                       [2.0, 2.5, 3.0, 3.0], [2.0, 2.5, 3.0, 3.0]]))  # fmt: skip
    cells = upsample_region_map(heat, (4, 4))  # cells of 2 px: values at pixel 0.5 and 2.5
    assert torch.allclose(cells[0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    one = torch.zeros(1, 1, 8, 6)
    one[0, 0, 3, 4] = 1.0
    one[0, 0, 7, 5] = 0.5  # the last region of both axes
    up = upsample_region_map(one, (128, 96), stride=16)[0, 0]
    assert up.shape == (128, 96) and divmod(int(up.argmax()), 96) == (48, 64)
    assert float(up[48, 64]) == pytest.approx(1.0) and float(up[56, 64]) == pytest.approx(0.5)
    assert torch.allclose(up[112:, 80:], torch.full((16, 16), 0.5))  # past the last region: its value
    with pytest.raises(ValueError, match="stride"):
        upsample_region_map(heat, (4, 4), stride=0)


def test_region_similarity_map_places_regions_by_the_networks_stride():
    """ElvisNet returns its encoder's output stride; the map uses it unless told to place regions as cells."""
    net = ElvisNet(CXRImageEncoder("resnet18", 1, 0.125, output_stride=16),
                   ReportTextEncoder(config={"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
                                             "num_attention_heads": 2, "intermediate_size": 32}), embed_dim=8).eval()  # fmt: skip
    with torch.no_grad():
        out = net.encode_image(torch.randn(1, 1, 64, 64))
    assert out[OutKeys.IMAGE_STRIDE] == 16 and out[OutKeys.IMAGE_GRID] == (4, 4)
    regions = torch.zeros(1, 16, 2)
    regions[0, 1 * 4 + 2] = torch.tensor([1.0, 0.0])  # region (1, 2) alone matches the phrase
    out = {OutKeys.IMAGE_LOCAL: regions, OutKeys.TEXT_GLOBAL: torch.tensor([[1.0, 0.0]]), OutKeys.IMAGE_GRID: (4, 4),
           OutKeys.IMAGE_STRIDE: 16}  # fmt: skip
    aligned = region_similarity_map(out, (64, 64), text_feature="global", similarity="dot")
    cells = region_similarity_map(out, (64, 64), text_feature="global", similarity="dot", placement="cell")
    assert divmod(int(aligned.flatten().argmax()), 64) == (16, 32)  # pixel (1 * 16, 2 * 16)
    assert float(cells[0, 0, 24, 40]) == pytest.approx(1.0)  # the cell's centre, (1 + 0.5) * 16 - 0.5 rounded up
    assert float(cells[0, 0, 16, 32]) < 0.6
    with pytest.raises(ValueError, match="placement"):
        region_similarity_map(out, (64, 64), text_feature="global", placement="corner")


def test_smoothing_keeps_a_flat_map_flat():
    """The borders are replicated: a constant map stays constant (zero padding would lower it towards the borders,
    a dome that pulls every peak to the centre), and smoothing keeps the total of a map far from the borders."""
    flat = torch.full((1, 1, 64, 48), 0.7)
    assert torch.allclose(smooth_map(flat, 16.0), flat, atol=1e-5)
    spot = torch.zeros(1, 1, 64, 64)
    spot[0, 0, 30, 33] = 1.0
    smoothed = smooth_map(spot, 2.0)
    assert float(smoothed.sum()) == pytest.approx(1.0, abs=1e-5) and divmod(int(smoothed.argmax()), 64) == (30, 33)


def test_region_placement_matches_the_encoders_receptive_fields():
    """The pixels that can change region ``(i, j)`` of a :class:`CXRImageEncoder` span a box centred on
    ``(i * stride, j * stride)``, where ``"receptive_field"`` placement puts it (cells would put it 7.5 px further)."""
    for stride in (8, 16, 32):
        enc = CXRImageEncoder("resnet18", 1, 0.125, output_stride=stride).eval()
        with torch.no_grad():
            for m in enc.modules():  # positive weights: every pixel of the receptive field reaches the region
                if isinstance(m, torch.nn.Conv2d):
                    m.weight.fill_(0.01)
        image = (torch.rand(1, 1, 640, 640, generator=torch.Generator().manual_seed(0)) + 1.0).requires_grad_()
        local, _, grid = enc.forward_with_grid(image)
        i, j = grid[0] // 2, grid[1] // 2 - 1
        local[0, i * grid[1] + j].sum().backward()
        rows, cols = (image.grad[0, 0].abs() > 0).nonzero().T
        centre = ((rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2)
        assert 0 < int(rows.min()) and int(rows.max()) < 639  # the whole receptive field inside the image
        assert abs(float(centre[0]) - i * stride) <= 1 and abs(float(centre[1]) - j * stride) <= 1, (stride, centre)


def test_phrase_grounding_inferer_on_elvis_net():
    net = ElvisNet(CXRImageEncoder("resnet18", 1, 0.125),
                   ReportTextEncoder(config={"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
                                             "num_attention_heads": 2, "intermediate_size": 32}), embed_dim=8).eval()  # fmt: skip
    ids = torch.randint(5, 50, (2, 6))
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "sentence_index": torch.tensor([[-1, 0, 0, 0, 0, -1]] * 2)}  # fmt: skip
    with torch.no_grad():
        heat = PhraseGroundingInferer()(torch.randn(2, 1, 96, 64), net, **text)
    assert heat.shape == (2, 1, 96, 64) and 0 <= float(heat.min()) and float(heat.max()) <= 1


def test_grounding_metric_leaves_out_lost_boxes():
    heat = torch.rand(3, 1, 4, 4)
    mask = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, :2, :2] = True
    mask[2, 0, 1:, 1:] = True  # item 1 has no box left
    m = GroundingMetric("cnr")
    m(y_pred=heat, y=mask)
    from monai_elvis.metrics import grounding_cnr

    expected = grounding_cnr(heat[[0, 2]], mask[[0, 2]]).mean()
    assert m.aggregate().item() == pytest.approx(expected.item(), abs=1e-6)


def test_metrics_json_merges_evaluators_of_one_epoch(tmp_path):
    class Engine:
        def __init__(self, epoch, metrics):
            self.state = type("S", (), {"epoch": epoch, "metrics": metrics})()

    path = tmp_path / "metrics.json"
    handler = MetricsJSONHandler(path)
    handler(Engine(2, {"a": torch.tensor(0.5)}))
    handler(Engine(2, {"b": 1}))
    assert json.loads(path.read_text()) == {"epoch": 2, "metrics": {"a": 0.5, "b": 1.0}}
    handler(Engine(3, {"b": 2}))
    assert json.loads(path.read_text()) == {"epoch": 3, "metrics": {"b": 2.0}}


@pytest.mark.parametrize("acc,epoch_length,expected", [(1, 5, [1, 2, 3, 4, 5]), (2, 5, [2, 4, 5]), (3, None, [3])])
def test_gradient_clip_runs_once_per_optimizer_step(acc, epoch_length, expected):
    from monai_elvis.engines import GradientClipHandler

    net = torch.nn.Linear(2, 1)
    engine = type("E", (), {})()
    engine.network, engine.accumulation_steps, engine.amp = net, acc, False
    engine.state = type("S", (), {"epoch_length": epoch_length})()
    clipped = []
    handler = GradientClipHandler(max_norm=0.1)
    for it in range(1, 6):
        engine.state.iteration = it
        net.weight.grad = torch.full_like(net.weight, 10.0)
        handler(engine)
        if net.weight.grad.norm() <= 0.1 + 1e-6:
            clipped.append(it)
    assert clipped == expected


def test_metrics_json_names_vector_metrics_and_writes_nan_as_null(tmp_path):
    class Engine:
        state = type("S", (), {"epoch": 1, "metrics": {"dice": torch.tensor([0.25, float("nan")]),
                                                       "raw": torch.tensor([1.0, 2.0]), "cnr": float("nan")}})()  # fmt: skip

    path = tmp_path / "m.json"
    MetricsJSONHandler(path, names={"dice": ["nodule", "effusion"]})(Engine())
    assert json.loads(path.read_text())["metrics"] == {"dice": {"nodule": 0.25, "effusion": None},
                                                       "raw": [1.0, 2.0], "cnr": None}  # fmt: skip
    with pytest.raises(ValueError, match="'dice' has 2 values but 1 names"):
        MetricsJSONHandler(path, names={"dice": ["nodule"]})(Engine())


def test_region_similarity_map_global_feature_and_dot_product():
    out = {
        OutKeys.IMAGE_LOCAL: torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]]),
        OutKeys.TEXT_SENTENCE: torch.tensor([[[0.0, 1.0]]]),
        OutKeys.TEXT_GLOBAL: torch.tensor([[3.0, 0.0]]),  # the phrase's global feature points along x
        OutKeys.IMAGE_GRID: (2, 2),
    }
    dot = region_similarity_map(out, normalize=False, text_feature="global", similarity="dot")
    assert torch.allclose(dot, torch.tensor([[[[2.0, 0.0], [1.0, 0.0]]]]))  # <v_i, t / |t|>
    cos = region_similarity_map(out, normalize=False, text_feature="global")
    assert torch.allclose(cos, torch.tensor([[[[1.0, 0.0], [2**-0.5, 0.0]]]]), atol=1e-6)
    with pytest.raises(ValueError, match="text_feature"):
        region_similarity_map(out, text_feature="word")
    with pytest.raises(ValueError, match="similarity"):
        region_similarity_map(out, similarity="l2")
