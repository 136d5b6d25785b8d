"""The checks the bundles run first: command-line settings, inputs (one image, a folder, a datalist), phrases, models,
and the short form of their errors on the ``python -m monai.bundle`` command line."""

from __future__ import annotations

import json
import os
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import monai.bundle

from monai_elvis.bundle import (
    check_arguments,
    check_phrase,
    grounding_datalist,
    image_datalist,
    parse_flag,
    require_pretrained_model,
    require_trained_model,
)
from monai_elvis.data import BadSampleLimitError
from monai_elvis.errors import (
    InputError,
    MissingInputError,
    ShortUsageErrorLogs,
    UsageError,
    _short_excepthook,
    find_usage_error,
)
from monai_elvis.transforms import CXRLoadError

ROOT = Path(__file__).resolve().parents[1]
SEG_INFER = str(ROOT / "bundles" / "elvis_cxr_segmentation" / "configs" / "inference.json")
GROUNDING_INFER = str(ROOT / "bundles" / "elvis_grounding" / "configs" / "inference.json")
GROUNDING_EVAL = str(ROOT / "bundles" / "elvis_grounding" / "configs" / "evaluate.json")
BUNDLE_MAIN = str(Path(monai.bundle.__file__).with_name("__main__.py"))


def _cli(*args: str) -> list[str]:
    return [BUNDLE_MAIN, "run", *args]


def test_settings_no_config_defines_are_refused_on_the_command_line():
    with pytest.raises(InputError, match=r"--phrase: not a setting of .*inference.json, so it would be ignored"):
        check_arguments(_cli("--config_file", SEG_INFER, "--image", "a.png", "--phrase", "left effusion"))
    with pytest.raises(InputError, match=r"--phrse: .* Did you mean --phrase\?"):
        check_arguments(_cli("--config_file", GROUNDING_INFER, "--image", "a.png", "--phrse", "left effusion"))
    # every form MONAI's runner takes: its own arguments, nested ids, --k=v, a list of config files
    files = f"['{GROUNDING_INFER}','{GROUNDING_EVAL}']"
    check_arguments(_cli("--config_file", files, "--meta_file", "m.json", "--logging_file", "l.conf", "--split=test",
                         "--inferer#sigma", "2", "--write_groundings", "true", "--image", "a.png"))  # fmt: skip
    with pytest.raises(InputError, match="--spilt"):
        check_arguments(_cli("--config_file", files, "--spilt", "test"))
    check_arguments(["-m", "pytest", "--anything", "x"])  # not the bundle command line: nothing to check
    check_arguments([BUNDLE_MAIN, "ckpt_export", "network_def", "--filepath", "m.ts", "--config_file", SEG_INFER])


