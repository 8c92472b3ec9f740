"""A request to `unclip-run`, validated once, here: every error names its flag and what would be valid, and an
option that the request's mode doesn't use is a warning (or an error where ignoring it would surprise)."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from unclip.core import values
from unclip.core.errors import RequestError
from unclip.engine import samplers
from unclip.engine.backend import BACKENDS, PRECISIONS
from unclip.engine.pipeline import MAX_SEED, Settings

MODES = ("generate", "variation", "interpolate", "text_diff")
TORCH_MODES = ("eager", "static", "cuda-graphs", "compile")  # unclip.engine.backend_torch.MODES
MAX_IMAGES = 1000  # per request, unless raised with --max-images: every image is held until its chunk is saved
MAX_FRAMES = 200
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def looks_like_a_path(item: str) -> bool:
    """An --interpolate end that a user meant as an image file (an image suffix; a leading ./, ../ or ~/; a leading /
    with no space, unlike the prompt "/imagine a cat"): one that isn't a file is a mistyped path, not a prompt."""
    return (item.strip().lower().endswith(IMAGE_SUFFIXES) or item.startswith(("./", "../", "~/"))
            or (item.startswith("/") and not any(ch.isspace() for ch in item)))


def _quoted(words: list[str], most: int = 10) -> str:
    """Words for a one-line message: each cut to 40 characters, at most `most` of them."""
    shown = [w if len(w) <= 40 else w[:37] + "..." for w in words[:most]]
    return ", ".join(shown) + (f" and {len(words) - most} more" if len(words) > most else "")


def check_backend_choice(backend: str, precision: str, torch_mode: str) -> None:
    """A backend, a precision it offers and a torch mode; each error names its command-line flag."""
    if backend not in BACKENDS:
        raise RequestError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS[backend]:
        raise RequestError(f"--precision {precision} is not available with --backend {backend} "
                           f"(choose {', '.join(PRECISIONS[backend])})")
    if torch_mode not in TORCH_MODES:
        raise RequestError(f"--torch-mode {torch_mode!r} is not one of {', '.join(TORCH_MODES)}")


