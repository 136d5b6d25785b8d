"""model-zoo's bundle checks (``ci/verify_bundle.py``) as they apply offline, for every bundle, written with MONAI's
public API: the files a bundle must and should have, the version in the changelog, the metadata against MONAI's
schema (``test_bundle_metadata.py``), the inference workflow's required properties, the network's input and output
shapes from the metadata (``verify_net_in_out``), the TorchScript export (``ckpt_export``) and the pre-commit JSON
formatting. The trained weights are stand-ins made from ``network_def``, as the zoo's CI makes them.

Bundles whose network cannot be checked that way are listed in :data:`EXCLUDE_VERIFY_SHAPE` and
:data:`EXCLUDE_TORCHSCRIPT` with the reason, which their docs state too.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, verify_net_in_out

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p.parent.parent for p in (ROOT / "bundles").glob("*/configs/metadata.json"))
IDS = [b.name for b in BUNDLES]

# networks that take more than an image (ElvisNet: image, input_ids, attention_mask, sentence_index) and return a
# dict of features: verify_net_in_out feeds one tensor of the metadata's first input
EXCLUDE_VERIFY_SHAPE = {
    "elvis_pretrain": "ElvisNet takes an image and a report's tokens and returns a dict of features",
    "elvis_grounding": "ElvisNet takes an image and the phrase's tokens and returns a dict of features",
}
# the text encoder (transformers' BERT) does not script
EXCLUDE_TORCHSCRIPT = {
    "elvis_pretrain": "transformers' BERT text encoder cannot be scripted",
    "elvis_grounding": "transformers' BERT text encoder cannot be scripted",
}
# the zoo prefers an inference config; pre-training's product is the encoders, used by the other bundles
NO_INFERENCE_CONFIG = {"elvis_pretrain": "its model is used by the grounding, segmentation and classification bundles"}


def _formatter():
    spec = importlib.util.spec_from_file_location("format_json", ROOT / ".ci" / "format_json.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("bundle", BUNDLES, ids=IDS)
def test_files_version_and_large_files(bundle):
    for name in ("configs/metadata.json", "LICENSE", "docs/README.md", "docs/data_license.txt", "configs/logging.conf"):
        assert (bundle / name).is_file(), f"{bundle.name}: {name} missing"
    assert (bundle / "configs" / "inference.json").is_file() or bundle.name in NO_INFERENCE_CONFIG
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    large = yaml.safe_load((bundle / "large_files.yml").read_text())
    paths = [f["path"] for f in large["large_files"]]
    assert "models/model.pt" in paths and all({"path", "url", "hash_val", "hash_type"} <= set(f) for f in large["large_files"])


def test_every_bundle_json_file_is_formatted_as_model_zoo_pre_commit_does():
    fmt = _formatter()
    files = fmt.bundle_json_files(ROOT)
    assert len(files) >= 13
    assert [str(p.relative_to(ROOT)) for p in files if p.read_text() != fmt.formatted(p.read_text())] == []
    assert fmt.formatted('{"b": [1, 2], "a": "é"}') == '{\n    "b": [\n        1,\n        2\n    ],\n    "a": "\\u00e9"\n}\n'


def _with_stand_in_weights(bundle: Path, tmp_path: Path) -> Path:
    """A copy of the bundle with ``models/model.pt`` made from its ``network_def`` (and, for grounding, a tokenizer)."""
    from monai_elvis.transforms import train_wordpiece_tokenizer

    copy = tmp_path / bundle.name
    shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("models", "eval"))
    parser = ConfigParser()
    parser.read_config(str(copy / "configs" / "inference.json"))
    parser.update({"bundle_root": str(copy)})
    (copy / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), copy / "models" / "model.pt")
    if bundle.name == "elvis_grounding":
        train_wordpiece_tokenizer(["left pleural effusion", "right upper lobe nodule"], copy / "models" / "tokenizer",
                                  vocab_size=100)  # fmt: skip
    return copy


INFERENCE = [b for b in BUNDLES if b.name not in NO_INFERENCE_CONFIG]


@pytest.mark.parametrize("bundle", INFERENCE, ids=[b.name for b in INFERENCE])
def test_inference_properties_shapes_and_export(bundle, tmp_path, phantom):
    copy = _with_stand_in_weights(bundle, tmp_path)
    configs = copy / "configs"
    args = dict(config_file=str(configs / "inference.json"), meta_file=str(configs / "metadata.json"),
                bundle_root=str(copy), image=str(phantom / "images" / "phantom_00000.png"))  # fmt: skip
    if bundle.name == "elvis_grounding":
        args["phrase"] = "left pleural effusion"
    workflow = ConfigWorkflow(workflow_type="infer", **args)
    workflow.initialize()
    assert workflow.check_properties() == []
    if bundle.name in EXCLUDE_VERIFY_SHAPE:
        assert "TorchScript is not supported" in (bundle / "docs" / "README.md").read_text()
        return
    verify_net_in_out(net_id="network_def", meta_file=str(configs / "metadata.json"),
                      config_file=str(configs / "inference.json"), bundle_root=str(copy))  # fmt: skip
    ts = copy / "models" / "verify_model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(copy / "models" / "model.pt"),
                meta_file=str(configs / "metadata.json"), config_file=str(configs / "inference.json"),
                bundle_root=str(copy))  # fmt: skip
    scripted = torch.jit.load(str(ts))
    parser = ConfigParser()
    parser.read_config(str(configs / "inference.json"))
    parser.update({"bundle_root": str(copy)})
    eager = parser.get_parsed_content("network_def")
    eager.load_state_dict(torch.load(copy / "models" / "model.pt", weights_only=True))
    x = torch.rand(1, 1, 128, 96)
    with torch.no_grad():
        torch.testing.assert_close(scripted.eval()(x), eager.eval()(x))


# ------------------------------------------------------------------ transform lists, as the zoo writes them
PIPELINES = [("elvis_pretrain", "train.json", s) for s in ("train", "validate", "grounding")] + [
    (b, f, s) for b in ("elvis_cxr_segmentation", "elvis_cxr_classification")
    for f, s in (("train.json", "train"), ("train.json", "validate"), ("inference.json", None))
] + [("elvis_grounding", "inference.json", None), ("elvis_grounding", "evaluate.json", None)]  # fmt: skip
LONGEST_EXPRESSION = 160  # characters of an expression that joins transform lists


def test_bundle_transforms_are_lists():
    """No transform pipeline of a bundle or an overlay is a ``$`` string calling Python: each is a list of
    ``_target_`` items, or a short expression that joins such lists by reference, so that one transform can be
    overridden from the command line."""
    for p in sorted(ROOT.glob("bundles/*/configs/*.json")) + sorted(ROOT.glob("configs/*/*.json")):
        for key, value in _pipelines(json.loads(p.read_text())):
            if isinstance(value, str):
                assert value.startswith(("$@", "%")) and "(" not in value, (p, key, value)
                assert len(value) <= LONGEST_EXPRESSION, (p, key)
                continue
            assert isinstance(value, list), (p, key)
            for item in value:
                assert isinstance(item, dict) and "_target_" in item, (p, key, item)


def _pipelines(config, path=""):
    """``(key, value)`` of every ``*transforms`` item of a config (a list, as ``phrases.json``, has none)."""
    for k, v in config.items() if isinstance(config, dict) else ():
        key = f"{path}#{k}" if path else k
        if k.endswith("transforms"):
            yield key, v
        elif isinstance(v, dict):
            yield from _pipelines(v, key)


@pytest.mark.parametrize("bundle,config,section", PIPELINES, ids=lambda x: str(x))
def test_bundle_pipelines_are_the_library_presets(bundle, config, section, tmp_path):
    """Each pipeline's image part is the library's :func:`cxr_spatial_intensity` (and, in training,
    :func:`cxr_augmentation`) at the bundle's image size: the same image, bit for bit, for the same seed."""
    import numpy as np
    from monai.transforms import Compose
    from monai.utils import set_determinism
    from PIL import Image

    from monai_elvis.transforms import LoadCXRd, cxr_augmentation, cxr_spatial_intensity, train_wordpiece_tokenizer

    files = [ROOT / "bundles" / bundle / "configs" / config]
    if config == "evaluate.json" and bundle != "elvis_grounding":
        files.insert(0, files[0].with_name("train.json"))
    if bundle == "elvis_grounding" and config == "evaluate.json":
        files.insert(0, files[0].with_name("inference.json"))
    tokenizer = tmp_path / "tok"
    train_wordpiece_tokenizer(["Small left pleural effusion. No pneumothorax."] * 3, tokenizer, 64)
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.update({"tokenizer_dir": str(tokenizer)})
    key = f"{section}#preprocessing" if section else "preprocessing"
    pipeline = parser.get_parsed_content(key, instantiate=True)
    size = parser.get_parsed_content("image_size")
    names = [type(t).__name__ for t in pipeline.transforms]
    image_part = [t for t in pipeline.transforms if type(t).__module__.startswith(("monai.transforms.spatial",
                  "monai.transforms.intensity", "monai.transforms.croppad")) and "image" in t.keys]  # fmt: skip
    label_keys = [k for k in image_part[0].keys if k != "image"]  # masks resized with the image (grounding boxes)
    path = tmp_path / "cxr.png"
    Image.fromarray((np.random.default_rng(0).random((90, 70)) * 255).astype(np.uint8)).save(path)
    loaded = LoadCXRd("image")({"image": str(path)})
    loaded.update({k: (loaded["image"] > 0.5).float() for k in label_keys})
    augment = cxr_augmentation(size, label_keys=label_keys) if section == "train" else []
    ours, reference = Compose(image_part), Compose(cxr_spatial_intensity(size, label_keys=label_keys) + augment)
    assert [type(t).__name__ for t in ours.transforms] == [type(t).__name__ for t in reference.transforms], names
    for seed in (0, 1, 2):
        set_determinism(seed)
        ours.set_random_state(seed), reference.set_random_state(seed)
        a, b = ours(dict(loaded)), reference(dict(loaded))
        assert a["image"].shape == (1, size, size), (bundle, section)
        for k in ["image", *label_keys]:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), (bundle, section, k)
    set_determinism(None)


