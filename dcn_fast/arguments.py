"""Command-line argument types and the parser class shared by ``dcn-fast`` and its sub-tools.

The CLI (:mod:`dcn_fast.cli`), the experiments (:mod:`dcn_fast.experiments`)
and ``python -m dcn_fast.convert`` all import from here, so none of them
imports another's command line (the CLI imports the experiments).
"""

from __future__ import annotations

import argparse
import math

__all__ = ["OneLineErrors", "positive_int", "positive_float", "sigma_value"]


def positive_int(text: str) -> int:
    """An int >= 1 (argparse ``type=``)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (argparse ``type=``)."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def sigma_value(text: str) -> float:
    """A σ in [0.1, 30] (argparse ``type=``: ``dcn-fast bench-layer --sigmas``)."""
    value = float(text)
    if not (0.1 <= value <= 30):
        raise argparse.ArgumentTypeError(f"sigma must be in [0.1, 30], got {value}")
    return value


class OneLineErrors(argparse.ArgumentParser):
    """Usage errors as one line on stderr (the command, the message, where to look), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
