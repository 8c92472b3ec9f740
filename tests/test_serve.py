"""unclip-serve on the tiny model: stage batches across requests keep every image bit-identical to the Python API's
image for its seed (first without Ray, then through a local Ray Serve under concurrency), batches larger than one
form, every bad request gets its 4xx and one-line reason, a killed replica is replaced. Ray is shut down at the end
and no process of it is left."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from refs import descendants, free_port
from unclip.engine.backend_ort import OnnxRuntimeBackend
from unclip.engine.backend_torch import TorchBackend
from unclip.engine.manipulate import load_image, variation
from unclip.engine.pipeline import Settings, encode_text, generate, to_uint8
from unclip.models import build_preset
from unclip.serve.cores import Cores
from unclip.serve.jobs import (
    Job,
    join_text,
    lanes,
    run_decoder,
    run_in_lanes,
    run_prior,
    run_upsampler,
    split_text,
)

FAST = Settings(prior_steps=3, decoder_steps=3, sr256_steps=2, size=64,  # tiny: 16 / 64 / 256 px
               prior_guidance=4.0, decoder_guidance=8.0)  # resolved, as serve.schema hands jobs their settings
STEPS = {"prior": 3, "decoder": 3, "sr256": 2}


@pytest.fixture(scope="module")
def engines(tiny_export):
    return tiny_export  # conftest: exported once per session, read only here


@pytest.fixture(scope="module")
def ort(engines):
    return OnnxRuntimeBackend(engines)


@pytest.fixture(scope="module", params=["onnxruntime", "torch"])
def backend(request, ort):
    return ort if request.param == "onnxruntime" else TorchBackend(build_preset("tiny"))


def alone(b, prompt: str, s: Settings) -> torch.Tensor:
    """The Python API's image for one seed: (H, W, 3) uint8."""
    return generate(b, b.spec, prompt, replace(s, num_images=1)).images[0]


# --- the stage functions, without Ray --------------------------------------------------------------------------

def test_images_batched_across_requests_equal_each_alone(backend):
    asks = [("a red circle", replace(FAST, seed=5)), ("a blue square", replace(FAST, seed=77, negative="green")),
            ("", replace(FAST, seed=2 ** 40)), ("a red circle", replace(FAST, seed=6, size=16))]
    jobs = [Job(s, p) for p, s in asks]
    run_prior(backend, jobs, per_call=4)
    run_decoder(backend, jobs, per_call=4)
    run_upsampler(backend, "sr256", [j for j in jobs if j.settings.size == 64], per_call=4)
    for j, (p, s) in zip(jobs, asks):
        assert torch.equal(to_uint8(j.image)[0], alone(backend, p, s)), (backend.name, p, s.seed)
    assert [j.batches for j in jobs[:3]] == [{"prior": 4, "decoder": 4, "sr256": 3}] * 3


def test_jobs_share_the_calls_of_the_stages_whose_settings_match(ort):
    """Each stage batches the jobs whose settings it reads are the same; the images stay each one's image alone."""
    asks = [replace(FAST, seed=1), replace(FAST, seed=2, decoder_guidance=1.0), replace(FAST, seed=3),
            replace(FAST, seed=4, prior_guidance=1.0, decoder_guidance=1.0),  # unguided text rows: a call of its own
            replace(FAST, seed=5, sr256_steps=3)]
    jobs = [Job(s, "a red circle") for s in asks]
    run_prior(ort, jobs, per_call=4)
    run_decoder(ort, jobs, per_call=4)
    run_upsampler(ort, "sr256", jobs, per_call=4)
    assert [j.batches for j in jobs] == [{"prior": 4, "decoder": 3, "sr256": 4}, {"prior": 4, "decoder": 1, "sr256": 4},
                                         {"prior": 4, "decoder": 3, "sr256": 4}, {"prior": 1, "decoder": 1, "sr256": 4},
                                         {"prior": 4, "decoder": 3, "sr256": 1}]
    for j, s in zip(jobs, asks):
        assert torch.equal(to_uint8(j.image)[0], alone(ort, "a red circle", s)), s
    chunked = run_prior(ort, [Job(replace(FAST, seed=s)) for s in range(5)], per_call=2)  # the engines' size
    assert [j.batches["prior"] for j in chunked] == [2, 2, 2, 2, 1]


