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


def fingerprint(model: str) -> str:
    """A random preset's name and the package version (its weights come from code), or for a folder each weight,
    config and tokenizer file's name, size, mtime and first 64 KiB: cheap enough for every run, and any edit,
    copy-over or other folder changes it (a full hash of gigabytes per run would cost more than the run)."""
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
        h.update(f"{p.relative_to(root).as_posix()}:{st.st_size}:{st.st_mtime_ns}:".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 16))
    return h.hexdigest()


def source_path(model: str) -> str:
    """A built-in name, or the absolute path of a model folder (how a message names where engines came from)."""
    return model if model in NAMES else str(Path(model).resolve())
