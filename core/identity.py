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


FULL_HASH_BYTES = 64 << 20  # a folder whose fingerprinted files total up to this is hashed whole (the demo: 30 MB)


def fingerprint(model: str) -> str:
    """A random preset's name and the package version (its weights come from code), or for a folder each weight,
    config and tokenizer file's name and size with either its whole contents, where the folder's files total up to
    FULL_HASH_BYTES (the demo model, ~30 ms: a copy or a fresh clone of the same files matches, any edit doesn't),
    or its mtime and first 64 KiB (Karlo's gigabytes: cheap enough for every run, where a full hash would cost more
    than the run; an edit, copy-over or touch changes it). same_model also accepts the form written before.
    """
    h = hashlib.sha256()
    if model in RANDOM_PRESETS:
        h.update(f"preset:{model}:{_version()}".encode())
        return h.hexdigest()
    return _folder_fingerprint(_folder(model), h)


def same_model(recorded: str | None, model: str) -> bool:
    """Whether a fingerprint an export recorded is the model's: today's form, or for a small folder the form
    exports recorded before 2026-11-27 (every file by name, size, mtime and first 64 KiB, still today's form for a
    large folder), so engines exported then stay valid."""
    if not recorded:
        return False
    if recorded == fingerprint(model):
        return True
    return model not in RANDOM_PRESETS and recorded == _folder_fingerprint(_folder(model), hashlib.sha256(),
                                                                          whole=False)


def _folder(model: str) -> Path:
    root = demo_folder() if model == "demo" else Path(model)
    if not root.is_dir():
        raise ModelLoadError(f"{root}: no such model folder; pass the folder that holds model_index.json")
    return root


def _folder_fingerprint(root: Path, h, whole: bool | None = None) -> str:
    try:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".json",
                                                                                  ".txt")
                       and not any(part.startswith(".") for part in p.relative_to(root).parts)
                       and p.relative_to(root).as_posix() != GENERATION_CONFIG)
        stats = [(p, p.stat()) for p in files]
        if whole is None:
            whole = sum(st.st_size for _, st in stats) <= FULL_HASH_BYTES
        for p, st in stats:
            h.update(f"{p.relative_to(root).as_posix()}:{st.st_size}:{'' if whole else st.st_mtime_ns}:".encode())
            with open(p, "rb") as f:
                if whole:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                else:
                    h.update(f.read(1 << 16))
    except PermissionError as e:
        raise ModelLoadError(f"{e.filename}: permission denied; ask the folder's owner for read access") from None
    return h.hexdigest()


def source_path(model: str) -> str:
    """A built-in name, or the absolute path of a model folder (how a message names where engines came from)."""
    return model if model in NAMES else str(Path(model).resolve())
