"""The Backend protocol, and opening the backend a request names (exporting its engines on first use).

A backend runs networks by name on fp32 / int64 tensors on its device and returns fp32 tensors; it casts to its
compute precision itself. Its outputs are valid until its next call of the same network: whoever keeps one longer
copies it (TensorRT and static CUDA-graph buffers work that way). Every problem a backend meets that a user can fix
is an UnclipError with one line naming the fix.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable, Protocol

import torch
from unclip.core.errors import BackendError, BackendUnavailable, ExportError, ExportLocked, RequestError
from unclip.core.spec import ModelSpec

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "openvino", "tensorrt", "torch")
PRECISIONS = {"onnxruntime": ("fp32", "fp16"), "openvino": ("fp32", "bf16"), "tensorrt": ("fp32", "fp16"),
              "torch": ("fp32", "fp16", "bf16")}


def export_precision(backend: str, precision: str) -> str:
    """The precision of the ONNX graphs a backend runs: OpenVINO computes bf16 from the fp32 graphs itself."""
    return "fp32" if backend == "openvino" else precision


class Backend(Protocol):
    name: str
    spec: ModelSpec
    device: torch.device

    def run(self, network: str, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Outputs by name, valid until the next call of `network`."""

    def max_batch(self, network: str) -> int:
        """The largest batch `network` takes (guided networks: twice the images)."""


class ExportedGraphs:
    """What the backends of an export folder share: each network's manifest entry (dir, manifest, fix set by the
    backend) and the largest batch its profile takes."""
    dir: Path
    manifest: dict
    fix: str

    def entry(self, network: str) -> dict:
        entry = self.manifest["networks"].get(network)
        if entry is None:
            raise ExportError(f"{self.dir}: no {network} graph in this export; run: {self.fix}")
        return entry

    def max_batch(self, network: str) -> int:
        return self.entry(network)["profile"][2]


