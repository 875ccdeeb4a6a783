"""Command-line checks shared by the ``ray-eplb`` commands: every bad argument is reported on one
line of stderr with exit status 2, before anything slow (a Ray cluster) starts.

:class:`Parser` is an ``argparse.ArgumentParser`` whose errors are one line (``PROG: error: ...``,
no usage block); the ``type=`` helpers below reject out-of-range and non-finite numbers with a
message naming the value.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, NoReturn


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose :meth:`error` prints one line, ``PROG: error: MESSAGE``, and exits 2."""

    def error(self, message: str) -> NoReturn:
        line = " ".join(str(message).split())  # one line, whatever the message holds
        print(f"{self.prog}: error: {line}", file=sys.stderr)
        raise SystemExit(2)


def _number(text: str, cast: Callable[[str], float]) -> float:
    try:
        value = cast(text)
    except ValueError:
        kind = "an integer" if cast is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be finite")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """``type=`` for an integer ``>= low``."""

    def parse(text: str) -> int:
        value = int(_number(text, int))
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def number(low: float | None = None, *, strict: bool = False, high: float | None = None) -> Callable[[str], float]:
    """``type=`` for a finite float, ``>= low`` (``> low`` when ``strict``) and ``<= high`` when given."""

    def parse(text: str) -> float:
        value = float(_number(text, float))
        if low is not None and (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"{value:g} must be {'>' if strict else '>='} {low:g}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value:g} must be <= {high:g}")
        return value

    parse.__name__ = "finite number"
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)
positive = number(0.0, strict=True)
nonneg = number(0.0)
