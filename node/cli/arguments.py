"""Argument types shared by the ``pacs-ai-node`` subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def seconds_within(maximum: float) -> Callable[[str], float]:
    """An argparse ``type`` for a duration in seconds, > 0 and <= ``maximum``; the error names the value."""

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not 0 < value <= maximum:
            raise argparse.ArgumentTypeError(f"{text}: must be > 0 and <= {maximum:g} seconds")
        return value

    return seconds
