"""One line for an exception, as the one-line error messages of this project quote it."""

from __future__ import annotations


def exception_line(e: BaseException) -> str:
    """``Type: first line of the message`` (the type alone when the message is empty).

    E.g. ``RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory``.
    """
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
