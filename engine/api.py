"""The Python API behind `unclip-run`: run(Request) opens the backend, runs the request's mode in chunks no larger
than the engines' batch, and writes each chunk's PNGs as soon as it is done."""
from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

import torch
from unclip.core.console import images_progress
from unclip.core.errors import RequestError
from unclip.engine import manipulate as mp
from unclip.engine.backend import model_name, open_backend
from unclip.engine.outputs import check_dump, check_writable, save_dump, save_png
from unclip.engine.pipeline import generate, image_sizes, images_per_call, timesteps
from unclip.engine.request import Request

log = logging.getLogger(__name__)


def run(req: Request, progress=None, notify=print, written: list | None = None) -> list[Path]:
    """Generate, vary, interpolate or edit as `req` says; returns the PNG paths (also appended to `written` as
    each is saved, so a caller that is interrupted knows what was kept)."""
    out = check_writable(req.out, "--out")
    dump = check_dump(req.dump, req.overwrite) if req.dump else None
    image = mp.load_image(req.variation) if req.variation is not None else None
    b = open_backend(req, notify)
    asked, req = req.settings, replace(req, settings=mp.for_model(req.settings, b.spec))  # the guidance it runs with
    for w in req.warnings(asked) + req.unknown_words(b.spec):  # after the model's scales are known (--negative at 1)
        log.warning(w)
    written = [] if written is None else written  # a variation's record: no prompt, negative or prior (it uses none)
    unused = ("seed", "size", "num_images") + ("negative", "prior_steps", "prior_guidance") * (req.mode == "variation")
    params = {"prompt": "" if req.mode == "variation" else req.prompt or "", "seed": req.settings.seed,
              "model": model_name(req.model), "backend": req.backend, "precision": req.precision,
              "size": req.settings.size or max(image_sizes(b.spec)),
              **{k: v for k, v in asdict(req.settings).items() if k not in unused}}

    def save(img, name, extra):
        written.append(save_png(img, out / name, {**params, **extra}, req.overwrite))

    if req.mode in ("interpolate", "text_diff"):
        _frames(req, b, image, save, progress)
    else:
        results = _images(req, b, image, save, progress)
        if dump is not None:
            inter = {k: torch.cat([r.intermediates[k].cpu() for r in results]) for k in results[0].intermediates}
            save_dump(dump, inter, {"settings": asdict(req.settings), "model": model_name(req.model),
                                    "backend": req.backend, "precision": req.precision, "prompts": req.texts,
                                    "timesteps": timesteps(b.spec, req.settings)})
    return written


def _images(req: Request, b, image, save, progress) -> list:
    """Text to image (one prompt x num_images, or one image per prompt) or variations, chunk by chunk."""
    per_call = images_per_call(b)
    if per_call < req.prior_candidates:
        raise RequestError(f"--prior-candidates {req.prior_candidates} needs engines that take that many images per "
                           f"call; these take {per_call}: re-export with --max-batch {req.prior_candidates}")
    chunk = per_call // req.prior_candidates
    total, results = req.images, []
    for first in range(0, total, chunk):
        n = min(chunk, total - first)
        s = replace(req.settings, num_images=n)
        step = images_progress(progress, first, n, total)
        if image is not None:
            res = mp.variation(b, b.spec, s, image, req.invert, step, keep=req.dump is not None, first_image=first)
        else:
            which = req.prompt or "" if req.prompts is None else list(req.prompts[first:first + n])
            res = generate(b, b.spec, which, s, step, first, keep=req.dump is not None,
                           candidates=req.prior_candidates)
        for i, im in enumerate(res.images, start=first):
            if image is not None:
                save(im, f"var-{req.settings.seed}-{i}.png", {"variation": Path(req.variation).name,
                                                               "invert": req.invert, "image_index": i})
            else:
                save(im, f"{req.settings.seed}-{i}.png", {"prompt": req.texts[i % len(req.texts)], "image_index": i})
        results.append(res if req.dump is not None else None)
    return results


def _frames(req: Request, b, image, save, progress) -> None:
    if req.mode == "interpolate":
        a, z = (mp.image_or_prompt(x) for x in req.interpolate)
        frames = mp.interpolate(b, b.spec, req.settings, a, z, req.frames, progress)
        stem, extra = "interp", {"interpolate": [Path(x).name if Path(x).is_file() else x for x in req.interpolate]}
    else:
        source = image if image is not None else req.prompt or ""
        frames = mp.text_diff(b, b.spec, req.settings, source, req.text_diff, req.amount, req.frames or 1, progress)
        stem, extra = "edit", {"text_diff": list(req.text_diff), "amount": req.amount}
    done = []
    for k, f in enumerate(frames):  # each frame is saved as soon as it is made
        save(f, f"{stem}-{req.settings.seed}-{k}.png", {**extra, "frame": k})
        done.append(f)
    if len(done) > 1:
        save(mp.contact_sheet(done), f"{stem}-{req.settings.seed}-sheet.png", extra)

