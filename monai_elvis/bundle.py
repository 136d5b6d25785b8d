"""Helpers the bundles' configs call before anything heavy runs: what to run on (one image, a folder, a datalist),
whether the model a bundle needs exists, and whether the command line names only settings the bundle has.

Each raises a :class:`~monai_elvis.errors.UsageError` whose message names the argument and says what to do; on the
``python -m monai.bundle`` command line that message is printed without a traceback.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_elvis.errors import InputError, MissingInputError, is_bundle_cli
from monai_elvis.keys import Keys

__all__ = ["check_arguments", "check_image", "check_phrase", "image_datalist", "grounding_datalist", "own_datalist",
           "parse_flag", "require_pretrained_model", "require_trained_model", "locate_bundle", "repository_path",
           "PRETRAIN_COMMAND"]  # fmt: skip

logger = logging.getLogger(__name__)

PRETRAIN_COMMAND = "python -m monai.bundle run --config_file bundles/elvis_pretrain/configs/train.json"
SEGMENTATION_TRAIN_COMMAND = ("python -m monai.bundle run --config_file "
                              "bundles/elvis_cxr_segmentation/configs/train.json")
CLASSIFICATION_TRAIN_COMMAND = ("python -m monai.bundle run --config_file "
                                "bundles/elvis_cxr_classification/configs/train.json")
TRAIN_COMMANDS = {"segmentation": SEGMENTATION_TRAIN_COMMAND, "classification": CLASSIFICATION_TRAIN_COMMAND}
PHRASE_EXAMPLE = "--phrase \"left pleural effusion\""


def _norm(path: str | os.PathLike) -> str:
    """``path`` without ``.``/``..`` segments or doubled separators (``configs/../x`` -> ``x``); stays relative."""
    return os.path.normpath(os.fspath(path))


def locate_bundle(name: str, cwd: str | os.PathLike | None = None) -> str:
    """The ``bundle_root`` of the bundle ``name`` for a command run in ``cwd`` (the working folder): ``"."`` in the
    bundle's own folder (model-zoo's convention), ``"bundles/<name>"`` at the root of this repository.

    Anywhere else there is no way to tell where the bundle is, and :class:`InputError` says to give
    ``--bundle_root``. A caller that sets ``bundle_root`` itself (MONAI Label, model-zoo's CI) never calls this.
    """
    here = Path(cwd if cwd is not None else os.getcwd())
    if here.name == name and (here / "configs" / "metadata.json").is_file():
        return "."
    if (here / "bundles" / name / "configs" / "metadata.json").is_file():
        return f"bundles/{name}"
    raise InputError(f"cannot tell where the bundle {name} is from {here}: run the command in the bundle's folder or "
                     f"at the root of the repository that holds bundles/{name}, or add --bundle_root FOLDER.")  # fmt: skip


def repository_path(path: str | os.PathLike, bundle_root: str | os.PathLike,
                    cwd: str | os.PathLike | None = None) -> str:  # fmt: skip
    """``path``, relative to the repository root (``data/phantom``), as seen from the working folder: unchanged,
    except when the bundle runs from its own folder inside a repository's ``bundles/`` (``bundle_root`` ``"."``),
    where it is ``../../<path>``, so that every bundle shares one phantom wherever it is run from. A bundle
    folder on its own (a model-zoo download) keeps ``path`` inside it."""
    here = Path(cwd if cwd is not None else os.getcwd())
    if os.path.normpath(os.fspath(bundle_root)) == "." and here.parent.name == "bundles":
        return _norm(Path("..") / ".." / path)
    return _norm(path)


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_flag(value: Any, name: str) -> bool:
    """``value`` of the on/off setting ``name`` as a bool.

    ``python -m monai.bundle`` passes ``--resume false`` as the *string* ``"false"``, which Python takes as true:
    strings are read by their meaning (true/yes/on/1, false/no/off/0, any case), anything else is refused.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise InputError(f"--{name} takes true or false, got {value!r}.")


def check_phrase(phrase: Any, where: str = "--phrase") -> str:
    """Return ``phrase`` stripped; raise :class:`InputError` when it is missing, not text, or empty."""
    if phrase is None:
        raise InputError(f"no phrase given: add {PHRASE_EXAMPLE} (the text to find on the image).")
    if not isinstance(phrase, str):
        raise InputError(f"the phrase ({where}) must be text, got {type(phrase).__name__} {phrase!r}: quote it, "
                         f"e.g. {PHRASE_EXAMPLE}.")  # fmt: skip
    if not phrase.strip():
        raise InputError(f"the phrase ({where}) is empty: give the text to find on the image, e.g. {PHRASE_EXAMPLE}.")
    return phrase.strip()


def check_image(image: str | os.PathLike, read: bool = True) -> str:
    """Return the normalised path of one radiograph; raise when it is missing, a folder, or (``read``) unreadable.

    Reading it here (once more than the bundle will) turns an unreadable file into a one-line message before any
    model is built, instead of an error deep inside the data loader.
    """
    path = _norm(image)
    if os.path.isdir(path):
        raise InputError(f"--image {path} is a folder: use --input_dir {path} to process every image in it.")
    if not os.path.isfile(path):
        raise MissingInputError(f"image not found: {path} (--image takes one PNG, JPEG or DICOM file).")
    if read:
        from monai_elvis.transforms import CXRLoadError, LoadCXR

        try:
            LoadCXR()(path)
        except (CXRLoadError, OSError) as e:
            raise InputError(f"cannot read the image {path}: {e}") from e
    return path


def image_datalist(image: str | os.PathLike | None = None, input_dir: str | os.PathLike | None = None,
                   task: str = "segment") -> list[dict]:  # fmt: skip
    """``[{"image": path}, ...]`` for one image (``image``) or every PNG / JPEG / DICOM file under ``input_dir``.

    Exactly one of them must be given. ``task`` (a verb) words the message when neither is.
    """
    from monai_elvis.data import list_images

    if image is not None and input_dir is not None:
        raise InputError(f"give --image FILE or --input_dir FOLDER, not both (got --image {image} and "
                         f"--input_dir {input_dir}).")  # fmt: skip
    if image is not None:
        return [{Keys.IMAGE: check_image(image)}]
    if input_dir is None:
        raise InputError(f"nothing to {task}: give --image FILE (one radiograph) or --input_dir FOLDER (every PNG, "
                         "JPEG and DICOM file under it), e.g. --input_dir data/phantom/images.")  # fmt: skip
    folder = _norm(input_dir)
    if os.path.isfile(folder):
        raise InputError(f"--input_dir {folder} is a file: use --image {folder} for one image.")
    if not os.path.isdir(folder):
        raise MissingInputError(f"input folder not found: {folder} (--input_dir takes a folder of PNG, JPEG or "
                                "DICOM files).")  # fmt: skip
    return [{Keys.IMAGE: _norm(e[Keys.IMAGE])} for e in list_images(folder)]


def _read_phrase_file(datalist_file: str | os.PathLike) -> list[dict]:
    path = _norm(datalist_file)
    if not os.path.isfile(path):
        raise MissingInputError(f"datalist file not found: {path} (--datalist_file takes a JSON list of "
                                "{\"image\": ..., \"phrase\": ...}).")  # fmt: skip
    try:
        entries = json.loads(Path(path).read_text())
    except ValueError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InputError(f"{path} must hold a JSON list of {{\"image\": ..., \"phrase\": ...}} objects.")
    base = os.path.dirname(path)
    items = []
    for k, e in enumerate(entries):
        if Keys.IMAGE not in e:
            raise InputError(f"entry {k} of {path} has no \"image\".")
        image = e[Keys.IMAGE] if os.path.isabs(e[Keys.IMAGE]) else os.path.join(base, e[Keys.IMAGE])
        phrase = check_phrase(e.get(Keys.PHRASE), where=f"entry {k} of {path}")
        items.append({**e, Keys.IMAGE: check_image(image, read=False), Keys.PHRASE: phrase})
    return items


def grounding_datalist(image: str | os.PathLike | None = None, input_dir: str | os.PathLike | None = None,
                       phrase: str | None = None, datalist_file: str | os.PathLike | None = None,
                       examples: str | os.PathLike | None = None) -> list[dict]:  # fmt: skip
    """``[{"image": path, "phrase": text}, ...]`` for the grounding bundle, from one of:

    - ``image`` and ``phrase``: that phrase on that radiograph;
    - ``input_dir`` and ``phrase``: that phrase on every PNG / JPEG / DICOM file under the folder;
    - ``datalist_file``: a JSON list of ``{"image", "phrase"}`` objects, image paths relative to the file;
    - none of them: the ``examples`` datalist file (the bundle's ``configs/phrases.json``, on the phantom).

    A phrase without an image, an image without a phrase, or a phrase beside a datalist file (which has its own
    phrases) is refused: each would otherwise ground something other than what was asked.
    """
    if datalist_file is not None:
        given = [f"--{n}" for n, v in (("image", image), ("input_dir", input_dir), ("phrase", phrase)) if v is not None]
        if given:
            raise InputError(f"--datalist_file {datalist_file} lists its own images and phrases, so {', '.join(given)} "
                             "would not be used: drop them, or drop --datalist_file.")  # fmt: skip
        return _read_phrase_file(datalist_file)
    if image is not None or input_dir is not None:
        text = check_phrase(phrase)
        return [{**e, Keys.PHRASE: text} for e in image_datalist(image, input_dir, task="ground")]
    if phrase is not None:
        raise InputError(f"--phrase {phrase!r} needs an image to ground it on: add --image FILE (or --input_dir "
                         "FOLDER for every image in a folder).")  # fmt: skip
    if examples is None:
        raise InputError("nothing to ground: give --image FILE --phrase TEXT, or --datalist_file FILE.")
    logger.info("no --image, --input_dir or --datalist_file: grounding the example phrases of %s", _norm(examples))
    return _read_phrase_file(examples)


def _missing(paths: Sequence[str | os.PathLike]) -> list[str]:
    return [_norm(p) for p in paths if not os.path.exists(p)]


def own_datalist(datalist: Any, prepared: Any = None) -> Any:
    """The bundle's own datalist (a file, or a datalist an overlay builds), returned as it is, once its data is
    prepared.

    ``prepared`` is the bundle's ``prepare_data`` (e.g. the phantom written into ``dataset_dir`` on first use): as an
    argument here it is evaluated only when the bundle's own datalist is read, by ``train#data`` and
    ``validate#data``. A caller that gives the data itself (MONAI Label overrides ``train#dataset#data`` and
    ``validate#dataset#data``) reads neither, so nothing is prepared or written: ``initialize`` has no side effect.
    """
    return datalist


def require_pretrained_model(model_file: str | os.PathLike, tokenizer_dir: str | os.PathLike) -> None:
    """Raise :class:`MissingInputError` (one paragraph: what is missing, what to run) unless the pre-trained
    ``model.pt`` and the ``tokenizer`` folder that grounding needs both exist (the pre-training bundle writes both
    into its ``models/``; the text encoder's architecture is in the grounding bundle's config)."""
    missing = _missing([model_file, tokenizer_dir])
    if missing:
        where = _norm(os.path.dirname(os.fspath(model_file)) or ".")
        names = [os.path.relpath(m, where) if os.path.dirname(m) == where else m for m in missing]
        raise MissingInputError(
            f"no pre-trained model at {where} ({' and '.join(names)} missing). Grounding uses the model that "
            f"pre-training makes: run `{PRETRAIN_COMMAND}` first (minutes on a CPU at the default tiny scale), then "
            "add --ckpt_dir bundles/elvis_pretrain/models to this command, or copy model.pt and tokenizer/ from "
            f"there into {where}."
        )


def require_trained_model(model_file: str | os.PathLike, task: str = "segmentation") -> None:
    """Raise :class:`MissingInputError` unless the ``task`` bundle's trained ``model.pt`` exists (``task``:
    ``"segmentation"`` or ``"classification"``, the bundle ``elvis_cxr_<task>``)."""
    missing = _missing([model_file])
    if missing:
        command = TRAIN_COMMANDS.get(task, SEGMENTATION_TRAIN_COMMAND)
        raise MissingInputError(
            f"no trained {task} model at {missing[0]}. Train one first: `{command}` (add "
            "--pretrained_ckpt bundles/elvis_pretrain/models/model.pt to start from a pre-trained encoder), or add "
            "--ckpt_dir FOLDER to this command for a model.pt trained elsewhere."
        )


# ------------------------------------------------------------------ the command line's settings
def _runner_arguments() -> set[str]:
    """Arguments of ``python -m monai.bundle run`` itself (not config settings)."""
    from monai.bundle import ConfigWorkflow, run
    from monai.bundle.scripts import create_workflow

    names: set[str] = set()
    for fn in (run, create_workflow, ConfigWorkflow.__init__):
        names |= {p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}  # fmt: skip
    return names - {"self", "override"}


def _cli_options(argv: Sequence[str]) -> dict[str, str | None]:
    """``--name value`` / ``--name=value`` pairs of a fire command line, up to a bare ``--``."""
    options: dict[str, str | None] = {}
    args = list(argv)
    for k, arg in enumerate(args):
        if arg == "--":
            break
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            following = args[k + 1] if k + 1 < len(args) and not args[k + 1].startswith("--") else None
            options[name] = value if eq else following
    return options


def _config_files(value: str | None) -> list[str]:
    if not value:
        return []
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    if isinstance(parsed, str):
        return [p for p in parsed.split(",")] if not os.path.isfile(parsed) and "," in parsed else [parsed]
    return [str(p) for p in parsed]


def check_arguments(argv: Sequence[str] | None = None) -> None:
    """Refuse command-line settings that no config of the run defines (a misspelt ``--phrse``, or ``--image`` on a
    bundle without one), which MONAI's runner would otherwise add to the config and silently ignore.

    Looks at ``argv`` (default ``sys.argv``) only in a ``python -m monai.bundle run`` process: the top-level id of each
    ``--name`` (``a`` of ``--a#b#c``) must be a key of one of the ``--config_file`` files or an argument of the
    runner itself. A no-op elsewhere (Python callers pass overrides as keyword arguments, checked by their code),
    and when ``--args_file`` is used (its keys are not on the command line).
    """
    argv = sys.argv if argv is None else argv
    if not is_bundle_cli(list(argv)) or len(argv) < 2 or argv[1] != "run":  # ckpt_export etc. take other options
        return
    options = _cli_options(argv[2:])
    if "args_file" in options:
        return
    files = _config_files(options.get("config_file"))
    if not files:
        return
    from monai.bundle import ConfigParser

    known: set[str] = set()
    for f in files:
        known |= {str(k).split("#")[0] for k in ConfigParser.load_config_file(f)}
    runner = _runner_arguments()
    unknown = [n for n in options if n.split("#")[0] not in known | runner]
    if unknown:
        first = unknown[0]
        close = difflib.get_close_matches(first.split("#")[0], sorted(known), n=1)
        hint = f" Did you mean --{close[0]}?" if close else ""
        names = ", ".join(f"--{n}" for n in unknown)
        configs = ", ".join(_norm(f) for f in files)
        raise InputError(f"{names}: not a setting of {configs}, so it would be ignored.{hint} The settings are the "
                         "top-level keys of those files.")  # fmt: skip
