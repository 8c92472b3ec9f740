"""Writing results: PNGs with the generation parameters in text chunks, and the --dump intermediates."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_png(image: torch.Tensor, path: Path, params: dict) -> Path:
    """(H, W, 3) uint8 -> PNG with every parameter as a tEXt chunk (prompt, seed, steps, guidance, ...)."""
    from PIL import Image, PngImagePlugin
    info = PngImagePlugin.PngInfo()
    for k, v in params.items():
        info.add_text(str(k), v if isinstance(v, str) else json.dumps(v))
    img = Image.fromarray(image.numpy())
    _atomic(path, lambda tmp: img.save(tmp, format="PNG", pnginfo=info))
    return path


def _write_npy(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr)


def save_dump(folder: Path, intermediates: dict[str, torch.Tensor], meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, t in intermediates.items():
        arr = t.detach().cpu().numpy()
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        _atomic(folder / f"{name}.npy", lambda tmp, a=arr: _write_npy(tmp, a))
    _atomic(folder / "dump.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
