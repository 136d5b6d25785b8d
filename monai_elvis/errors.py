"""Errors that say what to do, and their short form on the bundle command line.

A :class:`UsageError` is raised for a problem in how a command was called or prepared (a missing model, image
or phrase, an argument a bundle does not take, a checkpoint made with other settings). Its message is one
paragraph that names the item and says what to run or change. Under ``python -m monai.bundle`` (and only there)
:func:`install_bundle_excepthook` prints that paragraph instead of the traceback through MONAI's config parser and
ignite, which is often over 100 lines long; ``MONAI_ELVIS_TRACEBACK=1`` shows the traceback again.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from types import TracebackType

__all__ = ["UsageError", "InputError", "MissingInputError", "RequestInputError", "ShortUsageErrorLogs",
           "find_usage_error", "install_bundle_excepthook", "is_bundle_cli"]  # fmt: skip

TRACEBACK_VARIABLE = "MONAI_ELVIS_TRACEBACK"


class UsageError(Exception):
    """A problem with how a command was called or set up; the message says what to do."""


class InputError(UsageError, ValueError):
    """An argument that is wrong, missing, empty or not used by the command."""


class MissingInputError(UsageError, FileNotFoundError):
    """A file or folder the command needs does not exist (an image, an input folder, a trained model)."""


def _http_exception_bases() -> tuple[type, ...]:
    """Starlette's ``HTTPException`` where Starlette is installed (it is, beside FastAPI, in a MONAI Label server)."""
    try:
        from starlette.exceptions import HTTPException
    except ImportError:
        return ()
    return (HTTPException,)


class RequestInputError(InputError, *_http_exception_bases()):  # type: ignore[misc]
    """An input error in what a request gave a bundle, e.g. a grounding request without a phrase.

    Everywhere it is an :class:`InputError` (a ``ValueError``). Where Starlette is installed it is also Starlette's
    ``HTTPException`` with :attr:`status_code` 400 and the message as its ``detail``, so that a web server built on
    it (MONAI Label's FastAPI server, which runs a bundle's preprocessing transforms one by one and lets their
    exceptions through) answers the client's mistake with ``400 Bad Request`` and the message, not with a 500.
    """

    status_code = 400

    def __init__(self, message: str) -> None:
        InputError.__init__(self, message)
        self.detail, self.headers = message, None

    def __str__(self) -> str:
        return str(self.detail)


def find_usage_error(exc: BaseException | None) -> UsageError | None:
    """The first :class:`UsageError` in ``exc``'s chain (``exc`` itself, then its causes and contexts), or ``None``.

    MONAI's config parser and ignite wrap the errors raised inside a bundle (``RuntimeError: Failed to evaluate
    ...``), so the error that explains the problem is usually a cause, not the exception that reaches the top.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UsageError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def is_bundle_cli(argv: list[str] | None = None) -> bool:
    """Whether this process is ``python -m monai.bundle ...`` (also under ``torchrun``)."""
    argv = sys.argv if argv is None else argv
    return bool(argv) and Path(argv[0]).parts[-3:] == ("monai", "bundle", "__main__.py")


def _short_excepthook(previous):
    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        usage = find_usage_error(exc)
        if usage is None or os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
            previous(exc_type, exc, tb)
            return
        sys.stderr.write(f"\nerror: {usage}\n(the full traceback: set {TRACEBACK_VARIABLE}=1)\n")

    hook.monai_elvis = True  # type: ignore[attr-defined]
    return hook


class ShortUsageErrorLogs(logging.Filter):
    """Drop the traceback from a log record of an exception whose chain holds a :class:`UsageError`: MONAI's
    ``StatsHandler`` logs every exception of an engine run with its traceback before re-raising it, and the
    excepthook prints the error's message at the end."""

    def filter(self, record: logging.LogRecord) -> bool:
        usage = find_usage_error(record.exc_info[1]) if record.exc_info else None
        if usage is not None:
            record.msg, record.args = f"Exception: {type(usage).__name__}: {usage}", ()
            record.exc_info, record.exc_text = None, None
        return True


# loggers that log an engine's exception with its traceback
ENGINE_EXCEPTION_LOGGERS = ("monai.handlers.StatsHandler",)


def install_bundle_excepthook() -> bool:
    """Under ``python -m monai.bundle``, print a :class:`UsageError` found in an uncaught exception's chain as its
    one-paragraph message (exit status 1) instead of the whole traceback; other errors keep their traceback.
    The loggers of :data:`ENGINE_EXCEPTION_LOGGERS` log such an error without its traceback too.

    A no-op in any other process (a script, a notebook, pytest), where the caller sees the exception as it is.
    Returns whether the hook is installed.
    """
    if not is_bundle_cli():
        return False
    if not getattr(sys.excepthook, "monai_elvis", False):
        sys.excepthook = _short_excepthook(sys.excepthook)
        for name in ENGINE_EXCEPTION_LOGGERS:
            logging.getLogger(name).addFilter(ShortUsageErrorLogs())
    return True
