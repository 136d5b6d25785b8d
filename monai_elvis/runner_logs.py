"""Two lines of MONAI's and ignite's runners that say nothing on a run of our bundles, filtered out of its log.

- MONAI's ``python -m monai.bundle run`` logs an ``--- input summary of monai.bundle.scripts.run ---`` block of
  the arguments it was given besides ``--config_file`` (``monai/bundle/scripts.py``, ``_log_input_summary``). A
  run given only ``--config_file``, such as the README's, gets an empty block: a header and a closing ``---``.
  :class:`EmptyInputSummaryFilter` drops that pair; a block that lists arguments is logged whole.
- ignite's ``Engine.run`` logs ``Engine run resuming from iteration N, epoch E until M epochs`` whenever the state
  already has ``max_epochs``, and MONAI's engines always set it before they run (``monai/engines/workflow.py``;
  its evaluators also reset ``iteration`` to 0 before every validation), so every fresh training run and every
  validation says "resuming from iteration 0". :class:`FreshRunResumeFilter` drops the line when the iteration is
  0; a real resume (iteration > 0, see :func:`monai_elvis.engines.attach_resume`) keeps it.

:func:`install_runner_log_filters` adds them to the loggers that log these lines. Neither MONAI nor ignite is
patched, and nothing else of their output changes.
"""

from __future__ import annotations

import logging

__all__ = ["EmptyInputSummaryFilter", "FreshRunResumeFilter", "install_runner_log_filters", "RUNNER_LOGGERS"]

SUMMARY_LOGGER = "monai.bundle.scripts"
# ignite names an engine's logger "ignite.engine.engine.<class name>"; these are the engines our bundles run
ENGINE_LOGGERS = ("ignite.engine.engine.SupervisedTrainer", "ignite.engine.engine.SupervisedEvaluator")
RUNNER_LOGGERS = (SUMMARY_LOGGER, *ENGINE_LOGGERS)


class EmptyInputSummaryFilter(logging.Filter):
    """Drop an ``--- input summary of ... ---`` header that is directly followed by its closing ``---``.

    The header is held back until the next record of its logger: the closing line drops both; any other record
    (an argument, ``> name: value``) first releases the header through the same logger, so a block with
    arguments is logged as it was, in order.
    """

    HEADER = "--- input summary of "
    CLOSING = "---"

    def __init__(self) -> None:
        super().__init__()
        self._held: logging.LogRecord | None = None
        self._releasing = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self._releasing:
            return True
        message = record.getMessage()
        if self._held is not None:
            held, self._held = self._held, None
            if message.strip() == self.CLOSING:
                return False
            self._releasing = True
            try:
                logging.getLogger(held.name).handle(held)
            finally:
                self._releasing = False
            return True
        if message.startswith(self.HEADER):
            self._held = record
            return False
        return True


class FreshRunResumeFilter(logging.Filter):
    """Drop ignite's ``Engine run resuming from iteration 0, ...`` (a run that starts at the beginning)."""

    PREFIX = "Engine run resuming from iteration 0,"

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.PREFIX)


def install_runner_log_filters() -> None:
    """Add :class:`EmptyInputSummaryFilter` to MONAI's bundle-script logger and :class:`FreshRunResumeFilter` to
    the engine loggers of :data:`ENGINE_LOGGERS` (once each)."""
    import monai.bundle.scripts  # noqa: F401  (MONAI gives its logger a handler only if it creates the logger)

    for name, kind in [(SUMMARY_LOGGER, EmptyInputSummaryFilter)] + [(n, FreshRunResumeFilter) for n in ENGINE_LOGGERS]:
        log = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in log.filters):
            log.addFilter(kind())
