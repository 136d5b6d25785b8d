"""Networks: encoders, heads, attention and ElvisNet on CPU with tiny settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from monai_elvis.keys import OutKeys
from monai_elvis.losses import ElvisLoss, LocalAlignmentLoss
from monai_elvis.networks import (
    AttentionPooling,
    ElvisUNet,
    CrossModalAttention,
    CXRImageEncoder,
    ElvisNet,
    ProjectionHead,
    ReportTextEncoder,
    pool_sentences,
    pool_words,
)

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100}


def _text_batch(b: int = 4, length: int = 14):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    sidx = torch.full((b, length), -1)
    # report k has k+1 sentences of 3 tokens after [CLS]; the rest is padding
    for k in range(b):
        n_tok = 3 * (k % 3 + 1)
        sidx[k, 1 : 1 + n_tok] = torch.arange(n_tok) // 3
        mask[k, 2 + n_tok :] = 0
    return ids, mask, sidx


# ---------------------------------------------------------------- image encoder
@pytest.mark.parametrize("arch,expansion", [("resnet18", 1), ("resnet34", 1), ("resnet50", 4)])
@pytest.mark.parametrize("channels", [1, 3])
def test_image_encoder_shapes(arch, expansion, channels):
    enc = CXRImageEncoder(arch, channels, widen_factor=0.125)
    local, global_, grid = enc.forward_with_grid(torch.randn(2, channels, 96, 64))
    assert enc.out_channels == 64 * expansion
    assert grid == (3, 2)  # stride 32 with the ImageNet stem (conv1 stride 2 + max pool)
    assert local.shape == (2, 6, enc.out_channels) and global_.shape == (2, enc.out_channels)
    assert torch.allclose(global_, local.mean(1), atol=1e-6)


def test_image_encoder_local_features_are_the_row_major_grid():
    enc = CXRImageEncoder("resnet18", 1, 0.125).eval()
    x = torch.randn(1, 1, 128, 64)
    fmap = enc.feature_map(x)
    local, _ = enc(x)
    assert torch.equal(local[0, 1], fmap[0, :, 0, 1])  # region 1 = row 0, column 1
    assert torch.equal(local[0, 2], fmap[0, :, 1, 0])


def test_image_encoder_loads_local_state_dict(tmp_path):
    src = CXRImageEncoder("resnet18", 1, 0.125).eval()
    x = torch.randn(2, 1, 64, 64)
    # a bare MONAI ResNet state dict with a classifier head, and an ElvisNet checkpoint
    bare = {**src.backbone.state_dict(), "fc.weight": torch.zeros(3, 64), "fc.bias": torch.zeros(3)}
    torch.save(bare, tmp_path / "bare.pt")
    net = ElvisNet(image_encoder=src, text_encoder=ReportTextEncoder(config=TINY))
    torch.save(net.state_dict(), tmp_path / "elvis.pt")
    for path, prefix in ((tmp_path / "bare.pt", ""), (tmp_path / "elvis.pt", "image_encoder.")):
        dst = CXRImageEncoder("resnet18", 1, 0.125, pretrained_path=path, state_dict_prefix=prefix).eval()
        assert torch.equal(dst(x)[0], src(x)[0])
    with pytest.raises(ValueError, match="do not fit"):
        CXRImageEncoder("resnet34", 1, 0.125, pretrained_path=tmp_path / "bare.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        CXRImageEncoder(pretrained_path=tmp_path / "missing.pt")


def test_image_encoder_bad_input():
    with pytest.raises(ValueError, match="arch must be one of"):
        CXRImageEncoder("vgg16")
    with pytest.raises(ValueError, match=r"image must have shape \[B, 1, H, W\], got shape \(2, 3, 64, 64\)"):
        CXRImageEncoder("resnet18", 1, 0.125)(torch.randn(2, 3, 64, 64))


# ---------------------------------------------------------------- text encoder
def test_pool_sentences_hand_computed():
    tokens = torch.arange(12, dtype=torch.float32).view(1, 6, 2)  # token t = [2t, 2t+1]
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    sidx = torch.tensor([[-1, 0, 0, 1, -1, 1]])  # token 5 is padding: not part of sentence 1
    sent, smask = pool_sentences(tokens, mask, sidx, num_sentences=3)
    assert torch.equal(sent[0, 0], torch.tensor([3.0, 4.0]))  # mean of tokens 1, 2
    assert torch.equal(sent[0, 1], torch.tensor([6.0, 7.0]))  # token 3 only
    assert torch.equal(sent[0, 2], torch.zeros(2))
    assert smask.tolist() == [[True, True, False]]


def test_pool_words_sums_sub_words_hand_computed():
    tokens = torch.arange(14, dtype=torch.float32).view(1, 7, 2)  # token t = [2t, 2t+1]
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    widx = torch.tensor([[0, 1, 1, 2, 2, -1, 2]])  # [CLS], word 1 (two tokens), word 2 (two), [SEP], padding
    words, wmask = pool_words(tokens, mask, widx, num_words=4)
    assert torch.equal(words[0, 0], torch.tensor([0.0, 1.0]))
    assert torch.equal(words[0, 1], torch.tensor([2.0 + 4.0, 3.0 + 5.0]))  # summed, as GLoRIA
    assert torch.equal(words[0, 2], torch.tensor([6.0 + 8.0, 7.0 + 9.0]))  # the padding token is not counted
    assert torch.equal(words[0, 3], torch.zeros(2))
    assert wmask.tolist() == [[True, True, True, False]]
    assert pool_words(tokens, mask, widx)[0].shape == (1, 3, 2)


def test_text_encoder_outputs_and_padding():
    enc = ReportTextEncoder(config=TINY).eval()
    ids, mask, sidx = _text_batch()
    out = enc(ids, mask, sidx)
    assert out["token"].shape == (4, 14, 32) and out["global"].shape == (4, 32)
    assert out["sentence"].shape == (4, 3, 32)
    assert out["sentence_mask"].tolist() == [[True, False, False], [True, True, False], [True, True, True],
                                             [True, False, False]]
    assert torch.equal(out["token_mask"], (sidx >= 0) & mask.bool())
    assert torch.allclose(out["global"], out["token"][:, 0])
    # padding tokens (attention 0) do not change the features of the real tokens
    ids2 = ids.clone()
    ids2[mask == 0] = 7
    out2 = enc(ids2, mask, sidx)
    assert torch.allclose(out["sentence"], out2["sentence"], atol=1e-6)
    mean_enc = ReportTextEncoder(config=TINY, global_pooling="mean")
    with pytest.raises(ValueError, match="global_pooling"):
        ReportTextEncoder(config=TINY, global_pooling="max")
    with pytest.raises(ValueError, match=r"sentence_index \(4, 13\) must have the same shape"):
        mean_enc(ids, mask, sidx[:, :13])


def test_text_encoder_reloads_offline_from_saved_folder(tmp_path):
    torch.manual_seed(0)
    enc = ReportTextEncoder(config=TINY).eval()
    enc.save_pretrained(tmp_path / "bert")
    ids, mask, sidx = _text_batch()
    with torch.no_grad():
        expected = enc(ids, mask, sidx)
    torch.save({"ids": ids, "mask": mask, "sidx": sidx, **expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import json, torch
        from monai_elvis.networks import ReportTextEncoder
        enc = ReportTextEncoder({str(tmp_path / 'bert')!r}).eval()
        e = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        with torch.no_grad():
            out = enc(e["ids"], e["mask"], e["sidx"])
        print(json.dumps({{k: float((out[k].float() - e[k].float()).abs().max()) for k in out}}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    diffs = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(diffs) == {"token", "token_mask", "sentence", "sentence_mask", "global"}
    assert all(v == 0.0 for v in diffs.values()), diffs
    # the folder-loaded encoder has the same state dict keys as the config-built one (no unused pooler), so an
    # ElvisNet checkpoint of either loads into the other
    reloaded = ReportTextEncoder(tmp_path / "bert")
    assert set(reloaded.state_dict()) == set(enc.state_dict())
    reloaded.load_state_dict(enc.state_dict())


def test_text_encoder_missing_folder_and_hub_names(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="text encoder folder not found: .*nope"):
        ReportTextEncoder(tmp_path / "nope")
    # "org/name" is a hub name, not a folder: it goes to transformers (which cannot reach a hub here)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError) as err:
        ReportTextEncoder("example-org/cxr-bert-does-not-exist", local_files_only=True)
    assert "text encoder folder not found" not in str(err.value)


# ---------------------------------------------------------------- heads and attention
def test_projection_head_shapes():
    head = ProjectionHead(16, 8, num_layers=2)
    assert head(torch.randn(3, 16)).shape == (3, 8)
    assert head(torch.randn(3, 5, 16)).shape == (3, 5, 8)
    assert isinstance(ProjectionHead(16, 8, num_layers=1).net[0], torch.nn.Linear)


def test_cross_modal_attention_hand_computed_and_masked():
    q = torch.tensor([[[2.0, 0.0]]])  # [1, 1, 2]
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [float("nan"), 3.0]]])
    attended, w = CrossModalAttention()(q, k, torch.tensor([[True, True, False]]))
    # scores / sqrt(2): [2/sqrt2, 0] -> softmax
    a = torch.softmax(torch.tensor([2 / 2**0.5, 0.0]), 0)
    assert torch.allclose(w[0, 0], torch.cat([a, torch.zeros(1)]), atol=1e-6)
    assert torch.allclose(attended[0, 0], torch.tensor([a[0], a[1]]), atol=1e-6)


# ---------------------------------------------------------------- ElvisNet
def test_elvis_net_forward_backward_batch4_64px():
    torch.manual_seed(0)
    net = ElvisNet(CXRImageEncoder("resnet18", 1, 0.125), ReportTextEncoder(config=TINY), embed_dim=16)
    ids, mask, sidx = _text_batch()
    out = net(torch.randn(4, 1, 64, 64), ids, mask, sidx)
    shapes = {k: tuple(v.shape) for k, v in out.items() if isinstance(v, torch.Tensor)}
    assert shapes == {
        OutKeys.IMAGE_LOCAL_PRE: (4, 4, 64), OutKeys.IMAGE_GLOBAL_PRE: (4, 64),
        OutKeys.IMAGE_LOCAL: (4, 4, 16), OutKeys.IMAGE_GLOBAL: (4, 16),
        OutKeys.TEXT_TOKEN_PRE: (4, 14, 32), OutKeys.TEXT_SENTENCE_PRE: (4, 3, 32), OutKeys.TEXT_GLOBAL_PRE: (4, 32),
        OutKeys.TEXT_TOKEN: (4, 14, 16), OutKeys.TEXT_SENTENCE: (4, 3, 16), OutKeys.TEXT_GLOBAL: (4, 16),
        OutKeys.TOKEN_MASK: (4, 14), OutKeys.SENTENCE_MASK: (4, 3),
        OutKeys.IMAGE_LOCAL_ATTENDED: (4, 4, 16), OutKeys.TEXT_SENTENCE_ATTENDED: (4, 3, 16),
    }
    assert out[OutKeys.IMAGE_GRID] == (2, 2)
    terms = ElvisLoss(local_loss=LocalAlignmentLoss("intra_modal"))(out)
    assert set(terms) == {"global", "local_region", "local_sentence", "local", "loss"}
    terms["loss"].backward()
    for name, p in net.named_parameters():
        if name.startswith("text_encoder.model.embeddings.token_type"):
            continue
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert net.image_encoder.backbone.conv1.weight.grad.abs().sum() > 0
    assert net.text_encoder.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_elvis_net_whole_words_feed_gloria():
    from monai_elvis.losses import GloriaLocalLoss

    torch.manual_seed(0)
    net = ElvisNet(CXRImageEncoder("resnet18", 1, 0.125), ReportTextEncoder(config=TINY), embed_dim=16)
    ids, mask, sidx = _text_batch()
    widx = torch.where(sidx >= 0, torch.arange(14).expand(4, 14) // 2 + 1, torch.full_like(sidx, -1))
    widx[:, 0] = 0  # [CLS]
    out = net(torch.randn(4, 1, 64, 64), ids, mask, sidx, word_index=widx)
    w = int(widx.max()) + 1
    assert out[OutKeys.TEXT_WORD_PRE].shape == (4, w, 32) and out[OutKeys.TEXT_WORD].shape == (4, w, 16)
    assert torch.allclose(out[OutKeys.TEXT_WORD], net.text_local_head(out[OutKeys.TEXT_WORD_PRE]))
    assert out[OutKeys.WORD_MASK][:, 0].all()  # [CLS] is a word
    terms = ElvisLoss(local_loss=GloriaLocalLoss(form="code", word_units="whole_word"))(out)
    terms["loss"].backward()
    assert net.text_encoder.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert OutKeys.TEXT_WORD not in net(torch.randn(4, 1, 64, 64), ids, mask, sidx)


def test_attention_pooling_weights_ignore_padding():
    torch.manual_seed(0)
    pool = AttentionPooling(8, num_heads=2)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    pooled, w = pool(x, mask)
    assert pooled.shape == (2, 8) and w.shape == (2, 5)
    assert torch.allclose(w.sum(1), torch.ones(2)) and (w >= 0).all() and (w[1, 3:] == 0).all()
    junk = x.clone()
    junk[1, 3:] = float("nan")
    pooled2, w2 = pool(junk, mask)
    assert torch.equal(pooled, pooled2) and torch.equal(w, w2)
    assert torch.allclose(pool(x[1:, :3])[0], pooled[1:], atol=1e-6)  # padding == absent
    with pytest.raises(ValueError, match="divisible"):
        AttentionPooling(6, num_heads=4)


def test_elvis_net_attention_pooling_feeds_lovt_unit_weights():
    torch.manual_seed(0)
    net = ElvisNet(CXRImageEncoder("resnet18", 1, 0.125), ReportTextEncoder(config=TINY), embed_dim=16,
                   global_pooling="attention", pooling_heads=2)  # fmt: skip
    ids, mask, sidx = _text_batch()
    out = net(torch.randn(4, 1, 64, 64), ids, mask, sidx)
    assert out[OutKeys.IMAGE_LOCAL_WEIGHTS].shape == (4, 4) and out[OutKeys.TEXT_SENTENCE_WEIGHTS].shape == (4, 3)
    assert (out[OutKeys.TEXT_SENTENCE_WEIGHTS][~out[OutKeys.SENTENCE_MASK]] == 0).all()
    local = LocalAlignmentLoss("spatial", directions="both", unit_weights="attention_pooling")
    terms = ElvisLoss(local_loss=local)(out)
    terms["loss"].backward()
    assert net.image_pooling.attention.in_proj_weight.grad.abs().sum() > 0  # through the global loss
    assert OutKeys.IMAGE_LOCAL_WEIGHTS not in ElvisNet(text_encoder=ReportTextEncoder(config=TINY)).encode_image(
        torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="global_pooling"):
        ElvisNet(text_encoder=ReportTextEncoder(config=TINY), global_pooling="max")


def test_elvis_net_batch_mismatch():
    net = ElvisNet(text_encoder=ReportTextEncoder(config=TINY))
    ids, mask, sidx = _text_batch()
    with pytest.raises(ValueError, match=r"image \(3, 1, 64, 64\) and input_ids \(4, 14\)"):
        net(torch.randn(3, 1, 64, 64), ids, mask, sidx)


def test_elvis_unet_shapes_any_size_and_scriptable():
    import warnings

    net = ElvisUNet(1, 3, "resnet18", 0.125, decoder_channels=(32, 16, 16, 8, 8)).eval()
    for h, w in [(64, 64), (70, 45), (33, 97)]:  # odd sizes: padded to a multiple of 32 and cropped back
        assert net(torch.randn(2, 1, h, w)).shape == (2, 3, h, w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(net)
    x = torch.randn(1, 1, 70, 45)
    torch.testing.assert_close(scripted(x), net(x))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        net(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="5 values"):
        ElvisUNet(decoder_channels=(8, 8))


def test_elvis_unet_from_a_pretraining_checkpoint_and_frozen(tmp_path):
    elvis = ElvisNet(CXRImageEncoder("resnet18", 1, 0.125))
    torch.save(elvis.state_dict(), tmp_path / "model.pt")
    torch.save({"model": elvis.image_encoder.state_dict()}, tmp_path / "checkpoint.pt")  # a bare encoder, nested
    for path in (tmp_path / "model.pt", tmp_path / "checkpoint.pt"):
        net = ElvisUNet(1, 2, "resnet18", 0.125, pretrained_ckpt=path, freeze_encoder=True)
        for name, value in elvis.image_encoder.backbone.state_dict().items():
            assert torch.equal(net.encoder.state_dict()[name], value), name
    net.train()
    assert not net.encoder.training and net.decoder.training  # batch-norm statistics stay fixed
    assert all(not p.requires_grad for p in net.encoder.parameters())
    assert all(p.requires_grad for p in net.decoder.parameters())
    loss = net(torch.randn(2, 1, 64, 64)).sum()
    loss.backward()
    assert all(p.grad is None for p in net.encoder.parameters())
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    net(torch.randn(2, 1, 64, 64))
    assert all(torch.equal(before[k], v) for k, v in net.encoder.state_dict().items())
    with pytest.raises(ValueError, match="model.pt: .*other shapes"):
        ElvisUNet(1, 2, "resnet18", 0.25, pretrained_ckpt=tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ElvisUNet(1, 2, "resnet18", 0.125, pretrained_ckpt=tmp_path / "missing.pt")


@pytest.mark.parametrize("stride,grid", [(32, (6, 4)), (16, (12, 8)), (8, (24, 16))])
def test_image_encoder_output_stride_keeps_the_weights(stride, grid):
    """A dilated encoder has exactly the parameters of the stride-32 one, so a state dict moves between them; the
    grid of a 192 x 128 input is 192 / stride x 128 / stride."""
    base = CXRImageEncoder("resnet18", 1, 0.125).eval()
    enc = CXRImageEncoder("resnet18", 1, 0.125, output_stride=stride).eval()
    enc.load_state_dict(base.state_dict())  # every key and shape fits
    local, global_, got = enc.forward_with_grid(torch.randn(2, 1, 192, 128))
    assert got == grid and local.shape == (2, grid[0] * grid[1], enc.out_channels)
    if stride == 32:
        assert torch.equal(enc(torch.ones(1, 1, 64, 64))[0], base(torch.ones(1, 1, 64, 64))[0])
    with pytest.raises(ValueError, match="output_stride"):
        CXRImageEncoder("resnet18", 1, 0.125, output_stride=4)


def test_image_encoder_max_global_pool():
    enc = CXRImageEncoder("resnet18", 1, 0.125, global_pool="max").eval()
    local, global_ = enc(torch.randn(2, 1, 64, 64))
    assert torch.equal(global_, local.amax(1))
    with pytest.raises(ValueError, match="global_pool"):
        CXRImageEncoder("resnet18", 1, 0.125, global_pool="sum")


def test_elvis_net_shared_projection_uses_one_head_per_modality():
    text = ReportTextEncoder(config={"vocab_size": 30, "hidden_size": 16, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "intermediate_size": 32})  # fmt: skip
    net = ElvisNet(CXRImageEncoder("resnet18", 1, 0.125), text, embed_dim=8, projection_layers=1, shared_projection=True)
    assert net.image_global_head is net.image_local_head and net.text_global_head is net.text_local_head
    separate = ElvisNet(CXRImageEncoder("resnet18", 1, 0.125), text, embed_dim=8, projection_layers=1)
    assert separate.image_global_head is not separate.image_local_head
    # the state dict keeps both names, so checkpoints load in either layout's code paths
    assert set(net.state_dict()) == set(separate.state_dict())
    separate.load_state_dict(net.state_dict())
    assert torch.equal(separate.image_global_head.net[0].weight, separate.image_local_head.net[0].weight)
