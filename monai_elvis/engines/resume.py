"""Resumable training runs that refuse to resume a checkpoint made with other settings.

:func:`attach_resume` keeps the run's full state in a checkpoint folder, written at the end of every epoch and,
when asked, every N iterations, and beside it the settings that define the run (``run_settings.json``: objective,
architecture, data, optimisation). A later run in the same folder resumes only when its settings are the same;
otherwise it stops with a :class:`ResumeSettingsError` that lists the differences and the ways out, instead of
"resuming" a finished run of another objective and exiting at once.

A checkpoint taken in the middle of an epoch is resumed in the middle of that epoch: the trainer continues at the
next iteration, and a :class:`ResumableSampler` (epoch-seeded order, in one process or on each rank of a
distributed run) continues its pass over the data after the batches already trained on, so that no finished step
is replayed and the batches that follow are those an uninterrupted run would have taken.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.data import DistributedSampler

from monai_elvis.errors import UsageError

__all__ = ["attach_resume", "latest_checkpoint", "describe_settings", "settings_differences", "data_fingerprint",
           "ResumeSettingsError", "SETTINGS_FILE", "ResumableSampler", "DataPosition"]  # fmt: skip

logger = logging.getLogger(__name__)
SETTINGS_FILE = "run_settings.json"
_CKPT = re.compile(r"(\d+)\.pt$")
_SCALARS = (bool, int, float, str, type(None))
_LONG = 64


class ResumeSettingsError(UsageError, ValueError):
    """A checkpoint folder holds a run made with other settings than the ones given now."""


class ResumableSampler(DistributedSampler):
    """MONAI's ``DistributedSampler`` (an order shuffled from ``seed + epoch``, this rank's share of it) that can
    start its next pass part-way, for a run resumed in the middle of an epoch.

    Without ``num_replicas`` / ``rank`` it takes them from the default process group, or, without one, serves
    one process (``num_replicas=1``): the same class then runs single-process and distributed training. MONAI's
    trainers call ``set_epoch`` at the start of every epoch, so the order depends only on ``seed`` and the epoch.

    Args:
        dataset, even_divisible, num_replicas, rank, shuffle: as ``monai.data.DistributedSampler``.
        seed: of the shuffle (the same on every rank).
        kwargs: more arguments of ``torch.utils.data.DistributedSampler`` (``drop_last``).
    """

    def __init__(self, dataset, even_divisible: bool = True, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, **kwargs) -> None:  # fmt: skip
        from monai_elvis.losses.distributed import distributed_world

        world_rank, world_size = distributed_world()
        num_replicas = world_size if num_replicas is None else num_replicas
        rank = world_rank if rank is None else rank
        super().__init__(dataset, even_divisible, num_replicas, rank, shuffle, seed=seed, **kwargs)
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, start: int) -> None:
        """Make the next pass the one of ``epoch`` (whatever ``set_epoch`` says by then), without its first
        ``start`` indices; the passes after it are whole again."""
        self._resume = (int(epoch), int(start))

    def __iter__(self):
        if self._resume is None:
            return super().__iter__()
        (epoch, start), self._resume = self._resume, None
        current, self.epoch = self.epoch, epoch
        try:
            indices = list(super().__iter__())
        finally:
            self.epoch = current
        return iter(indices[start:])


class DataPosition:
    """Where a trainer is in its data: the sampler's epoch for the pass over the data loader under way, and the
    batches taken from that pass. Saved in the checkpoints of :func:`attach_resume` (``data_position``) and, on
    resume, handed to a :class:`ResumableSampler` so that the pass continues where it was.

    Passes and epochs are counted apart because ignite keeps one pass over the loader across epochs when
    ``epoch_length`` is shorter than the loader.
    """

    def __init__(self, loader=None) -> None:
        self.loader = loader
        self.pass_epoch = -1
        self.batches = 0

    @property
    def sampler(self):
        return getattr(self.loader, "sampler", None)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._took)
        engine.add_event_handler(Events.DATALOADER_STOP_ITERATION, self._new_pass)

    def _took(self, _engine) -> None:
        if self.batches == 0:  # the first batch of a pass: the sampler's epoch made its order
            self.pass_epoch = int(getattr(self.sampler, "epoch", -1))
        self.batches += 1

    def _new_pass(self, _engine) -> None:
        self.batches = 0

    def state_dict(self) -> dict[str, int]:
        return {"pass_epoch": self.pass_epoch, "batches": self.batches}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore the position and position the sampler (the next pass continues after ``batches`` batches)."""
        self.pass_epoch, self.batches = int(state["pass_epoch"]), int(state["batches"])
        if self.batches == 0:
            return
        batch_size = getattr(self.loader, "batch_size", None)
        if not callable(getattr(self.sampler, "resume_at", None)) or not batch_size:
            logger.warning("the checkpoint was taken after %d batches of a pass over the data, but the data loader's "
                           "sampler (%s) cannot start part-way: this pass restarts from its beginning. Use "
                           "monai_elvis.engines.ResumableSampler to continue where it was.", self.batches,
                           type(self.sampler).__name__)  # fmt: skip
            self.batches = 0
            return
        self.sampler.resume_at(self.pass_epoch, self.batches * batch_size)


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
        return _fingerprint(items) if len(items) > _LONG else items
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