def test_a_failing_call_is_run_again_job_by_job(ort):
    """One request's failure (a NaN image embedding here) stays with its job; the others' images are exact."""
    jobs = [Job(replace(FAST, seed=s), "a red circle") for s in (12, 13, 14)]
    run_prior(ort, jobs, per_call=4)
    jobs[1].z = torch.full_like(jobs[1].z, float("nan"))
    calls = []
    run_decoder(ort, jobs, per_call=4, on_call=lambda n, _: calls.append(n))
    assert calls == [1, 1, 1], calls  # the batch of 3 failed (not counted), then each alone
    assert jobs[1].error is not None and "decoder" in str(jobs[1].error) and jobs[1].image is None
    run_upsampler(ort, "sr256", jobs, per_call=4)
    assert jobs[0].batches["sr256"] == 2 and "sr256" not in jobs[1].batches
    for j in (jobs[0], jobs[2]):
        assert j.error is None and torch.equal(to_uint8(j.image)[0], alone(ort, "a red circle", j.settings))


def test_lanes_split_a_batch_evenly_in_arrival_order():
    jobs = [Job(replace(FAST, seed=s)) for s in range(7)]
    seeds = lambda parts: [[j.settings.seed for j in p] for p in parts]
    assert seeds(lanes(jobs, 2)) == [[0, 1, 2, 3], [4, 5, 6]]
    assert seeds(lanes(jobs, 3)) == [[0, 1, 2], [3, 4], [5, 6]]
    assert seeds(lanes(jobs[:1], 4)) == [[0]] and seeds(lanes(jobs, 1)) == [list(range(7))]
    assert seeds(lanes(jobs[:2], 16)) == [[0], [1]]


def test_lanes_on_single_threaded_sessions_give_each_image_alone(engines, ort):
    """A batch run as two lanes at once, each on its own thread with one-thread onnxruntime sessions, gives every job
    the image generate() makes alone with the default (all-core) sessions."""
    one = OnnxRuntimeBackend(engines, threads=1)
    for b, threads in ((one, 1), (ort, 0)):  # 0: onnxruntime's default, the cores
        opts = b.session("decoder")[0].get_session_options()
        assert opts.intra_op_num_threads == threads
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"  # idle threads sleep
    asks = [("a red circle", 21), ("a blue square", 22), ("two green triangles", 23), ("", 24), ("a yellow star", 25)]
    jobs = [Job(replace(FAST, seed=s), p) for p, s in asks]
    threads, calls = torch.get_num_threads(), []
    for stage in ("prior", "decoder", "sr256"):
        run_in_lanes(one, stage, jobs, per_call=4, cores=2,
                     on_call=lambda n, _: calls.append((threading.current_thread().name.split("_")[0], n)))
    assert torch.get_num_threads() == threads  # restored
    assert sorted(calls) == sorted([(f"{st}-lane", n) for st in ("prior", "decoder", "sr256") for n in (3, 2)]), calls
    for j, (p, s) in zip(jobs, asks):
        assert j.batches == {"prior": 3 if s < 24 else 2, "decoder": 3 if s < 24 else 2, "sr256": 3 if s < 24 else 2}
        assert torch.equal(to_uint8(j.image)[0], alone(ort, p, replace(FAST, seed=s))), (p, s)


