"""The HTTP ingress (FastAPI on Ray Serve) and the application: `build_app(ServeConfig)` from Python or the CLI,
`app_builder` for `serve run` (its `args:` are ServeConfig's fields).

A request is validated here, once, then split into one job per image (seed + i); each job goes through the stage
deployments (prior -> decoder -> sr256 -> sr1024, up to its size) on its own, so jobs of concurrent requests meet
in the stages' batches. Routes: POST /v1/images, POST /v1/variations, GET /healthz; OpenAPI docs at /docs."""

import asyncio
import math
import time
from dataclasses import asdict

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import RequestCancelledError
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException
from unclip.core.spec import ModelSpec
from unclip.engine.backend import model_name
from unclip.engine.pipeline import image_sizes
from unclip.serve.config import STAGES, ServeConfig, model_stages
from unclip.serve.errors import read_upload, stage_failure
from unclip.serve.jobs import Job
from unclip.serve.responses import respond, wants_png
from unclip.serve.schema import (
    Fail,
    ImagesRequest,
    VariationRequest,
    per_image,
    settings_of,
    warnings,
)
from unclip.serve.stages import SECONDS_BUCKETS, StageReplica

api = FastAPI(title="unCLIP", version="1", description="Text-to-image (unCLIP / DALL-E 2) on Ray Serve: each image "
              "of a seed equals what unclip-run writes for it, on the same backend.")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@api.exception_handler(Fail)
async def _fail(_, e: Fail):
    return _error(e.status, str(e))


@api.exception_handler(RequestValidationError)
async def _invalid(_, e: RequestValidationError):
    return _error(422, one_line(e.errors()))


@api.exception_handler(HTTPException)
async def _http(_, e: HTTPException):
    return _error(e.status_code, str(e.detail))


@api.exception_handler(Exception)
async def _bug(_, e: Exception):
    return _error(500, f"internal error in the ingress ({type(e).__name__}); its replica's log has the traceback")


