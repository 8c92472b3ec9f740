"""Safe export artifacts: atomic writes, hashes, the manifest, a directory lock, and the runtime-side checks.

Every file is written under a temporary name and renamed; manifest.json is written last. A reader trusts a
file only if the manifest lists it with the same size and sha256, so an interrupted or modified export is
refused with the command that rebuilds it."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from unclip.core.errors import ExportError, ExportLocked

MANIFEST = "manifest.json"
FORMAT = 1


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def default_mode(directory: bool = False) -> int:
    """The permissions a new file (0666) or folder (0777) gets under the process's umask, as any tool creates them;
    tempfile's owner-only 0600 / 0700 would lock other users out of shared engines and model folders."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, default_mode())
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_manifest(out_dir: Path, fix: str) -> dict:
    path = out_dir / MANIFEST
    if not path.is_file():
        raise ExportError(f"{out_dir}: no {MANIFEST} (the export is missing or unfinished); run: {fix}")
    try:
        m = json.loads(path.read_text())
    except ValueError:
        raise ExportError(f"{path}: unreadable manifest; run: {fix}") from None
    if not isinstance(m, dict):
        raise ExportError(f"{path}: not a manifest of this tool (a JSON {type(m).__name__}); run: {fix}")
    if m.get("format") != FORMAT:
        raise ExportError(f"{path}: export format {m.get('format')} is not {FORMAT}; run: {fix}")
    return m


def export_state(out_dir: Path) -> str:
    """"missing" (no manifest), "partial" (the manifest lacks some of its model's networks: an export that was
    interrupted or limited to some stages), "complete", or "broken" (an unreadable manifest)."""
    if not (out_dir / MANIFEST).is_file():
        return "missing"
    try:
        m = read_manifest(out_dir, "")
        nets = _spec_networks(m)
    except (ExportError, KeyError, ValueError, TypeError):
        return "broken"
    return "complete" if set(nets) <= set(m.get("networks", {})) else "partial"


def _spec_networks(manifest: dict) -> list[str]:
    from unclip.core.spec import ModelSpec
    return ModelSpec.from_json(manifest["spec"]).networks


def write_manifest(out_dir: Path, manifest: dict) -> None:
    atomic_write_bytes(out_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())


def file_record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def verify_files(out_dir: Path, entry: dict, network: str, fix: str) -> None:
    """Refuse a network whose files are missing, truncated or modified since the manifest was written."""
    for name, rec in entry["files"].items():
        path = out_dir / name
        if not path.is_file():
            raise ExportError(f"{path}: missing file of {network}; run: {fix}")
        size = path.stat().st_size
        if size != rec["size"]:
            raise ExportError(f"{path}: {size} bytes but the manifest says {rec['size']} (truncated or replaced); "
                              f"run: {fix}")
        if sha256_file(path) != rec["sha256"]:
            raise ExportError(f"{path}: contents differ from the manifest (modified after export); run: {fix}")


def _holder(lock: Path) -> int:
    """The pid written in an export lock file if that process is alive, else 0."""
    try:
        pid = int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0
    return pid if pid and _alive(pid) else 0


def export_locked(out_dir: Path) -> bool:
    """Whether another live process holds `out_dir`'s export lock (a cheap look before loading a model to export)."""
    return _holder(out_dir / ".export.lock") not in (0, os.getpid())


@contextmanager
def export_lock(out_dir: Path):
    """One export per directory at a time: a second one is refused, naming the holder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = out_dir / ".export.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pid = _holder(lock)
        if pid:
            raise ExportLocked(f"{out_dir}: another export (pid {pid}) is writing here; wait for it to finish") from None
        lock.unlink(missing_ok=True)  # stale: its process is gone
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        for p in out_dir.glob(".*.tmp"):  # files of killed exports (this one holds the lock: none is live)
            p.unlink(missing_ok=True)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
