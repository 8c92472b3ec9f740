"""The command-line tools' warning lines: `warning: ...` on stderr, through a handler of their own on the `unclip`
logger (a host's logging setup, pytest's included, may own the root logger's)."""
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
