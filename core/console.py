"""The command-line tools' warning lines: `warning: ...` on stderr, through a handler of their own on the `unclip`
logger (a host's logging setup, pytest's included, may own the root logger's); and the progress label of a run made
in chunks of images."""
from __future__ import annotations

import logging
import sys


def warnings_to_stderr() -> None:
    log = logging.getLogger("unclip")
    for h in [h for h in log.handlers if getattr(h, "unclip_cli", False)]:
        log.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)  # the current stderr (a test runner may have swapped it)
    handler.unclip_cli = True
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING)


def images_progress(progress, first: int, n: int, total: int):
    """The progress callback with the images being made in front: 'images 5-8/20 decoder 12/25'."""
    if progress is None or total == 1:
        return progress
    label = f"images {first + 1}-{first + n}/{total}" if n > 1 else f"image {first + 1}/{total}"
    return lambda stage, i, steps: progress(f"{label} {stage}", i, steps)