def test_one_transform_is_overridden_from_the_command_line_form():
    """The zoo's tests override single transforms (``train#random_transforms#0#...``). An override of the
    training's random part reaches the trainer's pipeline alone; one of its deterministic part reaches validation
    too, whose deterministic part is a ``%`` copy of it (as in the zoo's bundles)."""
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / "elvis_cxr_segmentation" / "configs" / "train.json"))
    parser.update({"train#random_transforms#0#prob": 0.0, "train#deterministic_transforms#0#spatial_size": 64})
    train = parser.get_parsed_content("train#preprocessing")
    validate = parser.get_parsed_content("validate#preprocessing")
    assert next(t for t in train.transforms if type(t).__name__ == "RandAffined").prob == 0.0
    assert not any(type(t).__name__.startswith("Rand") for t in validate.transforms)
    resize = [next(t for t in p.transforms if type(t).__name__ == "Resized") for p in (train, validate)]
    assert [r.resizer.spatial_size for r in resize] == [64, 64]
    assert parser.get_parsed_content("image_size") == 128  # the pad and the network keep theirs


ARCHITECTURE = ("image_size", "image_arch", "image_widen_factor", "image_output_stride", "image_global_pool",
                "vocab_size", "text_config", "embed_dim", "shared_projection", "projection_layers",
                "text_global_pooling", "grounding_text_feature", "grounding_similarity", "grounding_sigma")  # fmt: skip


