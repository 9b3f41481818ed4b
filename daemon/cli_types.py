"""Small pieces the command handlers share.

argparse types for numeric options: a bad value is a usage error naming the option (exit 2), not a
traceback from deep inside torch or a value silently accepted (a negative count, a NaN threshold). And
the stop event of the long-running commands.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import threading
from collections.abc import Callable, Iterator


def stop_on_signals(*, second_exits: bool = False) -> threading.Event:
    """An event that SIGINT and SIGTERM set: a long-running command (simulate, soak) checks it between
    its steps and ends cleanly instead of dying inside one. ``second_exits``: a second signal while it
    stops leaves at once (SystemExit 130)."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        if second_exits and stop.is_set():
            raise SystemExit(130)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return stop


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, timeout, a CI cancel) raises KeyboardInterrupt as Ctrl-C does, so that a command's
    finally blocks stop the processes it started and remove its temporary files: they would outlive it."""

    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def integer(minimum: int) -> Callable[[str], int]:
    """An int >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def number(minimum: float = -math.inf, maximum: float = math.inf, *, above: bool = False) -> Callable[[str], float]:
    """A finite float in [minimum, maximum] (``above``: strictly greater than ``minimum``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low_ok = value > minimum if above else value >= minimum
        if not (math.isfinite(value) and low_ok and value <= maximum):
            limits = [f"{'>' if above else '>='} {minimum:g}"] if minimum > -math.inf else []
            limits += [f"<= {maximum:g}"] if maximum < math.inf else []
            bounds = " and ".join(limits)
            raise argparse.ArgumentTypeError(f"must be a finite number{' ' + bounds if bounds else ''}, got {text}")
        return value

    return parse
