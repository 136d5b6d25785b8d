"""Resumable training runs that refuse to resume a checkpoint made with other settings.

:func:`attach_resume` keeps the last epoch's full state in a checkpoint folder, and beside it the settings that
define the run (``run_settings.json``: objective, architecture, data, optimisation). A later run in the same folder
resumes only when its settings are the same; otherwise it stops with a :class:`ResumeSettingsError` that lists
the differences and the ways out, instead of "resuming" a finished run of another objective and exiting at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai_elvis.errors import UsageError

__all__ = ["attach_resume", "latest_checkpoint", "describe_settings", "settings_differences", "ResumeSettingsError",
           "SETTINGS_FILE"]  # fmt: skip

logger = logging.getLogger(__name__)
SETTINGS_FILE = "run_settings.json"
_CKPT = re.compile(r"(\d+)\.pt$")
_SCALARS = (bool, int, float, str, type(None))
_LONG = 64


class ResumeSettingsError(UsageError, ValueError):
    """A checkpoint folder holds a run made with other settings than the ones given now."""


def latest_checkpoint(folder: str | os.PathLike, prefix: str = "checkpoint") -> str | None:
    """The newest complete ``{prefix}*_<n>.pt`` in ``folder`` (largest ``n``), or ``None``; for resuming."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for p in folder.glob(f"{prefix}*.pt"):
        m = _CKPT.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return str(max(found)[1]) if found else None


