"""The Python API behind `unclip-run`: resolve the model and backend, export engines when missing, generate in
chunks no larger than the engines' max batch, and write PNGs."""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch

from unclip.engine.pipeline import Result, Settings, generate

log = logging.getLogger(__name__)
BACKENDS = ("onnxruntime", "tensorrt", "torch")
PRESET_NOTE = ("using the built-in '{name}' preset: its weights are random, so images look like noise; "
               "README.md 'Real Karlo weights' explains how to use Karlo's")


class UserError(Exception):
    """Bad input from the user; the message is one line naming the problem and the fix."""


def load_torch_model(model: str):
    """A preset name or a model folder -> UnCLIPModel (fp32, CPU)."""
    from unclip.models import PRESETS, ModelLoadError, build_preset, load_model
    if model in PRESETS:
        if model == "karlo":
            raise UserError("the 'karlo' preset is for shape checks (3.4 B random parameters); "
                            "pass --model PATH to a downloaded Karlo folder instead")
        return build_preset(model)
    try:
        return load_model(model)
    except ModelLoadError as e:
        raise UserError(str(e)) from None


def model_name(model: str) -> str:
    return Path(model).name if os.sep in model or Path(model).exists() else model


def default_engines_dir(model: str, precision: str) -> Path:
    return Path("engines") / f"{model_name(model)}-{precision}"


def _same_model(source: str | None, model: str) -> bool:
    """Whether an export's recorded source is `model` (a preset name, or the same folder however spelled)."""
    if not source or source == model:
        return True
    a, b = Path(source), Path(model)
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def make_backend(backend: str, model: str, engines: str | None, device: str, precision: str, max_batch: int,
                 notify=print):
    from unclip.export.artifacts import ExportError
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "torch":
        from unclip.engine.backend_torch import DTYPES, TorchBackend
        if precision not in DTYPES:
            raise UserError(f"--precision {precision!r} is not one of {', '.join(DTYPES)}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--device cuda: torch sees no CUDA GPU here; use --device cpu")
        return TorchBackend(load_torch_model(model), device, precision, max_batch)
    out = Path(engines) if engines else default_engines_dir(model, precision)
    fix = (f"unclip-export --model {model} --out {out} --precision {precision} --force"
           + (" --trt" if backend == "tensorrt" else ""))
    try:
        if backend == "onnxruntime":
            from unclip.engine.backend_ort import BackendUnavailable, OnnxRuntimeBackend
            try:
                import onnxruntime  # noqa: F401  (only checks that it is installed)
            except ImportError:
                raise UserError("the onnxruntime backend needs the onnxruntime package: pip install onnxruntime "
                                "(or onnxruntime-gpu for CUDA, never both)") from None
            if not (out / "manifest.json").exists():
                notify(f"no engines in {out}: exporting {model} ({precision}) first")
                from unclip.export.onnx_export import export_model
                export_model(load_torch_model(model), out, precision=precision, max_batch=max_batch, source=model)
            try:
                b = OnnxRuntimeBackend(out, device, fix)
            except BackendUnavailable as e:
                raise UserError(str(e)) from None
        else:
            from unclip.engine.backend_trt import TensorRTBackend
            b = TensorRTBackend(out, device, fix)
        if not _same_model(b.manifest.get("source"), model):
            raise UserError(f"{out} holds engines of {b.manifest['source']!r}, not {model!r}; pass --engines for "
                            f"another folder or run: {fix} --force")
        return b
    except ExportError as e:
        raise UserError(str(e)) from None


def _check_out(out: str) -> Path:
    out_dir = Path(out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".unclip-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror}); choose a writable folder") from None
    return out_dir


