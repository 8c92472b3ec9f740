"""The types of request values, checked where a Request or Settings is made: a Python caller (a notebook, a config
file's strings) gets the same one-line RequestError naming the flag as the command line, not a TypeError from deep
inside a run. Each check returns the value in its plain Python type (a numpy integer becomes an int, a Path a str),
so that what is recorded (PNG metadata, manifests, file names) is what the command line would record."""
from __future__ import annotations

import numbers
import os

from unclip.core.errors import RequestError


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _got(v) -> str:
    return f"got {v!r} ({type(v).__name__})"


def whole(name: str, v, optional: bool = False) -> int | None:
    """An integer (a numpy integer too); bools, floats and strings are refused."""
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise RequestError(f"{_flag(name)} must be a whole number, {_got(v)}")
    return int(v)


def real(name: str, v, optional: bool = False) -> float | None:
    """A real number (an int or a numpy float too); bools and strings are refused."""
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise RequestError(f"{_flag(name)} must be a number, {_got(v)}")
    return float(v)


def flag(name: str, v) -> bool:
    """True or False (a numpy bool too): a string such as "no" from a config file would read as true."""
    if type(v).__name__ not in ("bool", "bool_"):
        raise RequestError(f"{_flag(name)} must be True or False, {_got(v)}")
    return bool(v)


def text(name: str, v, optional: bool = False) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str):
        hint = " (for several prompts, pass prompts=[...])" if name == "prompt" and not isinstance(v, bytes) else ""
        raise RequestError(f"{'PROMPT' if name == 'prompt' else _flag(name)} must be a str, {_got(v)}{hint}")
    return str(v)


def path(name: str, v, optional: bool = False, what: str = "a folder") -> str | None:
    """A file or folder name: a str or an os.PathLike (pathlib.Path); an empty one is refused."""
    if v is None and optional:
        return None
    if not isinstance(v, (str, os.PathLike)) or isinstance(v, bytes):
        raise RequestError(f"{_flag(name)} must be {what}'s path (a str or pathlib.Path), {_got(v)}")
    s = os.fspath(v)
    if not isinstance(s, str):
        raise RequestError(f"{_flag(name)} must be {what}'s path (a str or pathlib.Path), {_got(v)}")
    if not str(s).strip():
        raise RequestError(f"{_flag(name)} needs {what} name (it got an empty one); pass {_flag(name)} "
                           f"{'DIR' if what == 'a folder' else 'PATH'}")
    return str(s)


def texts(name: str, v) -> tuple[str, ...]:
    """Several prompts: a list or tuple of str (a str alone would be read as one prompt per character)."""
    if not isinstance(v, (list, tuple)):
        raise RequestError(f"{_flag(name)} must be a list or tuple of prompts (str), {_got(v)}"
                           f"{' (for one prompt, pass prompt=...)' if isinstance(v, str) else ''}")
    bad = [p for p in v if not isinstance(p, str)]
    if bad:
        raise RequestError(f"{_flag(name)}: every prompt must be a str, {_got(bad[0])}")
    return tuple(str(p) for p in v)


def pair(name: str, v, paths: bool = False) -> tuple[str, str]:
    """Two ends (A, B): prompts, or with paths=True image paths too (str or pathlib.Path)."""
    kinds = (str, os.PathLike) if paths else (str,)
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)) or len(v) != 2 \
            or not all(isinstance(x, kinds) and not isinstance(x, bytes) for x in v):
        what = "prompts or image paths" if paths else "texts (str)"
        raise RequestError(f"{_flag(name)} takes two {what} A and B, as a tuple (A, B), {_got(v)}")
    return tuple(str(os.fspath(x)) for x in v)