def describe_settings(value: Any) -> Any:
    """A JSON form of ``value`` for comparing the settings of two runs.

    - numbers, strings, booleans and ``None`` as they are; lists, tuples and mappings element by element, except
      that a list longer than 64 items (a datalist) becomes ``{"items": n, "sha256": ...}`` of its JSON form;
    - a ``torch.nn.Module`` (an objective, a loss) as ``{"_target_": "module.Class", ...}`` with its public scalar
      attributes (``temperature``, ``target``, ...) and, recursively, its child modules; parameters, buffers and
      other state are not settings and are left out;
    - any other object as ``{"_target_": "module.Class"}`` plus its public scalar attributes.
    """
    import torch

    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): describe_settings(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [describe_settings(v) for v in value]
        if len(items) > _LONG:
            text = json.dumps(items, sort_keys=True)
            return {"items": len(items), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
        return items
    if isinstance(value, torch.device):
        return str(value)
    described: dict[str, Any] = {"_target_": f"{type(value).__module__}.{type(value).__qualname__}"}
    attributes = getattr(value, "__dict__", {})
    for name in sorted(attributes):
        v = attributes[name]
        if name.startswith("_") or name == "training":
            continue
        if isinstance(v, _SCALARS) or (isinstance(v, (list, tuple)) and all(isinstance(x, _SCALARS) for x in v)):
            described[name] = list(v) if isinstance(v, tuple) else v
    if isinstance(value, torch.nn.Module):
        for name, child in value.named_children():
            described[name] = describe_settings(child)
    return described


def settings_differences(stored: Any, current: Any, path: str = "") -> list[str]:
    """Lines ``"name: <stored> in the checkpoint's run, <current> now"`` for every setting that differs
    (nested settings are named ``a.b.c``)."""
    if isinstance(stored, dict) and isinstance(current, dict):
        lines = []
        for key in list(stored) + [k for k in current if k not in stored]:
            name = f"{path}.{key}" if path else str(key)
            if key not in current:
                lines.append(f"{name}: {json.dumps(stored[key])} in the checkpoint's run, not set now")
            elif key not in stored:
                lines.append(f"{name}: not set in the checkpoint's run, {json.dumps(current[key])} now")
            else:
                lines += settings_differences(stored[key], current[key], name)
        return lines
    if stored != current:
        return [f"{path or 'settings'}: {json.dumps(stored)} in the checkpoint's run, {json.dumps(current)} now"]
    return []


def _refusal(latest: str, settings_file: Path, reason: str) -> ResumeSettingsError:
    folder = os.path.normpath(os.path.dirname(latest))
    return ResumeSettingsError(
        f"cannot resume from {os.path.normpath(latest)}: {reason}\nThis folder holds another run; its settings are in "
        f"{os.path.normpath(settings_file)}. To train with the new settings, give the run its own folder "
        f"(--bundle_root DIR, or --ckpt_dir DIR), or start over in {folder} with --resume false (its checkpoints "
        "are deleted). To continue the earlier run, repeat its settings."
    )


def _start_over(ckpt_dir: Path, prefix: str, settings_file: Path) -> None:
    removed = [p for p in ckpt_dir.glob(f"{prefix}checkpoint*.pt") if _CKPT.search(p.name)]
    for p in removed:
        p.unlink(missing_ok=True)
    settings_file.unlink(missing_ok=True)
    if removed:
        logger.warning("resume is off: deleted %s and starting over", ", ".join(sorted(p.name for p in removed)))


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def attach_resume(trainer, ckpt_dir: str | os.PathLike, objects: Mapping[str, Any], prefix: str = "",
                  every: int = 1, save: bool = True, settings: Mapping[str, Any] | None = None,
                  resume: bool = True) -> str | None:  # fmt: skip
    """Make ``trainer`` resumable: save ``objects`` plus the trainer's own state every ``every`` epochs into
    ``ckpt_dir`` (one file kept, written atomically by ignite), and, when such a checkpoint exists already,
    load it when the run starts so that training continues after the last completed epoch.

    Args:
        trainer: an ignite engine (a MONAI ``SupervisedTrainer``).
        ckpt_dir: the checkpoint folder.
        objects: the state to save and restore besides the trainer (network, optimizer, schedule, loss).
        prefix: of the checkpoint file names.
        every: save every ``every`` epochs.
        save: ``False`` only loads (the other ranks of a distributed run).
        settings: the settings that define the run (see :func:`describe_settings` for what may be given). They are
            written to ``ckpt_dir/{prefix}run_settings.json``; a checkpoint is resumed only when the settings stored
            beside it are the same, else :class:`ResumeSettingsError` names the differences and the ways out. A
            checkpoint without stored settings is refused too. ``None``: no check (the earlier behaviour).
            Leave out what may change between the two parts of a run (``max_epochs``, to extend it; the device).
        resume: ``False`` deletes the folder's checkpoints and settings and starts over (``--resume false``; the
            strings ``"false"``/``"true"`` of the command line are read as such).

    Returns the checkpoint it resumes from, or ``None``. Kept out of the handler list of the bundle config
    because the trainer cannot reference itself there.
    """
    from ignite.engine import Events
    from monai.handlers import CheckpointLoader, CheckpointSaver

    from monai_elvis.bundle import parse_flag

    resume = parse_flag(resume, "resume")  # the command line's --resume false is the string "false"
    ckpt_dir = Path(ckpt_dir)
    settings_file = ckpt_dir / f"{prefix}{SETTINGS_FILE}"
    current = json.loads(json.dumps(describe_settings(settings))) if settings is not None else None
    state = {**objects, "trainer": trainer}
    latest = latest_checkpoint(ckpt_dir, f"{prefix}checkpoint")
    if latest is not None and not resume:
        if save:
            _start_over(ckpt_dir, prefix, settings_file)
        latest = None
    if latest is not None and current is not None:
        if not settings_file.is_file():
            raise _refusal(latest, settings_file, "its settings were not recorded beside it, so they cannot be "
                           "checked against this run's.")  # fmt: skip
        try:
            stored = json.loads(settings_file.read_text())
        except ValueError as e:
            raise _refusal(latest, settings_file, f"its settings file cannot be read ({e}).") from e
        differences = settings_differences(stored, current)
        if differences:
            listed = "\n".join(f"  {d}" for d in differences)
            raise _refusal(latest, settings_file, f"it was made with other settings:\n{listed}")
    if latest is not None:
        logger.info("resuming from %s", latest)
        CheckpointLoader(load_path=latest, load_dict=state, map_location=trainer.state.device).attach(trainer)

        @trainer.on(Events.STARTED)
        def _say_when_finished(engine) -> None:  # runs after the loader: the restored epoch is known
            if engine.state.max_epochs is not None and engine.state.epoch >= engine.state.max_epochs:
                logger.warning("%s already finished all %d epochs: nothing to train. Raise --max_epochs to train "
                               "longer, or add --resume false to start over.", latest,
                               engine.state.max_epochs)  # fmt: skip

    if save:
        if current is not None:
            _write_json(settings_file, current)
        CheckpointSaver(save_dir=str(ckpt_dir), save_dict=state, file_prefix=prefix, save_interval=every, n_saved=1,
                        epoch_level=True).attach(trainer)  # fmt: skip

        @trainer.on(Events.EPOCH_COMPLETED(every=every))
        def _drop_older(_engine) -> None:  # also those left by the run that was resumed
            keep = latest_checkpoint(ckpt_dir, f"{prefix}checkpoint")
            for p in ckpt_dir.glob(f"{prefix}checkpoint*.pt"):
                if str(p) != keep and _CKPT.search(p.name):
                    p.unlink(missing_ok=True)

    return latest