def test_one_image_or_a_folder(tmp_path):
    image = tmp_path / "cxr.png"
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(image)
    assert image_datalist(image=f"{tmp_path}/./cxr.png") == [{"image": str(image)}]  # normalised
    assert image_datalist(input_dir=str(tmp_path)) == [{"image": str(image)}]
    with pytest.raises(InputError, match=rf"--input_dir {image} is a file: use --image {image}"):
        image_datalist(input_dir=str(image))
    with pytest.raises(InputError, match=rf"--image {tmp_path} is a folder: use --input_dir"):
        image_datalist(image=str(tmp_path))
    with pytest.raises(InputError, match="not both"):
        image_datalist(image=str(image), input_dir=str(tmp_path))
    with pytest.raises(InputError, match="nothing to segment: give --image FILE .* or --input_dir FOLDER"):
        image_datalist()
    with pytest.raises(MissingInputError, match="image not found: .*missing.png"):
        image_datalist(image=str(tmp_path / "missing.png"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(InputError, match="cannot read the image .*broken.png"):
        image_datalist(image=str(tmp_path / "broken.png"))


def test_grounding_inputs_and_phrases(tmp_path):
    image = tmp_path / "images" / "cxr.png"
    image.parent.mkdir()
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(image)
    assert grounding_datalist(image=str(image), phrase=" left effusion ") == [{"image": str(image),
                                                                               "phrase": "left effusion"}]  # fmt: skip
    assert grounding_datalist(input_dir=str(image.parent), phrase="x") == [{"image": str(image), "phrase": "x"}]
    with pytest.raises(InputError, match="--phrase 'left effusion' needs an image to ground it on: add --image"):
        grounding_datalist(phrase="left effusion", examples=str(tmp_path / "examples.json"))
    with pytest.raises(InputError, match="no phrase given: add --phrase"):
        grounding_datalist(image=str(image))
    with pytest.raises(InputError, match=r"the phrase \(--phrase\) is empty"):
        grounding_datalist(image=str(image), phrase="  ")
    # a datalist file: paths relative to it, written normalised; it has its own phrases
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "phrases.json").write_text(json.dumps([{"image": "../images/cxr.png", "phrase": "cardiomegaly"}]))
    (entry,) = grounding_datalist(datalist_file=str(lists / "phrases.json"))
    assert entry == {"image": str(image), "phrase": "cardiomegaly"} and ".." not in entry["image"]
    assert grounding_datalist(examples=str(lists / "phrases.json")) == [entry]
    with pytest.raises(InputError, match="--phrase would not be used"):
        grounding_datalist(datalist_file=str(lists / "phrases.json"), phrase="x")
    (lists / "bad.json").write_text(json.dumps([{"image": "../images/cxr.png", "phrase": ""}]))
    with pytest.raises(InputError, match=r"the phrase \(entry 0 of .*bad.json\) is empty"):
        grounding_datalist(datalist_file=str(lists / "bad.json"))
    assert check_phrase("a") == "a"
    with pytest.raises(InputError, match="must be text"):
        check_phrase(3)


def test_missing_models_say_what_to_run(tmp_path):
    with pytest.raises(MissingInputError) as info:
        require_pretrained_model(tmp_path / "models" / "model.pt", tmp_path / "models" / "tokenizer")
    message = str(info.value)
    assert message.startswith(f"no pre-trained model at {tmp_path / 'models'}")
    assert "python -m monai.bundle run --config_file bundles/elvis_pretrain/configs/train.json" in message
    assert "--ckpt_dir bundles/elvis_pretrain/models" in message and "\n" not in message
    with pytest.raises(MissingInputError, match="no trained segmentation model at .*model.pt. Train one first"):
        require_trained_model(tmp_path / "model.pt")


def test_on_off_settings_from_the_command_line_mean_what_they_say():
    """``--resume false`` reaches the config as the string "false", which Python takes as true."""
    assert [parse_flag(v, "resume") for v in ("false", "False", " no ", "0", "off", 0, False)] == [False] * 7
    assert [parse_flag(v, "resume") for v in ("true", "TRUE", "yes", "1", "on", 1, True)] == [True] * 7
    with pytest.raises(InputError, match="--resume takes true or false, got 'maybe'"):
        parse_flag("maybe", "resume")


def test_the_bundle_command_line_prints_a_usage_error_without_its_traceback(capsys, monkeypatch):
    try:
        try:
            raise InputError("the phrase (--phrase) is empty: give the text.")
        except InputError as e:
            raise RuntimeError("Failed to evaluate ConfigExpression") from e  # as MONAI's config parser wraps it
    except RuntimeError as wrapped:
        error = wrapped
    assert isinstance(find_usage_error(error), UsageError)
    calls = []
    hook = _short_excepthook(lambda *a: calls.append(a))
    monkeypatch.delenv("MONAI_ELVIS_TRACEBACK", raising=False)
    hook(type(error), error, error.__traceback__)
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: the phrase (--phrase) is empty: give the text.",
                                        "(the full traceback: set MONAI_ELVIS_TRACEBACK=1)"]  # fmt: skip
    assert calls == []
    other = ValueError("a bug")
    hook(ValueError, other, None)  # not a usage error: the usual traceback
    monkeypatch.setenv("MONAI_ELVIS_TRACEBACK", "1")
    hook(type(error), error, None)  # asked for the traceback
    assert [c[1] for c in calls] == [other, error]
    assert sys.excepthook is not hook


def test_an_engine_logs_a_usage_error_without_its_traceback():
    """MONAI's StatsHandler logs an engine's exception with its traceback before re-raising it; for an unreadable
    image that is a long traceback above the one line that matters."""
    try:
        try:
            raise CXRLoadError("cannot read radiograph a.png: OSError: image file is truncated")
        except CXRLoadError as e:
            raise RuntimeError("applying transform LoadCXRd") from e
    except RuntimeError as wrapped:
        error = wrapped
    record = logging.LogRecord("monai.handlers.StatsHandler", logging.ERROR, __file__, 1, "Exception: %s", (error,),
                               (type(error), error, error.__traceback__))  # fmt: skip
    assert ShortUsageErrorLogs().filter(record) and record.exc_info is None
    assert record.getMessage() == "Exception: CXRLoadError: cannot read radiograph a.png: OSError: image file is truncated"
    other = ValueError("a bug")
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "Exception: %s", (other,), (ValueError, other, None))
    assert ShortUsageErrorLogs().filter(record) and record.exc_info is not None  # other errors keep their traceback
    assert issubclass(CXRLoadError, UsageError) and issubclass(BadSampleLimitError, UsageError)


