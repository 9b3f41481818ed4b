"""structlog set-up: JSON lines for machines, colourless console text for people on a TTY.

Logs go to stderr so that a command's own output on stdout (check-config, bench, demo) stays clean and
pipeable; under systemd or a container runtime both streams are collected anyway.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


lost_lines = 0  # log lines that could not be written (a vanished reader, a full disk): never an error


class _CurrentStderr:
    """Writes to whatever sys.stderr is at the time of writing, not the stream of configure() time:
    a stream replaced and closed since (test capture, a redirected CLI call) must not break logging.

    A failed write is counted in ``lost_lines`` and otherwise ignored: the daemon must outlive whatever
    reads its log. When the reader of a pipe has gone (a supervisor killed with SIGKILL), fd 2 is pointed
    at /dev/null, so nothing else that writes to stderr (a traceback, the interpreter's last flush)
    raises either. Before, the first log line after that raised BrokenPipeError in the thread that
    logged it: on SIGTERM that was the shutdown itself, and the daemon hung at exit until killed.
    """

    def write(self, text: str) -> int:
        global lost_lines
        try:
            return sys.stderr.write(text)
        except BrokenPipeError:
            lost_lines += 1
            _silence_stderr()
        except (OSError, ValueError):  # a full disk, a closed stream
            lost_lines += 1
        return 0

    def flush(self) -> None:
        global lost_lines
        try:
            sys.stderr.flush()
        except BrokenPipeError:
            lost_lines += 1
            _silence_stderr()
        except (OSError, ValueError):
            pass


def _silence_stderr() -> None:
    with contextlib.suppress(OSError, ValueError, AttributeError):  # no file descriptor behind sys.stderr
        to_devnull(sys.stderr.fileno())


def to_devnull(*fds: int) -> None:
    """Point ``fds`` at /dev/null: their reader has gone, and what is still written to them (a log line,
    a traceback, the interpreter's last flush) must go nowhere instead of raising BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def configure(level: str = "info", fmt: str = "auto") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if fmt == "json" else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
