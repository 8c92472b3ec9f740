"""The HTTP API's request bodies, and turning one into pipeline Settings: validated once, here, at the edge. Each
error is one line naming the JSON field; the ingress answers it with a 4xx and {"error": message}."""
from __future__ import annotations

import re
from dataclasses import replace

from pydantic import BaseModel, ConfigDict, Field
from unclip.core.errors import RequestError
from unclip.engine import samplers
from unclip.engine.pipeline import Settings, final_stage, for_model
from unclip.serve.config import ServeConfig

D = Settings()
# Settings names command-line flags in its messages; the API names JSON fields.
FIELD_OF_FLAG = {"--prior-steps": "steps.prior", "--decoder-steps": "steps.decoder", "--sr256-steps": "steps.sr256",
                 "--sr1024-steps": "steps.sr1024", "--prior-guidance": "guidance.prior",
                 "--decoder-guidance": "guidance.decoder", "--num-images": "num_images", "--seed": "seed",
                 "--size": "size", "--sampler": "sampler", "--eta": "eta", "--negative": "negative"}


class Fail(Exception):
    """A request the service refuses: HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent default


class Steps(Strict):
    prior: int | None = Field(None, description="prior steps [default: the model's, else 25]")
    decoder: int | None = Field(None, description="decoder steps [default: the model's, else 25]")
    sr256: int | None = Field(None, description="first upsampler steps [default: the model's, else 7]")
    sr1024: int | None = Field(None, description="second upsampler steps [default: the model's, else 15]")


class Guidance(Strict):
    prior: float | None = Field(None, description="prior classifier-free guidance [default: the model's, else 4]")
    decoder: float | None = Field(None, description="decoder guidance [default: the model's (demo 3), else 8]")


class Common(Strict):
    seed: int = Field(D.seed, description="image i uses seed + i, as unclip-run does")
    num_images: int = Field(D.num_images, description="images of this request (capped by the server)")
    size: int | None = Field(None, description="image side in pixels, one of the model's stage sizes [default: "
                                               "the largest]")
    steps: Steps = Field(default_factory=Steps)
    guidance: Guidance = Field(default_factory=Guidance)
    sampler: str = Field(D.sampler, description=f"one of {', '.join(samplers.CHOICES)}")
    eta: float = Field(D.eta, description="DDIM noise (0: deterministic)")
    timeout_s: float | None = Field(None, gt=0, description="cancel the request after this many seconds (at most "
                                                            "the server's timeout)")


class ImagesRequest(Common):
    prompt: str = Field(..., description="the text to draw (\"\" for unconditional)")
    negative: str = Field(D.negative, description="prompt of the unconditional guidance half")
    prior_candidates: int = Field(1, description="sample N image embeddings per image, keep the one closest to the "
                                                 "text (paper: 2)")


class VariationRequest(Common):
    """A variation has no prior: steps.prior and guidance.prior are refused."""


def settings_of(req: Common, cfg: ServeConfig, spec, per_call: int) -> Settings:
    """The request's Settings, its caps checked; a Fail(422) names the field."""
    variation = isinstance(req, VariationRequest)
    if variation and (req.steps.prior is not None or req.guidance.prior is not None):
        raise Fail(422, "steps.prior and guidance.prior are not used by variations (they have no prior); drop them")
    if not 1 <= req.num_images <= cfg.max_images:
        raise Fail(422, f"num_images must be in 1 ... {cfg.max_images} (this server's cap per request), got "
                        f"{req.num_images}")
    for name, v in req.steps:
        if v is not None and v > cfg.max_steps:
            raise Fail(422, f"steps.{name} {v} is over this server's cap of {cfg.max_steps} steps")
    if not variation:
        for name in ("prompt", "negative"):
            if len(getattr(req, name)) > cfg.max_prompt_chars:
                raise Fail(422, f"{name} is {len(getattr(req, name))} characters, over this server's cap of "
                                f"{cfg.max_prompt_chars}")
        if not 1 <= req.prior_candidates <= per_call:
            raise Fail(422, f"prior_candidates must be in 1 ... {per_call} (the engines take {per_call} images per "
                            f"call), got {req.prior_candidates}")
    given = {"seed": req.seed, "num_images": req.num_images, "size": req.size, "sampler": req.sampler,
             "eta": req.eta, "negative": "" if variation else req.negative,
             **{f"{k}_steps": v for k, v in req.steps if v is not None},
             **{f"{k}_guidance": v for k, v in req.guidance if v is not None}}
    try:
        s = for_model(Settings(**given), spec)  # jobs carry the scales they run with: equal requests share a batch
        final_stage(spec, s.size)
    except RequestError as e:
        raise Fail(422, field_names(str(e))) from None
    for name, v in req.steps:  # the model's own step counts (generation_config.json) are capped too
        if v is None and not (variation and name == "prior") and getattr(s, f"{name}_steps") > cfg.max_steps:
            raise Fail(422, f"steps.{name}: the model's default of {getattr(s, f'{name}_steps')} steps is over this "
                            f"server's cap of {cfg.max_steps}; pass steps.{name}")
    return s


def field_names(message: str) -> str:
    """A Settings message with its flags spelt as the API's fields."""
    return re.sub(r"--[a-z0-9-]+", lambda m: FIELD_OF_FLAG.get(m.group(0), m.group(0)), message)


def warnings(req: Common, s: Settings, spec) -> list[str]:
    """Fields this request sets that its settings don't use, and words the model has never seen."""
    out = []
    if s.negative and s.prior_guidance == 1.0 and s.decoder_guidance == 1.0:
        out.append("negative is not used: with both guidance scales at 1 there is no unconditional half")
    if s.eta != D.eta and not samplers.get(s.sampler).uses_eta:
        out.append(f"eta is not used by the {s.sampler} sampler")
    last = final_stage(spec, s.size)
    for stage in ("sr256", "sr1024"):
        if getattr(req.steps, stage) is not None and (last == "decoder" or (stage == "sr1024" and last == "sr256")):
            out.append(f"steps.{stage} is not used at size {s.size} (the {last} stage makes it)")
    for text in (getattr(req, "prompt", ""), s.negative):
        if unknown := spec.tokenizer.unknown_words(text):
            out.append(f"model {spec.name!r} has never seen these words: {', '.join(unknown)}")
    return out


def per_image(s: Settings) -> list[Settings]:
    """Image i's settings: seed + i, one image."""
    return [replace(s, seed=s.seed + i, num_images=1) for i in range(s.num_images)]
