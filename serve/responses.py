"""The HTTP answers of the ingress: which form the client accepts, and the images as PNGs (base64 in JSON with the
parameters, or one `image/png`). A module of its own: Ray pickles the ingress class, and helpers it calls must be
importable by name in the replica."""
import base64
import io
import json

from fastapi.responses import JSONResponse, Response
from starlette.requests import Request
from unclip.engine.pipeline import to_uint8
from unclip.serve.jobs import Job
from unclip.serve.schema import Fail


def wants_png(request: Request, n: int) -> bool:
    accept = request.headers.get("accept", "")
    if "image/png" not in accept or "application/json" in accept:
        return False
    if n != 1:
        raise Fail(406, f"Accept: image/png returns one image; this request asks for {n} (num_images): ask for 1, "
                        "or accept application/json")
    return True


def png_bytes(image, params: dict) -> bytes:
    """(H, W, 3) uint8 -> PNG with every parameter as a tEXt chunk, as unclip-run writes them."""
    from PIL import Image, PngImagePlugin
    info = PngImagePlugin.PngInfo()
    for k, v in params.items():
        info.add_text(str(k), v if isinstance(v, str) else json.dumps(v))
    buf = io.BytesIO()
    Image.fromarray(image.numpy()).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def respond(jobs: list[Job], params: dict, notes: list[str], png: bool):
    pngs = [png_bytes(to_uint8(j.image)[0], {**params, "image_index": i}) for i, j in enumerate(jobs)]
    if png:
        batches = ",".join(f"{k}={v}" for k, v in jobs[0].batches.items())
        return Response(pngs[0], media_type="image/png", headers={"X-Unclip-Seed": str(jobs[0].settings.seed),
                                                                  "X-Unclip-Batches": batches})
    images = [{"index": i, "seed": j.settings.seed, "png_base64": base64.b64encode(p).decode(),
               "stages": {k: {"batch": j.batches[k], "seconds": round(j.seconds[k], 4)} for k in j.batches}}
              for i, (j, p) in enumerate(zip(jobs, pngs))]
    return JSONResponse({"parameters": params, "warnings": notes, "images": images})
