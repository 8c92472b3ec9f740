"""Load test of unclip-serve against the Python API on the same model, backend and machine.

    python benchmarks/serve_load.py --model demo --clients 1 8 --requests 24     # writes benchmarks/results/serve_load.{md,json}

First the Python API, in this process on a backend opened once: the same requests one by one (latency), and
generate() at batch sizes 1 ... 8 (images/s; the best is the target). Then that backend is closed and a local Ray
Serve runs the service in this machine's processes; for each client count, that many client threads (127.0.0.1
only) send the requests in a closed loop (each sends its next request when the last one is answered), one image
each, seed = request index. Reported: images/s, p50/p95/p99 latency, and the batch sizes each stage actually ran
(from the service's answers). Warm-up runs are left out; the service's images are checked against the API's."""
from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import torch

PROMPTS = ["a red circle on a blue background", "two green squares", "a yellow triangle above a red circle",
           "a small blue square", "three circles", "a big green triangle"]


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    import onnxruntime
    import ray
    return (f"{cpu}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} "
            f"GiB; Python {platform.python_version()}, torch {torch.__version__}, onnxruntime "
            f"{onnxruntime.__version__}, ray {ray.__version__}; {date.today().isoformat()}")


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def request_body(args, i: int) -> dict:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "size": args.size, "steps": args.steps}


def settings_of(args, i: int):
    from unclip.engine.pipeline import Settings
    st = args.steps
    return Settings(seed=i, size=args.size, **{f"{k}_steps": v for k, v in st.items()})


# --- the Python API --------------------------------------------------------------------------------------------

def baseline(args, cfg) -> dict:
    """One by one (latency, images/s) and the best images/s of generate() over batch sizes 1 ... max."""
    from unclip.engine.backend import open_backend
    from unclip.engine.pipeline import generate
    from unclip.serve.responses import png_bytes
    from unclip.engine.pipeline import images_per_call
    b = open_backend(cfg.backend_request(), lambda m: print(m, file=sys.stderr))
    args.per_call = images_per_call(b)  # the engines' images per call: the service's largest batch
    over = [n for n in args.batches if n > args.per_call]
    if over:
        sys.exit(f"--batches {over}: over the engines' {args.per_call} images per call; export with a larger "
                 "--max-batch (or a new --engines folder)")
    generate(b, b.spec, PROMPTS[0], settings_of(args, 0))  # warm-up: sessions, arenas
    lat, images = [], {}
    t_all = time.perf_counter()
    for i in range(args.requests):
        t = time.perf_counter()
        res = generate(b, b.spec, PROMPTS[i % len(PROMPTS)], settings_of(args, i))
        png_bytes(res.images[0], {})  # the service encodes a PNG too
        lat.append(time.perf_counter() - t)
        images[i] = res.images[0]
    one_by_one = args.requests / (time.perf_counter() - t_all)
    per_batch = {}
    for n in args.batches:
        generate(b, b.spec, PROMPTS[0], replace(settings_of(args, 0), num_images=n))  # warm-up at this batch
        t = time.perf_counter()
        for r in range(args.batch_repeats):
            generate(b, b.spec, PROMPTS[r % len(PROMPTS)], replace(settings_of(args, 100 * r), num_images=n))
        per_batch[n] = n * args.batch_repeats / (time.perf_counter() - t)
    return {"latency": lat, "images_per_s": one_by_one, "per_batch": per_batch, "images": images}


# --- the service -----------------------------------------------------------------------------------------------

def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.loads(r.read())


def load(url: str, args, clients: int, n: int, first: int) -> dict:
    """n requests from `clients` closed-loop client threads; request i has seed first + i."""
    lock, nxt, lat, answers, errors = threading.Lock(), [0], [], {}, []

    def client():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= n:
                return
            t = time.perf_counter()
            try:
                a = post(url, request_body(args, first + i))
            except OSError as e:  # an HTTP error or a dropped connection: counted, the run goes on
                with lock:
                    errors.append(f"request {first + i}: {e}")
                continue
            with lock:
                lat.append(time.perf_counter() - t)
                answers[first + i] = a["images"][0]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    batches = collections.defaultdict(collections.Counter)  # stage -> {images in the call: calls}
    for a in answers.values():
        for stage, v in a["stages"].items():
            batches[stage][v["batch"]] += 1 / v["batch"]  # each of a call's images reports the call
    return {"clients": clients, "requests": n, "images_per_s": len(answers) / wall, "latency": lat,
            "answers": answers, "errors": errors,
            "batches": {s: {k: round(c) for k, c in cnt.items()} for s, cnt in batches.items()}}