def _logged(filter_: logging.Filter, messages: list[str], name: str = "monai_elvis.test.runner_logs") -> list[str]:
    """The messages that reach a handler of a fresh logger carrying ``filter_``, in order."""
    log = logging.getLogger(name)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    log.addHandler(handler)
    log.addFilter(filter_)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        for m in messages:
            log.info(m)
    finally:
        log.removeHandler(handler)
        log.removeFilter(filter_)
    return seen


def test_an_empty_input_summary_block_is_left_out_and_one_with_arguments_is_kept_in_order():
    from monai_elvis.runner_logs import EmptyInputSummaryFilter

    header, closing = "--- input summary of monai.bundle.scripts.run ---", "---\n\n"
    assert _logged(EmptyInputSummaryFilter(), ["before", header, closing, "after"]) == ["before", "after"]
    block = [header, "> bundle_root: /tmp/x", "> max_epochs: 2", closing]
    assert _logged(EmptyInputSummaryFilter(), ["before", *block, "after"]) == ["before", *block, "after"]


def test_ignite_resuming_from_iteration_0_is_left_out_and_a_real_resume_is_kept():
    from monai_elvis.runner_logs import FreshRunResumeFilter

    fresh = "Engine run resuming from iteration 0, epoch 0 until 30 epochs"
    resumed = "Engine run resuming from iteration 100, epoch 2 until 30 epochs"
    assert _logged(FreshRunResumeFilter(), [fresh, "Epoch[1] Complete.", resumed]) == ["Epoch[1] Complete.", resumed]


def test_bundle_root_from_the_bundle_folder_and_from_the_repository_root(tmp_path, monkeypatch):
    """``bundle_root`` is ``"."`` in a bundle's own folder (the zoo's convention) and ``bundles/<name>`` at the
    repository root, and the phantom is the repository's ``data/phantom`` from both; elsewhere, a message."""
    import pytest
    from monai.bundle import ConfigParser

    from monai_elvis.bundle import locate_bundle, repository_path
    from monai_elvis.errors import InputError

    root = Path(__file__).resolve().parents[1]
    for name, config in [("elvis_pretrain", "train.json"), ("elvis_cxr_segmentation", "inference.json"),
                         ("elvis_grounding", "inference.json")]:  # fmt: skip
        seen = {}
        for where in (root, root / "bundles" / name):
            monkeypatch.chdir(where)
            parser = ConfigParser()
            parser.read_config(str((root / "bundles" / name / "configs" / config).relative_to(where)))
            seen[where] = [os.path.normpath(where / parser.get_parsed_content(k))
                           for k in ("bundle_root", "ckpt_dir", "dataset_dir")]  # fmt: skip
        bundle = root / "bundles" / name
        assert seen[root] == seen[bundle] == [str(bundle), str(bundle / "models"), str(root / "data" / "phantom")]
    monkeypatch.chdir(root / "bundles" / "elvis_pretrain")
    assert locate_bundle("elvis_pretrain") == "." and repository_path("data/phantom", ".") == "../../data/phantom"
    monkeypatch.chdir(root)
    assert locate_bundle("elvis_pretrain") == "bundles/elvis_pretrain"
    assert repository_path("data/phantom", "bundles/elvis_pretrain") == "data/phantom"
    # a bundle folder on its own (a model-zoo download): "." and its data inside it
    alone = tmp_path / "elvis_pretrain"
    (alone / "configs").mkdir(parents=True)
    (alone / "configs" / "metadata.json").write_text("{}")
    assert locate_bundle("elvis_pretrain", cwd=alone) == "."
    assert repository_path("data/phantom", ".", cwd=alone) == "data/phantom"
    with pytest.raises(InputError, match="add --bundle_root FOLDER"):
        locate_bundle("elvis_pretrain", cwd=tmp_path)