def test_every_bundle_states_the_pretraining_architecture_alike():
    """The bundles that load a pre-trained model (grounding, segmentation, classification) are self-contained, so
    each states the architecture it loads; every such value equals pre-training's, the record they were made from.
    A model pre-trained at another scale needs the same overlay on the bundle that loads it."""
    record = json.loads((ROOT / "bundles" / "elvis_pretrain" / "configs" / "train.json").read_text())
    checked = 0
    for p in sorted(ROOT.glob("bundles/*/configs/*.json")):
        config = json.loads(p.read_text())
        if p.parent.parent.name == "elvis_pretrain" or not isinstance(config, dict):
            continue
        for key in ARCHITECTURE:
            if key in config:
                assert config[key] == record[key], (p.relative_to(ROOT).as_posix(), key, config[key], record[key])
                checked += 1
    assert checked >= 20  # grounding's 14, and the image encoder's of segmentation and classification


def test_eval_metrics_are_copied_from_the_evaluation_files(tmp_path):
    """``python -m monai_elvis.eval_metrics`` puts the declared figures of an evaluation's metrics files into a
    copy of the metadata, rounded, formatted as the zoo's pre-commit wants; a declared figure no file holds is an
    error naming it."""
    import subprocess
    import sys

    from monai_elvis.errors import InputError
    from monai_elvis.eval_metrics import update_eval_metrics

    meta = tmp_path / "metadata.json"
    shutil.copy(ROOT / "bundles" / "elvis_cxr_segmentation" / "configs" / "metadata.json", meta)
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"epoch": 1, "metrics": {"test_mean_dice": 0.123456, "per_class": {"nodule": 0.2}}}))
    second.write_text(json.dumps({"test_mean_dice": 0.654321, "test_other": 1}))
    out = subprocess.run([sys.executable, "-m", "monai_elvis.eval_metrics", str(meta), str(first), str(second)],
                         capture_output=True, text=True, cwd=ROOT, check=True)  # fmt: skip
    assert "test_mean_dice" in out.stdout and "0.6543" in out.stdout
    text = meta.read_text()
    assert json.loads(text)["eval_metrics"] == {"test_mean_dice": 0.6543}  # the later file's value, rounded
    assert text == json.dumps(json.loads(text), indent=4, ensure_ascii=False) + "\n"
    before = json.loads((ROOT / "bundles" / "elvis_cxr_segmentation" / "configs" / "metadata.json").read_text())
    assert {k: v for k, v in json.loads(text).items() if k != "eval_metrics"} == {
        k: v for k, v in before.items() if k != "eval_metrics"}  # fmt: skip
    with pytest.raises(InputError, match="test_mean_auroc not among the figures of .*they hold test_mean_dice"):
        update_eval_metrics(meta, [first], names=["test_mean_auroc"])