def service(args, cfg) -> list[dict]:
    import ray
    from ray import serve
    from unclip.serve.app import build_app
    from unclip.serve.config import quiet_ray_env
    port = args.port
    quiet_ray_env()  # as unclip-serve does
    ray.init(include_dashboard=False, log_to_driver=False, _temp_dir=tempfile.mkdtemp(prefix="ray-"))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg), name="unclip", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/images"
        runs = []
        for c in args.clients:
            load(url, args, c, c, first=10_000)  # warm-up at this concurrency, left out
            runs.append(load(url, args, c, args.requests, first=0))
            print(f"service, {c} clients: {runs[-1]['images_per_s']:.3f} images/s", file=sys.stderr)
        return runs
    finally:
        serve.shutdown()
        ray.shutdown()


# --- report ----------------------------------------------------------------------------------------------------

def report(args, base: dict, runs: list[dict]) -> str:
    from PIL import Image
    same = all(i in r["answers"] and torch.equal(torch.from_numpy(np.array(Image.open(io.BytesIO(base64.b64decode(r["answers"][i][
        "png_base64"]))).convert("RGB"))), base["images"][i]) for r in runs for i in range(args.requests))
    best_n, best = max(base["per_batch"].items(), key=lambda kv: kv[1])
    lines = [f"Machine: {machine()}",
             (f"Model `{args.model}`, {args.backend} {args.precision}, size {args.size or 'largest'}, steps "
             f"{args.steps}, one image per request, {args.requests} requests per row; the engines take "
             f"{args.per_call} images per call"),
             "",
             "| run | clients | images/s | p50 s | p95 s | p99 s | calls the stages ran (stage: images x calls) |",
             "|---|---|---|---|---|---|---|"]
    lat = base["latency"]
    lines.append(f"| Python API, one by one | 1 | {base['images_per_s']:.3f} | {percentile(lat, 50):.3f} | "
                 f"{percentile(lat, 95):.3f} | {percentile(lat, 99):.3f} | 1 |")
    for n, v in base["per_batch"].items():
        lines.append(f"| Python API, generate() batch {n} | 1 | {v:.3f} | | | | {n} |")
    for r in runs:
        sizes = "; ".join(f"{s}: " + ", ".join(f"{k}x{c}" for k, c in sorted(cnt.items()))
                          for s, cnt in r["batches"].items())
        lines.append(f"| service | {r['clients']} | {r['images_per_s']:.3f} | {percentile(r['latency'], 50):.3f} | "
                     f"{percentile(r['latency'], 95):.3f} | {percentile(r['latency'], 99):.3f} | {sizes} |")
    lines += [f"{r['clients']} clients: {len(r['errors'])} failed requests: {r['errors'][:3]}" for r in runs
              if r["errors"]]
    lines += ["", (f"Python API's best: {best:.3f} images/s at batch {best_n}. Service images equal the Python API's "
              f"for every seed: {'yes' if same else 'NO'}.")]
    for r in runs:
        if r["clients"] == 1:
            ratio = statistics.median(r["latency"]) / statistics.median(lat)
            lines.append(f"1 client: median latency {ratio:.3f}x the Python API's (target <= 1.10).")
        else:
            lines.append(f"{r['clients']} clients: {r['images_per_s'] / best:.3f}x the Python API's best images/s "
                         "(target >= 1.00).")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--engines", default=None)
    p.add_argument("--max-batch", type=int, default=8, help="engines' images per call (exported if missing)")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--steps", default="25,25,7,15", help="prior,decoder,sr256,sr1024")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--requests", type=int, default=24, help="requests per client count (and one by one)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8], help="Python API batch sizes")
    p.add_argument("--batch-repeats", type=int, default=2)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    if not (1 <= max(args.clients) <= 64 and 1 <= args.requests <= 1000):
        p.error("--clients must be in 1 ... 64 and --requests in 1 ... 1000")
    args.steps = dict(zip(("prior", "decoder", "sr256", "sr1024"), map(int, args.steps.split(","))))
    from unclip.serve.config import ServeConfig
    cfg = ServeConfig(model=args.model, backend=args.backend, precision=args.precision, engines=args.engines,
                      max_batch=args.max_batch, max_images=8, batch_wait_s=args.batch_wait_ms / 1000, timeout_s=3600)
    base = baseline(args, cfg)
    runs = service(args, cfg)
    text = report(args, base, runs)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.md").write_text(text)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("answers", "images")}
    (out / "serve_load.json").write_text(json.dumps({"baseline": strip(base), "service": [strip(r) for r in runs],
                                                     "machine": machine(), "args": vars(args)}, indent=1, default=str))


if __name__ == "__main__":
    main()
