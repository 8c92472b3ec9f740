"""Writing results: PNGs with the generation parameters in text chunks, and the --dump intermediates.

Every file is written under a fresh temporary name (created exclusively: a planted link is never followed) and
then moved into place; an existing file is never replaced unless asked (overwrite=True): the next free name is
taken instead (NAME-1.png, NAME-2.png, ...), atomically, so concurrent runs into one folder keep every image.
Files get the permissions the umask gives (0644 under umask 022), like any tool's."""
from __future__ import annotations

import errno
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from unclip.core.artifacts import default_mode
from unclip.core.errors import OutputError, RequestError


def _temp(folder: Path, name: str) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)  # O_EXCL: never follows a link
    os.close(fd)
    os.chmod(tmp, default_mode())
    return tmp


def place(tmp: str, path: Path, overwrite: bool) -> Path:
    """Move a finished temporary file to `path`, or with overwrite=False to the first free NAME-k.SUFFIX."""
    if overwrite:
        os.replace(tmp, path)
        return path
    k = 0
    while True:
        target = path if k == 0 else path.with_name(f"{path.stem}-{k}{path.suffix}")
        try:
            os.link(tmp, target)  # fails if target exists: no run ever replaces another's file
        except FileExistsError:
            k += 1
            continue
        except OSError:  # no hard links on this filesystem: reserve the name exclusively, then replace it
            try:
                os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0)))
            except FileExistsError:
                k += 1
                continue
            os.replace(tmp, target)
            return target
        os.unlink(tmp)
        return target


def write_file(path: Path, write, overwrite: bool = False) -> Path:
    """Write through `write(tmp_path)` and place the result; the temporary file never outlives a failure, and a
    write error (a full disk, a folder removed meanwhile) is one line naming the file."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # the first result creates the folder (check_writable didn't)
        tmp = _temp(path.parent, path.name)
        write(tmp)
        return place(tmp, path, overwrite)
    except OSError as e:
        raise OutputError(f"{path}: cannot write it ({e.strerror or e}); free some space or choose another folder "
                          "(files written before it are kept)") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def save_png(image: torch.Tensor, path: Path, params: dict, overwrite: bool = False) -> Path:
    """(H, W, 3) uint8 -> PNG with every parameter as a tEXt chunk (prompt, seed, steps, guidance, ...)."""
    from PIL import Image, PngImagePlugin
    info = PngImagePlugin.PngInfo()
    for k, v in params.items():
        info.add_text(str(k), v if isinstance(v, str) else json.dumps(v))
    img = Image.fromarray(image.numpy())
    return write_file(path, lambda tmp: img.save(tmp, format="PNG", pnginfo=info), overwrite)


def folder_problem(path: str, flag: str) -> str | None:
    """Why `path` can't be an output folder, or None: it must be a folder this user may write in, or one that can be
    created (its nearest existing parent a writable folder). Checks only: nothing is created (a run that fails its
    other checks leaves no trace)."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            return f"{flag} {path}: exists and is not a folder; pass a folder"
        if not os.access(p, os.W_OK | os.X_OK):
            return f"{flag} {path}: this user may not write in it; pass a folder of your own"
        return None
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"{flag} {path}: cannot be created ({parent} is not a writable folder); pass another folder"
    return None


def check_writable(folder: str, flag: str) -> Path:
    """Prove that results can be written in `folder` with an exclusive temporary file (no fixed probe name): in it,
    or where it doesn't exist yet, in its nearest existing parent (the first result written creates it, so a run
    that fails before writing leaves no empty folder). Temporary files that killed runs left behind over an hour ago
    are removed."""
    out = probe = Path(folder)
    try:
        while not probe.exists() and probe != probe.absolute().parent:
            probe = probe.parent
        if not probe.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{probe} is not a folder")
        os.unlink(_temp(probe, "write-check"))
    except OSError as e:
        raise RequestError(f"{flag} {folder}: cannot write there ({e.strerror or e}); choose a writable folder") from None
    now = time.time()
    for p in out.glob(".*.tmp") if out.is_dir() else ():
        try:
            if now - p.lstat().st_mtime > 3600:
                p.unlink()
        except OSError:
            pass
    return out


def check_dump(folder: str, overwrite: bool) -> Path:
    out = check_writable(folder, "--dump")
    if (out / "dump.json").exists():
        if not overwrite:
            raise RequestError(f"--dump {folder} already holds a dump; choose another folder or pass --overwrite")
        return out
    others = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    if others:  # a dump writes NAME.npy files of its own choosing: it never writes over a user's files
        raise RequestError(f"--dump {folder} holds files that are not a dump ({', '.join(others[:3])}"
                           f"{', ...' if len(others) > 3 else ''}); choose an empty or new folder")
    return out


def _write_npy(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr)


def save_dump(folder: Path, intermediates: dict[str, torch.Tensor], meta: dict) -> None:
    """Each intermediate as NAME.npy (float32) and dump.json (check_dump refused a folder holding another dump)."""
    folder.mkdir(parents=True, exist_ok=True)
    # dump.json first (marked unfinished), so that a dump stopped part-way is still known as one (--overwrite redoes it)
    write_file(folder / "dump.json", lambda tmp: Path(tmp).write_text(json.dumps({**meta, "unfinished": True})),
               overwrite=True)
    for name, t in intermediates.items():
        arr = t.detach().cpu().numpy()
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        write_file(folder / f"{name}.npy", lambda tmp, a=arr: _write_npy(tmp, a), overwrite=True)
    write_file(folder / "dump.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)), overwrite=True)