def failed(backend: str, network: str, e: BaseException) -> BackendError:
    """One line for a backend's failure while running a network, the same for every backend."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return BackendError(f"the {backend} backend failed to run {network} ({first}); if it ran out of memory, try a "
                        "smaller --max-batch or a lower --precision")


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise RequestError(f"--device {device!r} is not supported (choose cpu, cuda or cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"--device {device}: torch sees no CUDA GPU here; use --device cpu")
    return dev


def model_name(model: str) -> str:
    return Path(model).name if os.sep in model or Path(model).exists() else model


def default_engines(model: str, precision: str) -> Path:
    return Path("engines") / f"{model_name(model)}-{precision}"


def open_backend(req, notify: Callable[[str], None] = print) -> Backend:
    """The backend of a request (fields backend, model, engines, device, precision, max_batch): the torch networks,
    or the engines in req.engines (default engines/<model>-<precision>), exported first where they are missing."""
    assert req.precision in PRECISIONS[req.backend], (req.backend, req.precision)  # the Request checked it
    device = check_device(req.device)
    if req.backend == "torch":
        from unclip.engine.backend_torch import TorchBackend, native_bf16
        from unclip.models import resolve_model
        mode = getattr(req, "torch_mode", "eager")
        if mode == "cuda-graphs" and device.type != "cuda":
            raise RequestError("--torch-mode cuda-graphs needs --device cuda (use static for the same buffers on CPU)")
        if req.precision == "bf16" and device.type == "cpu" and not native_bf16():
            log.warning("this CPU has no native bf16 (AVX512-BF16 or AMX): torch emulates it, several times slower "
                        "than fp32; use --precision fp32")
        return TorchBackend(resolve_model(req.model), device, req.precision, req.max_batch, copy=False, mode=mode)
    precision = export_precision(req.backend, req.precision)
    out = Path(req.engines) if req.engines else default_engines(req.model, precision)
    fix = (f"unclip-export --model {req.model} --out {out} --precision {precision}"
           + (" --trt" if req.backend == "tensorrt" else ""))
    if req.backend == "onnxruntime":
        from unclip.core.packages import require_onnxruntime
        from unclip.engine.backend_ort import OnnxRuntimeBackend
        require_onnxruntime()
        ensure_export(req, out, notify)
        b = OnnxRuntimeBackend(out, req.device, fix, threads=getattr(req, "threads", None))
    elif req.backend == "openvino":
        from unclip.engine.backend_ov import OpenVINOBackend, require_openvino
        require_openvino()
        if device.type != "cpu":
            raise RequestError("--backend openvino runs on the CPU here: use --device cpu")
        ensure_export(req, out, notify)
        b = OpenVINOBackend(out, req.precision, fix, threads=getattr(req, "threads", None) or 0)
    else:
        from unclip.core.packages import require_tensorrt
        require_tensorrt()  # first: on a machine without it, what to install is the news
        if device.type != "cuda":
            raise RequestError("--backend tensorrt runs on an NVIDIA GPU: add --device cuda")
        from unclip.engine.backend_trt import TensorRTBackend
        b = TensorRTBackend(out, req.device, fix)
    check_export(b.manifest, out, req.model, precision, fix)
    b.spec = dataclasses.replace(b.spec, defaults=model_defaults(req.model))  # today's file, not the export's
    return b


def model_defaults(model: str) -> dict[str, float | int]:
    """The guidance scales and step counts of the model's generation_config.json ({} for a random preset or a
    folder without one)."""
    from unclip.core.identity import RANDOM_PRESETS, demo_folder
    if model in RANDOM_PRESETS:
        return {}
    from unclip.models.io import read_generation_config
    return read_generation_config(demo_folder() if model == "demo" else Path(model))


def check_export(manifest: dict, out: Path, model: str, precision: str, fix: str) -> None:
    """Refuse engines exported from another model, from this model before its weights changed, or at another
    precision than the one asked for."""
    from unclip.core.identity import same_model, source_path
    if not same_model(manifest.get("fingerprint"), model):
        if manifest.get("source_path") == source_path(model):  # the export keeps the networks that didn't change
            batch = (manifest.get("options") or {}).get("max_batch")  # at their batch (another batch: all again)
            raise ExportError(f"{out} holds engines of an earlier version of --model {model} (its files changed "
                              f"since); export the changed networks again: {fix}"
                              + (f" --max-batch {batch}" if isinstance(batch, int) and batch != 4 else ""))
        what = repr(manifest.get("source_path") or manifest.get("source") or "?")
        raise ExportError(f"{out} holds engines of {what}, not of --model {model}; pass --engines DIR for another "
                          f"folder, or re-export here: {fix} --force")
    exported = (manifest.get("options") or {}).get("precision")
    if exported != precision:
        raise ExportError(f"{out} holds {exported} engines, not {precision}; pass --precision {exported}, or "
                          f"--engines DIR for another folder, or re-export here: {fix} --force")


def ensure_export(req, out: Path, notify: Callable[[str], None], wait_s: float = 3600) -> None:
    """Export the model's networks into `out` unless they are all there: a first run exports, a run after an
    interrupted export finishes it, a run that finds the default folder's engines stale exports again
    (_stale_cache), and a run that finds another export at work waits for it."""
    import time

    from unclip.core.artifacts import export_locked, export_state
    deadline, told = time.monotonic() + wait_s, False
    while True:
        state = export_state(out)
        if state in ("complete", "partial") and _stale_cache(req, out):
            state = "stale"
        if state == "complete":
            return
        if state == "broken":
            raise ExportError(f"{out / 'manifest.json'}: its model description is unreadable; re-export: "
                              f"unclip-export --model {req.model} --out {out} --precision "
                              f"{export_precision(req.backend, req.precision)} --force")
        try:
            if export_locked(out):  # look before loading the model (gigabytes for Karlo) only to find the lock held
                raise ExportLocked(f"{out}: another export is writing here")
            return _export(req, out, state, notify)
        except ExportLocked:
            if time.monotonic() > deadline:
                raise
            if not told:
                notify(f"another export is writing {out}: waiting for it")
                told = True
            time.sleep(1.0)


def _export(req, out: Path, state: str, notify: Callable[[str], None]) -> None:
    from unclip.core.spec import spec_from_model
    from unclip.engine.pipeline import final_stage
    from unclip.export.onnx_export import export_model
    from unclip.models import resolve_model
    model = resolve_model(req.model)
    if getattr(req, "settings", None) is not None:
        final_stage(spec_from_model(model), req.settings.size)  # a size the model doesn't make: before any work
    precision = export_precision(req.backend, req.precision)
    what = {"partial": "finishing the interrupted export", "stale": "the engines are of an earlier version of "
            f"{req.model}"}.get(state, "no engines")
    notify(f"{what} in {out}: exporting {req.model} ({precision}) {'again' if state == 'stale' else 'first'}")
    max_batch = req.max_batch
    if state == "stale":  # keep the batch the folder was exported for (a server's --max-batch 16, say)
        from unclip.core.artifacts import read_manifest
        try:
            max_batch = max(max_batch, int((read_manifest(out, "").get("options") or {}).get("max_batch") or 0))
        except (ExportError, TypeError, ValueError):
            pass
    # no force: under the export's lock, engines of the same model folder edited since start a new manifest
    # (export.onnx_export._start_manifest), and a concurrent run that re-exported first is found up to date
    export_model(model, out, precision=precision, max_batch=max_batch, source=req.model)


def _stale_cache(req, out: Path) -> bool:
    """Whether `out` is the default engines folder (this tool's own cache: no --engines given) and holds engines
    of the same model before its weights or configs changed (a package upgrade, a retrained folder; for a folder
    over identity.FULL_HASH_BYTES, a new mtime): those are exported again (onnxruntime and openvino; tensorrt
    engines are built by unclip-export --trt). A complete folder the user named is refused by check_export with
    the fix."""
    from unclip.core.artifacts import read_manifest
    from unclip.core.identity import same_model, source_path
    if req.engines:
        return False
    try:
        manifest = read_manifest(out, "")
    except ExportError:
        return False
    return (manifest.get("source_path") == source_path(req.model)
            and not same_model(manifest.get("fingerprint"), req.model)
            and (manifest.get("options") or {}).get("precision") == export_precision(req.backend, req.precision))
