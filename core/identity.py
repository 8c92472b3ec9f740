"""Which model a name means, without loading it: the built-in names, the shipped demo folder, and a cheap
fingerprint of a model's weights that an export records and every run on its engines checks."""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
from pathlib import Path

from unclip.core.errors import ModelLoadError

RANDOM_PRESETS = ("tiny", "small", "karlo")  # seeded random weights, defined in unclip.models.presets
TRAINED = ("demo",)  # trained weights, shipped in the package
NAMES = TRAINED + RANDOM_PRESETS
# A model folder's default guidance scales and step counts (unclip.models.io.read_generation_config). Left out of
# the fingerprint: engines don't depend on them, and every backend reads them from the model folder when it opens.
GENERATION_CONFIG = "generation_config.json"


def demo_folder() -> Path:
    """The shipped demo model (a diffusers-layout folder inside the unclip.demo package)."""
    return Path(str(importlib.resources.files("unclip.demo") / "model"))


def _version() -> str:
    try:
        return importlib.metadata.version("unclip-engine")
    except importlib.metadata.PackageNotFoundError:
        return "0"


FULL_HASH_BYTES = 256 << 20  # files up to this size are hashed whole; larger ones by size, mtime and first 64 KiB


def fingerprint(model: str) -> str:
    """A random preset's name and the package version (its weights come from code), or for a folder each weight,
    config and tokenizer file's name and contents: hashed whole up to FULL_HASH_BYTES (the demo model: ~30 ms), so
    a copy or a fresh clone of the same files matches and any edit doesn't; a larger file (Karlo's, gigabytes) by
    its size, mtime and first 64 KiB, cheap enough for every run (a full hash would cost more than the run), so an
    edit, copy-over or touch of it changes the fingerprint."""
    h = hashlib.sha256()
    if model in RANDOM_PRESETS:
        h.update(f"preset:{model}:{_version()}".encode())
        return h.hexdigest()
    root = demo_folder() if model == "demo" else Path(model)
    if not root.is_dir():
        raise ModelLoadError(f"{root}: no such model folder; pass the folder that holds model_index.json")
    try:
        return _folder_fingerprint(root, h)
    except PermissionError as e:
        raise ModelLoadError(f"{e.filename}: permission denied; ask the folder's owner for read access") from None


def _folder_fingerprint(root: Path, h) -> str:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".txt")
                   and not any(part.startswith(".") for part in p.relative_to(root).parts)
                   and p.relative_to(root).as_posix() != GENERATION_CONFIG)
    for p in files:
        st = p.stat()
        whole = st.st_size <= FULL_HASH_BYTES
        h.update(f"{p.relative_to(root).as_posix()}:{st.st_size}:{'' if whole else st.st_mtime_ns}:".encode())
        with open(p, "rb") as f:
            if whole:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            else:
                h.update(f.read(1 << 16))
    return h.hexdigest()


def source_path(model: str) -> str:
    """A built-in name, or the absolute path of a model folder (how a message names where engines came from)."""
    return model if model in NAMES else str(Path(model).resolve())