def one_line(errors: list[dict], prefix: str = "") -> str:
    """pydantic's first error as `field: what is wrong` (the body's own location left out)."""
    err = errors[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{prefix}{loc}: {err.get('msg', 'invalid')}{more}"


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, cfg: ServeConfig, prior, decoder, sr256, sr1024):
        self.cfg = cfg
        self.stages = {s: h for s, h in zip(STAGES, (prior, decoder, sr256, sr1024)) if h is not None}
        self.spec: ModelSpec | None = None
        self.per_call = 0
        self.requests = Counter("unclip_requests", "HTTP requests by route and status", tag_keys=("route", "status"))
        self.seconds = Histogram("unclip_request_seconds", "request latency by route", SECONDS_BUCKETS,
                                 tag_keys=("route",))

    async def _model(self) -> ModelSpec:
        if self.spec is None:
            info = await self._call("prior", "info", set())
            self.spec, self.per_call = ModelSpec.from_json(info["spec"]), info["per_call"]
        return self.spec

    @api.get("/healthz")
    async def healthz(self):
        """200 when every stage deployment answers, 503 naming those that don't."""
        async def ping(stage: str) -> str:
            try:
                await asyncio.wait_for(self._call(stage, "info", set()), 10)
                return "ok"
            except (Fail, asyncio.TimeoutError) as e:
                return str(e) or "no answer within 10 s"
        states = dict(zip(self.stages, await asyncio.gather(*map(ping, self.stages))))
        ok = all(v == "ok" for v in states.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": model_name(self.cfg.model),
                             "backend": self.cfg.backend, "stages": states}, status_code=200 if ok else 503)

    @api.post("/v1/images")
    async def images(self, body: ImagesRequest, request: Request):
        """Images of a prompt: JSON with base64 PNGs and their parameters, or `Accept: image/png` for one image."""
        async def parse():
            return (body,)

        async def jobs(s, inflight: set):
            return [Job(si, body.prompt, body.prior_candidates) for si in per_image(s)]
        return await self._serve("/v1/images", request, parse, jobs, {"prompt": body.prompt})

    @api.post("/v1/variations")
    async def variations(self, request: Request, image: UploadFile = File(..., description="PNG, JPEG or WebP"),
                         params: str = Form("{}", description="JSON: the fields of /v1/images but prompt, negative, "
                                                              "prior_candidates, steps.prior, guidance.prior")):
        """Variations of an uploaded image (its CLIP image embedding -> decoder -> upsamplers)."""
        async def parse():
            try:
                body = VariationRequest.model_validate_json(params)
            except ValidationError as e:
                raise Fail(422, one_line(e.errors(), "params.")) from None
            data = await image.read(self.cfg.max_upload_bytes + 1)
            pil = await asyncio.to_thread(read_upload, data, self.cfg.max_upload_bytes)
            spec = await self._model()
            if spec.image_size is None:
                raise Fail(422, f"model {spec.name!r} has no image encoder, so it makes no variations")
            return body, pil

        async def jobs(s, inflight: set, pil):
            return await self._call("prior", "variation_jobs", inflight, pil, s, s.num_images)
        extra = {"prompt": "", "variation": image.filename or "upload", "invert": False}
        return await self._serve("/v1/variations", request, parse, jobs, extra)

    async def _serve(self, route: str, request: Request, parse, start, extra: dict):
        t0, status = time.perf_counter(), 500
        try:
            body, *data = await parse()
            spec = await self._model()
            s = settings_of(body, self.cfg, spec, self.per_call)
            png = wants_png(request, s.num_images)
            timeout = min(body.timeout_s or math.inf, self.cfg.timeout_s)
            done = await self._run(lambda s, inflight: start(s, inflight, *data), s, timeout)
            params = {**extra, "seed": s.seed, "model": model_name(self.cfg.model), "backend": self.cfg.backend,
                      "precision": self.cfg.precision, "size": s.size or max(image_sizes(spec)),
                      **{k: v for k, v in asdict(s).items() if k not in ("seed", "size", "num_images")}}
            if "variation" in extra:
                params.pop("negative")
            answer = await asyncio.to_thread(respond, done, params, warnings(body, s, spec), png)  # off the loop
            status = 200
            return answer
        except Fail as e:
            status = e.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away
            raise
        finally:
            self.requests.inc(tags={"route": route, "status": str(status)})
            self.seconds.observe(time.perf_counter() - t0, tags={"route": route})

    async def _run(self, start, s, timeout: float) -> list[Job]:
        """Every job of the request through its stages, all of it cancelled after `timeout` seconds (504)."""
        inflight: set = set()
        try:
            return await asyncio.wait_for(self._pipeline(start, s, inflight), None if math.isinf(timeout) else timeout)
        except asyncio.TimeoutError:
            for r in inflight:
                r.cancel()
            raise Fail(504, f"the request ran longer than {timeout:g} s and was cancelled; ask for fewer images, "
                            "fewer steps or a smaller size, or retry when the service is less busy") from None

    async def _pipeline(self, start, s, inflight: set) -> list[Job]:
        spec = self.spec
        jobs = await start(s, inflight)

        async def through(job: Job) -> Job:
            if job.z is None:
                job = await self._call("prior", "run", inflight, job)
            for stage in job.stages(spec):
                job = await self._call(stage, "run", inflight, job)
            return job

        tasks = [asyncio.ensure_future(through(j)) for j in jobs]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:  # one image failed (or the request timed out): the others stop too
                t.cancel()
            for r in inflight:
                r.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # collected: no "exception never retrieved"
            raise

    async def _call(self, stage: str, method: str, inflight: set, *args):
        """One call of a stage deployment; its failures become one-line Fails (a dead replica: 503)."""
        resp = getattr(self.stages[stage], method).remote(*args)
        inflight.add(resp)
        try:
            out = await resp
        except (asyncio.CancelledError, RequestCancelledError):
            resp.cancel()  # a timeout or a client that went away: the stage drops the call if it has not started
            raise asyncio.CancelledError from None
        except Exception as e:
            raise stage_failure(stage, e) from None
        inflight.discard(resp)  # kept while running: a timeout cancels it
        return out


def build_app(cfg: ServeConfig):
    """The application: a deployment per stage of the model (each with its replicas and resources: four, or three
    for a model without sr1024) behind the ingress."""
    have = model_stages(cfg.model)
    stages = [StageReplica.options(name=s, **cfg.stages[s].ray_options()).bind(cfg, s) if s in have else None
              for s in STAGES]
    return Ingress.options(name="api").bind(cfg, *stages)


def app_builder(args: dict):
    """For `serve run unclip.serve.app:app_builder model=demo ...` and config files (`args:`)."""
    return build_app(ServeConfig.from_args(dict(args)))