def test_cores_are_shared_through_lock_files(tmp_path):
    """Two replicas' views of one machine's 2 cores (flock conflicts between open files, so one process shows it)."""
    a, b = Cores(2, "cpu", folder=str(tmp_path)), Cores(2, "cpu", folder=str(tmp_path))
    assert a.free() == 2 and a.idle()
    give_back = a.try_one(rank=1)
    assert give_back is not None and b.free() == 1 and not b.idle()
    other = b.try_one(rank=0)
    assert other is not None and a.free() == 0 and a.try_one(rank=3) is None  # none left
    give_back(), other()
    assert b.free() == 2 and b.idle()
    with a.waiting(rank=2):  # a replica of sr256 waits: the machine is not idle, and earlier stages let it go first
        assert b.free() == 2 and not b.idle()
        assert b.later_waiting(0) and b.later_waiting(1) and not b.later_waiting(2)
        assert b.try_one(rank=1) is None
        later = b.try_one(rank=3)
        assert later is not None and a.free() == 1
        later()
    with a.every() as n:
        assert n == 2 and b.free() == 0 and b.try_one(rank=3) is None


def test_lanes_start_as_cores_come_free(engines, ort):
    """With one core free at first, the second lane starts when the acquire function gives it another one."""
    one = OnnxRuntimeBackend(engines, threads=1)
    jobs = [Job(replace(FAST, seed=s), "a red circle") for s in (31, 32, 33, 34)]
    asked, started, released = [], [], []
    def acquire():
        asked.append(len(started))
        if len(started) == 1 and len(asked) < 4:
            return None  # the second core is busy for the first three asks
        started.append(len(asked))
        return lambda: released.append(threading.current_thread().name.split("_")[0])
    waits = []
    run_in_lanes(one, "prior", jobs, per_call=4, cores=2, acquire=acquire,
                 waiting=lambda: (waits.append(1), contextlib.nullcontext())[1])
    assert started == [1, 4] and asked == [0, 1, 1, 1] and waits == [1]
    assert released == ["prior-lane", "prior-lane"]  # each lane gave its core back, from its own thread
    assert [j.batches["prior"] for j in jobs] == [2, 2, 2, 2]
    for s, j in zip((31, 32, 33, 34), jobs):
        assert j.z is not None and j.error is None, s


def test_text_rows_split_and_join_back(ort):
    for s in (FAST, replace(FAST, prior_guidance=1.0, decoder_guidance=1.0)):
        t = encode_text(ort, ort.spec, ["a", "b c", "d"], s, negatives=["x", "", "y"])
        back = join_text(split_text(t), ort.device)
        assert back.guided == t.guided and len(split_text(t)) == 3
        for name in ("ids", "mask", "e", "H"):
            assert torch.equal(getattr(back, name), getattr(t, name)), name


# --- the service on a local Ray ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def service(engines, tmp_path_factory):
    import ray
    from ray import serve
    from unclip.serve.app import build_app
    from unclip.serve.config import ServeConfig
    port, metrics = free_port(), free_port()
    cfg = ServeConfig(model="tiny", engines=str(engines), cores=2, max_images=4, max_prompt_chars=100, max_steps=5000,
                      max_upload_bytes=20_000, batch_wait_s=0.05, timeout_s=120)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2 ** 20,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), _metrics_export_port=metrics)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg), name="unclip", route_prefix="/")
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics}/metrics"
    finally:
        ours = descendants(os.getpid())
        serve.shutdown()
        ray.shutdown()
        deadline = time.monotonic() + 60
        while (left := ours & descendants(os.getpid())) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"Ray left processes behind: {sorted(left)}"


@pytest.fixture
def url(service):
    return service[0]


def post(url: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict | bytes, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            status, raw, hdrs = r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        status, raw, hdrs = e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}
    return status, (json.loads(raw) if hdrs.get("content-type", "").startswith("application/json") else raw), hdrs


def decoded(item: dict) -> torch.Tensor:
    from PIL import Image
    return torch.from_numpy(np.array(Image.open(io.BytesIO(base64.b64decode(item["png_base64"]))).convert("RGB")))