@dataclass(frozen=True)
class Request:
    prompt: str | None = None
    prompts: tuple[str, ...] | None = None  # --prompts FILE: one image per prompt
    settings: Settings = field(default_factory=Settings)
    model: str = "demo"
    backend: str = "onnxruntime"
    engines: str | None = None
    device: str = "cpu"
    precision: str = "fp32"
    max_batch: int = 4
    out: str = "out"
    dump: str | None = None
    overwrite: bool = False
    variation: str | None = None
    invert: bool = False
    interpolate: tuple[str, str] | None = None
    text_diff: tuple[str, str] | None = None
    frames: int | None = None
    amount: float = 0.25
    prior_candidates: int = 1
    max_images: int = MAX_IMAGES
    torch_mode: str = "eager"  # the torch backend's runtime: eager, static, cuda-graphs, compile

    @property
    def mode(self) -> str:
        return ("interpolate" if self.interpolate else "text_diff" if self.text_diff else
                "variation" if self.variation is not None else "generate")

    @property
    def texts(self) -> list[str]:
        """The prompts of a generation, one per image when given as a list."""
        return list(self.prompts) if self.prompts is not None else [self.prompt or ""]

    @property
    def images(self) -> int:
        return len(self.prompts) if self.prompts is not None else self.settings.num_images

    def __post_init__(self):
        self._check_types()
        check_backend_choice(self.backend, self.precision, self.torch_mode)
        if self.max_batch < 1:
            raise RequestError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.prior_candidates < 1:
            raise RequestError(f"--prior-candidates must be at least 1, got {self.prior_candidates}")
        if not (math.isfinite(self.amount) and 0.0 <= self.amount <= 1.0):
            raise RequestError(f"--amount {self.amount} is outside [0, 1]; the paper uses 0.25 to 0.5")
        if self.max_images < 1:
            raise RequestError(f"--max-images must be at least 1, got {self.max_images}")
        if self.images > self.max_images:  # before the seed's range, which an absurd count would push below 0
            raise RequestError(f"{self.images} images exceed the cap of {self.max_images} per run; raise it with "
                               "--max-images N if you mean it")
        if not 0 <= self.settings.seed <= MAX_SEED - self.images + 1:
            raise RequestError(f"--seed must be in 0 ... {MAX_SEED - self.images + 1} (image i uses seed + i, up to "
                               f"2^63 - 1), got {self.settings.seed}")
        if self.dump is not None and not self.dump.strip():
            raise RequestError("--dump needs a folder name (it got an empty one); pass --dump DIR")
        for end in self.interpolate or ():
            if looks_like_a_path(end) and not Path(end).is_file():  # as the loader reads it: no ~ expansion
                raise RequestError(f"--interpolate {end!r} looks like an image path but is no file; check the path "
                                   "(a prompt as an end is plain words)")
        if self.prompts is not None and (self.prompt is not None or self.variation or self.interpolate):
            raise RequestError("--prompts FILE replaces PROMPT, --variation and --interpolate; give one of them")
        if self.prompts is not None and not self.prompts:
            raise RequestError("--prompts: the file has no prompts; write one per line")
        if self.interpolate and self.text_diff:
            raise RequestError("--interpolate and --text-diff can't be combined; choose one")
        if self.interpolate and self.variation is not None:
            raise RequestError("--interpolate takes both ends as A B (image paths or prompts); drop --variation")
        if self.text_diff and self.prompts is not None:
            raise RequestError("--text-diff edits one PROMPT (or --variation IMAGE), not --prompts FILE")
        if self.invert and self.variation is None:
            raise RequestError("--invert needs --variation IMAGE (it inverts that image)")
        self._check_frames()
        if self.mode == "generate" and self.prompt is None and self.prompts is None:
            raise RequestError("give a PROMPT (\"\" for unconditional), --prompts FILE, --variation IMAGE or "
                               "--interpolate A B")

    def _check_types(self):
        """Each field's type (a Python caller's values: numpy ints, Paths, config-file strings), normalised to what
        the command line gives, before any other check reads them."""
        def put(name, v):
            object.__setattr__(self, name, v)
        if not isinstance(self.settings, Settings):
            raise RequestError(f"settings must be an unclip.engine.pipeline.Settings, got {self.settings!r} "
                               f"({type(self.settings).__name__}); e.g. Settings(seed=1, num_images=4)")
        put("prompt", values.text("prompt", self.prompt, optional=True))
        if self.prompts is not None:
            put("prompts", values.texts("prompts", self.prompts))
        for name in ("backend", "device", "precision", "torch_mode"):
            values.text(name, getattr(self, name))
        put("model", values.path("model", self.model, what="a model folder"))
        put("out", values.path("out", self.out))
        put("engines", values.path("engines", self.engines, optional=True))
        put("dump", values.path("dump", self.dump, optional=True))
        if not isinstance(self.variation, (str, os.PathLike)) and hasattr(self.variation, "size"):  # PIL, array
            raise RequestError(f"--variation must be an image file's path (a str or pathlib.Path), got an object "
                               f"of type {type(self.variation).__name__}; save the image first, or pass it to "
                               "unclip.engine.manipulate.variation(backend, spec, settings, image)")
        put("variation", values.path("variation", self.variation, optional=True, what="an image file"))
        for name in ("overwrite", "invert"):
            put(name, values.flag(name, getattr(self, name)))
        if self.interpolate is not None:
            put("interpolate", values.pair("interpolate", self.interpolate, paths=True))
        if self.text_diff is not None:
            put("text_diff", values.pair("text_diff", self.text_diff))
        for name in ("max_batch", "prior_candidates", "max_images"):
            put(name, values.whole(name, getattr(self, name)))
        put("frames", values.whole("frames", self.frames, optional=True))
        put("amount", values.real("amount", self.amount))

    def _check_frames(self):
        if self.interpolate and self.frames is None:
            raise RequestError("--interpolate needs --frames N (N >= 2): how many frames from A to B")
        if self.frames is not None:
            if self.mode not in ("interpolate", "text_diff"):
                raise RequestError("--frames goes with --interpolate or --text-diff")
            if self.frames < (2 if self.mode == "interpolate" else 1):
                raise RequestError(f"--frames must be at least {2 if self.interpolate else 1}, got {self.frames}")
            if self.frames > MAX_FRAMES:
                raise RequestError(f"--frames {self.frames} is over the cap of {MAX_FRAMES}")

    def warnings(self, asked: Settings | None = None) -> list[str]:
        """Options this request sets that its mode or settings don't use; `asked`: the settings as given, before the
        model's own scales and step counts filled those left unset (default: this request's)."""
        s, d, out = self.settings, Settings(), []
        asked = asked or s
        if s.negative != d.negative and s.prior_guidance == 1.0 and s.decoder_guidance == 1.0:
            out.append("--negative is not used: with both guidance scales at 1 there is no unconditional half")
        if s.eta != d.eta and not samplers.get(s.sampler).uses_eta:
            out.append(f"--eta is not used by the {s.sampler} sampler (its noise is fixed by the schedule)")
        if self.mode == "interpolate" and self.prompt is not None:
            out.append("PROMPT is not used with --interpolate A B (the frames go from A to B)")
        if self.mode == "variation":  # the image's own embedding, decoded with an empty caption: no prior, no text
            unused = [flag for flag, used in (
                ("PROMPT", self.prompt is not None), ("--negative", s.negative != d.negative),
                ("--prior-steps", asked.prior_steps is not None),
                ("--prior-guidance", asked.prior_guidance is not None),
                ("--prior-candidates", self.prior_candidates != 1)) if used]
            if unused:
                out.append(f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used by --variation (its "
                           "image embedding is decoded with an empty caption: no prior, no text)")
        if self.invert and s.eta == 0:
            out.append("--invert with --eta 0 decodes the inversion deterministically back to IMAGE itself; pass "
                       "--eta > 0 (e.g. 1) for variations")
        if self.prompts is not None and s.num_images != 1:
            out.append("--num-images is not used with --prompts FILE (one image per line)")
        if self.mode != "text_diff" and self.amount != Request.amount:
            out.append("--amount is not used without --text-diff")
        if self.mode in ("interpolate", "text_diff"):
            for flag, used in (("--num-images", s.num_images != 1), ("--prior-candidates", self.prior_candidates != 1),
                               ("--dump", self.dump is not None), ("--invert", self.invert)):
                if used:
                    out.append(f"{flag} is not used with --interpolate / --text-diff (one sequence of frames)")
        if self.backend == "torch" and self.engines is not None:
            out.append("--engines is not used by --backend torch (it runs the networks themselves)")
        if self.backend != "torch" and self.torch_mode != "eager":
            out.append(f"--torch-mode is not used by --backend {self.backend}")
        return out

    def unknown_words(self, spec) -> list[str]:
        """A warning per text with words the model's tokenizer has never seen as words."""
        texts = self.texts + [self.settings.negative, *(self.text_diff or ()),
                              *(x for x in self.interpolate or () if not Path(x).is_file())]
        return [f"model {spec.name!r} has never seen these words: {_quoted(u)} (they still run, spelled out in "
                "pieces)" for t in texts if (u := spec.tokenizer.unknown_words(t))]

    def replace(self, **changes) -> Request:
        return dataclasses.replace(self, **changes)


def read_prompts(path: str) -> tuple[str, ...]:
    """--prompts FILE: one prompt per line (UTF-8), blank lines skipped."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first prompt
            return tuple(line.strip() for line in f if line.strip())
    except (OSError, UnicodeDecodeError) as e:
        raise RequestError(f"--prompts {path}: cannot read it as UTF-8 text ({getattr(e, 'strerror', '') or e}); "
                           "pass a text file, one prompt per line") from None