def run(prompt: str | None, model: str = "small", backend: str = "onnxruntime", engines: str | None = None,
        device: str = "cpu", precision: str = "fp32", out: str = "out", dump: str | None = None, max_batch: int = 4,
        settings: Settings = Settings(), progress=None, notify=print, variation: str | None = None,
        invert: bool = False, interpolate: tuple[str, str] | None = None, frames: int | None = None,
        text_diff: tuple[str, str] | None = None, amount: float = 0.25, prior_candidates: int = 1) -> list[Path]:
    """Generate images (text to image, or a variation / interpolation / text diff); returns the PNG paths."""
    from unclip.engine import manipulate as mp
    if sum(x is not None for x in (interpolate, text_diff)) > 1:
        raise UserError("--interpolate and --text-diff can't be combined; choose one")
    if interpolate is not None and (frames is None or frames < 2):
        raise UserError(f"--frames must be at least 2 for --interpolate, got {frames}")
    if text_diff is not None and frames is not None and frames < 2:
        raise UserError(f"--frames must be at least 2 for a --text-diff sweep, got {frames}")
    if not 0.0 <= amount <= 1.0:
        raise UserError(f"--amount {amount} is outside [0, 1]; the paper uses 0.25 to 0.5")
    if prior_candidates < 1:
        raise UserError(f"--prior-candidates must be at least 1, got {prior_candidates}")
    if invert and variation is None:
        raise UserError("--invert needs --variation IMAGE (it inverts that image)")
    if prompt is None and variation is None and interpolate is None:
        raise UserError("give a PROMPT (\"\" for unconditional), or --variation IMAGE, or --interpolate A B")
    img = None
    if variation is not None:
        try:
            img = mp.load_image(variation)
        except mp.ImageInputError as e:
            raise UserError(str(e)) from None
    out_dir = _check_out(out)
    b = make_backend(backend, model, engines, device, precision, max_batch, notify)
    spec = b.spec
    if settings.size == 1024 and spec.sr1024_size is None:
        raise UserError(f"--size 1024: model {spec.name!r} has no 256->1024 stage (no sr1024/ folder); "
                        "use --size 256")
    if (img is not None or interpolate is not None) and spec.image_size is None and (
            img is not None or any(Path(x).is_file() for x in interpolate)):
        raise UserError(f"model {spec.name!r} has no image encoder (no image_encoder/ folder), which variations "
                        "need; use kakaobrain/karlo-v1-alpha-image-variations")
    params = {"prompt": prompt or "", "seed": settings.seed,
              "steps": {k: v for k, v in asdict(settings).items() if k.endswith("_steps")},
              "guidance": {"prior": settings.prior_guidance, "decoder": settings.decoder_guidance},
              "sampler": settings.sampler, "eta": settings.eta, "negative": settings.negative, "model": model,
              "backend": backend, "precision": precision, "size": settings.size}
    from unclip.engine.outputs import save_dump, save_png
    from unclip.export.artifacts import ExportError
    try:
        if interpolate is not None or text_diff is not None:
            if interpolate is not None:
                frames_ = mp.interpolate(b, spec, settings, interpolate[0], interpolate[1], frames, progress)
                stem, extra = "interp", {"interpolate": list(interpolate)}
            else:
                source = variation if variation is not None else prompt
                frames_ = mp.text_diff(b, spec, settings, source, text_diff[0], text_diff[1], amount, frames or 1,
                                       progress)
                stem, extra = "edit", {"text_diff": list(text_diff), "amount": amount, "source": source}
            paths = [save_png(f, out_dir / f"{stem}-{settings.seed}-{k}.png", {**params, **extra, "frame": k})
                     for k, f in enumerate(frames_)]
            if len(frames_) > 1:
                paths.append(save_png(mp.contact_sheet(frames_), out_dir / f"{stem}-{settings.seed}-sheet.png",
                                      {**params, **extra}))
            return paths
        chunk = max(1, min(b.max_batch(n) // (2 if n in ("prior", "decoder") else 1)
                           for n in ("prior", "decoder", "sr256_first")) // prior_candidates)
        results: list[Result] = []
        for first in range(0, settings.num_images, chunk):
            n = min(chunk, settings.num_images - first)
            s = replace(settings, num_images=n)
            if img is not None:
                results.append(mp.variation(b, spec, s, img, invert, progress, keep=dump is not None,
                                            first_image=first))
            else:
                results.append(generate(b, spec, prompt, s, progress=progress, first_image=first,
                                        keep=dump is not None, candidates=prior_candidates))
    except ExportError as e:  # engines are checked lazily, on their first call
        raise UserError(str(e)) from None
    except ValueError as e:
        raise UserError(str(e)) from None
    images = torch.cat([r.images for r in results])
    stem = "var" if img is not None else str(settings.seed)
    if img is not None:
        params.update(variation=str(variation), invert=invert)
    paths = [save_png(im, out_dir / (f"{stem}-{settings.seed}-{i}.png" if img is not None else f"{stem}-{i}.png"),
                      {**params, "image_index": i}) for i, im in enumerate(images)]
    if dump:
        inter = {k: torch.cat([r.intermediates[k].cpu() for r in results]) for k in results[0].intermediates}
        # Images as float32 (B, 3, H, W) in [-1, 1]; tokens/mask of the batch as run ([uncond; cond] with guidance).
        save_dump(Path(dump), inter, {"settings": asdict(settings), "model": model, "backend": backend,
                                      "precision": precision, "prompt": prompt, "timesteps": results[0].timesteps})
    return paths