def test_concurrent_requests_equal_the_python_api_and_share_batches(url, ort):
    asks = [{"prompt": "a red circle", "seed": 11, "num_images": 2}, {"prompt": "a blue square", "seed": 400},
            {"prompt": "two green triangles", "seed": 7, "negative": "red"}, {"prompt": "", "seed": 2 ** 50},
            {"prompt": "a red circle", "seed": 90, "size": 16}, {"prompt": "a yellow star", "seed": 3}]
    asks = [{"steps": STEPS, "size": 64, **a} for a in asks]
    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda a: post(url + "/v1/images", a), asks))
    batches = []
    for a, (status, body, _) in zip(asks, answers):
        assert status == 200, body
        assert len(body["images"]) == a.get("num_images", 1)
        for i, item in enumerate(body["images"]):
            s = replace(FAST, seed=a["seed"] + i, size=a["size"], negative=a.get("negative", ""))
            assert item["seed"] == a["seed"] + i
            assert torch.equal(decoded(item), alone(ort, a["prompt"], s)), (a, i)
            if a.get("num_images", 1) == 1:  # a batch > 1 holding a one-image request: across requests
                batches += [v["batch"] for v in item["stages"].values()]
    assert max(batches) > 1, f"no stage ran two requests' images in one batch under concurrency: {batches}"


def test_prometheus_metrics_show_the_batches_and_requests(service):
    """Ray's Prometheus endpoint: per stage, images per batch (a batch of more than one ran under the concurrency of
    the test above), seconds per batch; requests by route and status."""
    deadline, text = time.monotonic() + 90, ""
    larger: list[str] = []
    while time.monotonic() < deadline:  # Ray exports metrics every few seconds, each replica's on its own clock
        with urllib.request.urlopen(service[1], timeout=30) as r:
            text = r.read().decode()
        series = _series(text)
        # calls of more than one image: more observations in all than in the bucket of at most 1
        larger = [st for st in ("prior", "decoder", "sr256") if series.get(("ray_unclip_stage_batch_images_count", st), 0)
                  > series.get(("ray_unclip_stage_batch_images_bucket", st, "1.0"), 0)]
        # every series the asserts below read: each stage's replica exports on its own clock
        if series.get(("ray_unclip_requests_total", "/v1/images", "200"), 0) >= 6 and larger and \
                series.get(("ray_unclip_request_seconds_count", "/v1/images"), 0) >= 6 and \
                series.get(("ray_unclip_stage_batch_seconds_count", "decoder"), 0) >= 1 and \
                all(("ray_unclip_stage_batch_images_bucket", st, "1.0") in series
                    for st in ("prior", "decoder", "sr256")):
            break
        time.sleep(2)
    assert series.get(("ray_unclip_requests_total", "/v1/images", "200"), 0) >= 6, sorted(series)[:20]
    assert all(("ray_unclip_stage_batch_images_bucket", st, "1.0") in series for st in ("prior", "decoder", "sr256")), \
        sorted(k for k in series if "batch_images" in k[0])
    assert larger, {k: v for k, v in series.items() if "batch_images" in k[0]}
    assert series.get(("ray_unclip_stage_batch_seconds_count", "decoder"), 0) >= 1, sorted(series)
    assert series.get(("ray_unclip_request_seconds_count", "/v1/images"), 0) >= 6