def _fingerprint(described: list) -> dict[str, Any]:
    text = json.dumps(described, sort_keys=True)
    return {"items": len(described), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def data_fingerprint(items: Any) -> dict[str, Any]:
    """``{"items": n, "sha256": ...}`` of a datalist (the JSON form of its entries, keys sorted): a short setting
    that changes whenever the data a run trains on does, for the settings of :func:`attach_resume` (MONAI Label
    overrides ``train#dataset#data`` with the images labelled so far, whatever the bundle's own datalist is).
    :func:`describe_settings` writes a list longer than 64 items the same way."""
    return _fingerprint([describe_settings(v) for v in items])


def _split_settings(settings: Any, names: Sequence[str]) -> tuple[Any, dict[str, Any]]:
    """``settings`` without the dotted ``names``, and ``{name: value}`` of those it holds."""
    if not isinstance(settings, dict):
        return settings, {}
    rest = json.loads(json.dumps(settings))
    taken = {}
    for name in names:
        *parents, key = name.split(".")
        node = rest
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and key in node:
            taken[name] = node.pop(key)
    return rest, taken


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
                  resume: bool = True, every_iterations: int = 0,
                  restart_on: Sequence[str] = ()) -> str | None:  # fmt: skip
    """Make ``trainer`` resumable: save ``objects``, the trainer's own state and its position in the data every
    ``every`` epochs and every ``every_iterations`` iterations into ``ckpt_dir`` (one file kept,
    ``{prefix}checkpoint_iteration=<n>.pt``, written atomically by ignite), and, when such a checkpoint exists
    already, load it when the run starts so that training continues after the last saved iteration.

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
        every_iterations: also save every ``every_iterations`` iterations (``0``: epoch ends only), so that a
            killed run loses at most that many. With gradient accumulation the save waits for the iteration that
            steps the optimizer. Resuming such a checkpoint continues the epoch where it was: the trainer at the
            next iteration, and the data after the batches already trained on when the trainer's data loader
            samples with a :class:`ResumableSampler` (otherwise that pass over the data restarts, with a warning).
        restart_on: settings (dotted names of ``settings``, or their parents: ``"data.training_items"``) whose change
            starts a new run instead of being refused, when they are all that differs: the checkpoint folder is
            cleared, as with ``resume=False``, with a warning that names them. The bundles give the fingerprint of
            the training data (:func:`data_fingerprint`), so that MONAI Label's next training round, on more
            labelled images, trains on them instead of "resuming" the finished round, while any other change of
            settings is still refused.

    Returns the checkpoint it resumes from, or ``None``. Kept out of the handler list of the bundle config
    because the trainer cannot reference itself there.

    What a resumed run does not restore: random streams outside the saved objects (data augmentation, dropout)
    continue from the run's seed, not from where the killed run was.
    """
    import torch
    from ignite.engine import Events
    from ignite.handlers import Checkpoint, DiskSaver

    from monai_elvis.bundle import parse_flag
    from monai_elvis.engines.vlp import GradientClipHandler

    resume = parse_flag(resume, "resume")  # the command line's --resume false is the string "false"
    ckpt_dir = Path(ckpt_dir)
    settings_file = ckpt_dir / f"{prefix}{SETTINGS_FILE}"
    current = json.loads(json.dumps(describe_settings(settings))) if settings is not None else None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # every rank calls this: let ignite learn the process group now, collectively, and keep it (its checkpoint
        # asks for the rank on rank 0 alone, which would otherwise start a collective the other ranks never join)
        from ignite import distributed as idist

        idist.sync()
    position = DataPosition(getattr(trainer, "data_loader", None))
    position.attach(trainer)
    state = {**objects, "trainer": trainer}
    latest = latest_checkpoint(ckpt_dir, f"{prefix}checkpoint")
    restart = False
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
        (stored_rest, stored_on), (current_rest, current_on) = (_split_settings(x, restart_on) for x in (stored, current))
        # only the restart_on settings differ, and the older run recorded each of them (else it is refused)
        if differences and stored_on.keys() == current_on.keys() and not settings_differences(stored_rest, current_rest):
            changed = [n for n in restart_on if stored_on.get(n) != current_on.get(n)]
            logger.warning("%s was made with other %s (%s): starting a new run with those given now", latest,
                           " and ".join(changed), "; ".join(differences))  # fmt: skip
            restart, latest = True, None
        elif differences:
            listed = "\n".join(f"  {d}" for d in differences)
            raise _refusal(latest, settings_file, f"it was made with other settings:\n{listed}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank has read the folder before the saving one clears it
    if restart and save:
        _start_over(ckpt_dir, prefix, settings_file)
    if latest is not None:
        logger.info("resuming from %s", latest)

        @trainer.on(Events.STARTED)
        def _load(engine) -> None:
            checkpoint = torch.load(latest, map_location=engine.state.device, weights_only=True)
            max_epochs = engine.state.max_epochs  # this run's, which may extend the checkpoint's
            Checkpoint.load_objects(to_load=state, checkpoint=checkpoint)
            if max_epochs is not None and engine.state.epoch > max_epochs:
                raise ValueError(f"{latest} is at epoch {engine.state.epoch}, past this run's max_epochs "
                                 f"{max_epochs}: raise --max_epochs to train on from it.")  # fmt: skip
            engine.state.max_epochs = max_epochs
            if "data_position" in checkpoint:  # checkpoints of earlier versions: epoch ends, no position
                position.load_state_dict(checkpoint["data_position"])
            logger.info("resumed at iteration %d (epoch %d)", engine.state.iteration, engine.state.epoch)

        @trainer.on(Events.STARTED)
        def _say_when_finished(engine) -> None:  # runs after the loader: the restored epoch is known
            if engine.state.max_epochs is not None and engine.state.epoch >= engine.state.max_epochs:
                logger.warning("%s already finished all %d epochs: nothing to train. Raise --max_epochs to train "
                               "longer, or add --resume false to start over.", latest,
                               engine.state.max_epochs)  # fmt: skip

    if save:
        if current is not None:
            _write_json(settings_file, current)
        saver = Checkpoint({**state, "data_position": position},
                           DiskSaver(str(ckpt_dir), require_empty=False, atomic=True), filename_prefix=prefix,
                           score_function=lambda engine: engine.state.iteration, score_name="iteration",
                           n_saved=1)  # fmt: skip

        def _save(engine) -> None:
            saver(engine)  # a second call at the same iteration (an epoch's end) writes nothing
            keep = latest_checkpoint(ckpt_dir, f"{prefix}checkpoint")
            for p in ckpt_dir.glob(f"{prefix}checkpoint*.pt"):  # also those left by the run that was resumed
                if str(p) != keep and _CKPT.search(p.name):
                    p.unlink(missing_ok=True)

        trainer.add_event_handler(Events.EPOCH_COMPLETED(every=every), _save)
        every_iterations = int(every_iterations or 0)
        if every_iterations > 0:
            due = {"now": False}

            @trainer.on(Events.ITERATION_COMPLETED)
            def _save_every_iterations(engine) -> None:
                if engine.state.iteration % every_iterations == 0:
                    due["now"] = True
                if due["now"] and GradientClipHandler.steps_now(engine):  # never inside an accumulation window
                    due["now"] = False
                    _save(engine)

    return latest


class FinalModelSaver:
    """At the end of training, save the network's plain state dict as ``save_dir/filename`` (``models/model.pt``)
    unless the validator saved its best model during this run.

    The bundles keep the best validation model as ``model.pt`` (MONAI's ``CheckpointSaver`` with
    ``save_key_metric``), which only happens when a validation runs. A run without one (no validation data, as
    when MONAI Label trains on a couple of labelled images, or fewer epochs than ``val_interval``) would otherwise
    end without any ``model.pt``, or leave the previous run's in place.

    Args:
        save_dir: the folder of the model file (created if needed).
        network: the trained module (a DDP wrapper's ``module`` is saved).
        validator: the evaluator whose ``state.best_metric_epoch`` says whether a best model was saved in this run
            (``None``: always save).
        filename: the model file's name.
    """

    def __init__(self, save_dir: str | os.PathLike, network, validator=None, filename: str = "model.pt") -> None:
        self.save_dir, self.network, self.validator, self.filename = Path(save_dir), network, validator, filename
        self.saved: Path | None = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine=None) -> None:
        import torch

        state = getattr(self.validator, "state", None)
        if state is not None and getattr(state, "best_metric_epoch", -1) > 0:
            return  # the best validation model of this run is model.pt already
        net = getattr(self.network, "module", self.network)
        self.save_dir.mkdir(parents=True, exist_ok=True)
        path = self.save_dir / self.filename
        tmp = path.with_name(path.name + ".tmp")
        torch.save(net.state_dict(), tmp)
        os.replace(tmp, path)
        self.saved = path
        logger.info("no validation in this run: saved the final weights as %s", path)