def _series(text: str) -> dict[tuple, float]:
    """Prometheus text -> {(name, stage[, le]) or (name, route[, status]): value summed over replicas}."""
    import re
    out: dict[tuple, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(ray_unclip_\w+)\{(.*)\} (\S+)$", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        key = (m.group(1), *(labels[k] for k in ("stage", "route", "status", "le") if k in labels))
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def test_one_image_as_png_and_a_variation(url, ort, tmp_path):
    from PIL import Image
    status, png, headers = post(url + "/v1/images", {"prompt": "a cat", "seed": 4, "steps": STEPS, "size": 64},
                                {"Accept": "image/png"})
    assert status == 200 and headers["content-type"] == "image/png" and headers["x-unclip-seed"] == "4"
    img = Image.open(io.BytesIO(png))
    assert img.text["prompt"] == "a cat" and json.loads(img.text["decoder_steps"]) == 3
    assert torch.equal(torch.from_numpy(np.array(img.convert("RGB"))), alone(ort, "a cat", replace(FAST, seed=4)))

    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    params = {"seed": 21, "num_images": 2, "size": 64, "steps": {"decoder": 3, "sr256": 2}}
    status, body, _ = post_variation(url, path.read_bytes(), params)
    assert status == 200, body
    for i, item in enumerate(body["images"]):
        s = replace(FAST, seed=21 + i, num_images=1)
        assert torch.equal(decoded(item), variation(ort, ort.spec, s, load_image(path)).images[0]), i


def post_variation(url: str, data: bytes, params: dict):
    boundary = "unclip-test-boundary"
    parts = [(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="in.png"\r\n'
              "Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n",
             (f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{json.dumps(params)}\r\n'
              f"--{boundary}--\r\n").encode()]
    return post(url + "/v1/variations", b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"})


BAD = [  # (body, headers, status, words of the reason)
    ({"seed": 1}, {}, 422, "prompt: Field required"),
    ({"prompt": "x", "num_images": 5}, {}, 422, "num_images must be in 1 ... 4"),
    ({"prompt": "x", "size": 100}, {}, 422, "size 100 is not an image size of model 'tiny' (its sizes: 16, 64, 256)"),
    ({"prompt": "x" * 101}, {}, 422, "prompt is 101 characters, over this server's cap of 100"),
    ({"prompt": "x", "negative": "y" * 101}, {}, 422, "negative is 101 characters"),
    ({"prompt": "x", "steps": {"decoder": 0}}, {}, 422, "steps.decoder must be a whole number >= 1, got 0"),
    ({"prompt": "x", "steps": {"decoder": 5001}}, {}, 422, "steps.decoder 5001 is over this server's cap"),
    ({"prompt": "x", "steps": {"upsampler": 3}}, {}, 422, "steps.upsampler: Extra inputs are not permitted"),
    ({"prompt": "x", "colour": "red"}, {}, 422, "colour: Extra inputs are not permitted"),
    ({"prompt": "x", "sampler": "euler"}, {}, 422, "sampler 'euler' is not one of ddim, ddpm, unclip"),
    ({"prompt": "x", "seed": -1}, {}, 422, "seed must be in 0"),
    ({"prompt": "x", "prior_candidates": 5}, {}, 422, "prior_candidates must be in 1 ... 4"),
    ({"prompt": "x", "eta": "much"}, {}, 422, "eta: Input should be a valid number"),
    (b"{not json", {}, 422, "JSON decode error"),
    ({"prompt": "x", "num_images": 2}, {"Accept": "image/png"}, 406, "Accept: image/png returns one image"),
    ({"prompt": "x", "steps": {"prior": 1000, "decoder": 1000}, "timeout_s": 0.001}, {}, 504,
     "ran longer than 0.001 s and was cancelled"),
]


@pytest.mark.parametrize("body,headers,status,words", BAD, ids=[b[3][:30] for b in BAD])
def test_bad_requests_get_a_4xx_and_one_line(url, body, headers, status, words):
    got, answer, _ = post(url + "/v1/images", body, headers)
    assert got == status and words in answer["error"] and "\n" not in answer["error"], answer


def test_bad_uploads_and_routes(url):
    cases = [(post_variation(url, b"this is not an image", {}), 415, "image: not a readable image"),
             (post_variation(url, b"\0" * 20_001, {}), 413, "over this server's limit of 20000 bytes"),
             (post_variation(url, _png(), {"steps": {"prior": 5}}), 422, "not used by variations"),
             (post_variation(url, _png(), {"prompt": "x"}), 422, "params.prompt: Extra inputs are not permitted"),
             (post(url + "/v2/images", {"prompt": "x"}), 404, "Not Found")]
    for (got, answer, _), status, words in cases:
        assert got == status and words in answer["error"] and "\n" not in answer["error"], answer


def _png() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_health_and_docs(url):
    with urllib.request.urlopen(url + "/healthz", timeout=60) as r:
        assert json.loads(r.read())["stages"] == {s: "ok" for s in ("prior", "decoder", "sr256", "sr1024")}
    with urllib.request.urlopen(url + "/openapi.json", timeout=60) as r:
        assert {"/v1/images", "/v1/variations", "/healthz"} <= set(json.loads(r.read())["paths"])
    with urllib.request.urlopen(url + "/docs", timeout=60) as r:
        assert r.status == 200


def test_a_model_without_sr1024_gets_no_sr1024_deployment(service, tmp_path):
    """Karlo's folders have no second upsampler: the application holds three stage deployments, /healthz names three,
    and images at the model's largest size are the Python API's."""
    from ray import serve
    from unclip.models import load_model, save_model
    from unclip.serve.app import build_app
    from unclip.serve.config import STAGES, ServeConfig, model_stages
    model = build_preset("tiny")
    model.sr1024 = None
    folder = save_model(model, tmp_path / "no-sr1024")
    assert model_stages(str(folder)) == ("prior", "decoder", "sr256")
    assert model_stages("tiny") == model_stages("demo") == STAGES
    cfg = ServeConfig(model=str(folder), backend="torch", cores=2, timeout_s=120)
    serve.run(build_app(cfg), name="nosr", route_prefix="/nosr")
    try:
        assert set(serve.status().applications["nosr"].deployments) == {"prior", "decoder", "sr256", "api"}
        with urllib.request.urlopen(service[0] + "/nosr/healthz", timeout=60) as r:
            assert json.loads(r.read())["stages"] == {s: "ok" for s in ("prior", "decoder", "sr256")}
        status, body, _ = post(service[0] + "/nosr/v1/images", {"prompt": "a red circle", "seed": 3, "steps": STEPS})
        assert status == 200, body
        torch_model = TorchBackend(load_model(folder))
        assert torch.equal(decoded(body["images"][0]), alone(torch_model, "a red circle", replace(FAST, seed=3)))
    finally:
        serve.delete("nosr")


def test_a_killed_replica_is_replaced_and_its_requests_fail_clearly(url, ort):
    import ray
    # the prior's most steps (its 1000 trained timesteps) at the server's most images: seconds on the tiny model
    slow = {"prompt": "a slow one", "seed": 1, "size": 16, "num_images": 4, "steps": {"prior": 1000, "decoder": 3}}
    with ThreadPoolExecutor(3) as pool:
        pending = [pool.submit(post, url + "/v1/images", {**slow, "seed": s}) for s in (1, 5, 9)]
        time.sleep(0.5)  # the prior is sampling now
        names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "prior" in a["name"] and
                 "REPLICA" in a["name"].upper()]
        assert len(names) == 1, names
        ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
        answers = [f.result() for f in pending]
    for status, body, _ in answers:
        assert status == 503 and "prior stage's replica died" in body["error"], (status, body)
    ask = {"prompt": "after the crash", "seed": 5, "steps": STEPS, "size": 64}
    deadline = time.monotonic() + 120
    while (got := post(url + "/v1/images", ask))[0] != 200 and time.monotonic() < deadline:
        assert got[0] == 503, got
        time.sleep(1.0)
    assert got[0] == 200, got
    assert torch.equal(decoded(got[1]["images"][0]), alone(ort, ask["prompt"], replace(FAST, seed=5)))

def test_a_models_own_step_counts_are_capped_like_a_requests():
    """generation_config.json's steps fill what a request leaves out, and the server's --max-steps caps them too."""
    from unclip.core.spec import spec_from_model
    from unclip.serve.config import ServeConfig
    from unclip.serve.schema import Fail, ImagesRequest, VariationRequest, settings_of
    spec = replace(spec_from_model(build_preset("tiny")), defaults={"decoder_steps": 40, "prior_steps": 90})
    cfg = ServeConfig(model="tiny", max_steps=50)
    with pytest.raises(Fail, match=r"steps.prior: the model's default of 90 steps is over this server's cap of 50; "
                                   r"pass steps.prior"):
        settings_of(ImagesRequest(prompt="x"), cfg, spec, 4)
    s = settings_of(ImagesRequest(prompt="x", steps={"prior": 10}), cfg, spec, 4)
    assert (s.prior_steps, s.decoder_steps, s.sr256_steps, s.sr1024_steps) == (10, 40, 7, 15)
    assert settings_of(VariationRequest(), cfg, spec, 4).decoder_steps == 40  # a variation has no prior to cap
