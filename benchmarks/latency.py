"""Per-stage and end-to-end latency of unCLIP generation: diffusers' eager UnCLIPPipeline (the baseline users run
today) against this project's torch and onnxruntime (and tensorrt) backends, on the same weights, prompt, seed,
steps and guidance, side by side in one run.

    python benchmarks/latency.py                      # demo model, CPU, writes benchmarks/results/latency.{md,json}
    python benchmarks/latency.py --preset small --backend diffusers --backend openvino:bf16 --backend torch:bf16
    python benchmarks/latency.py --preset tiny --repeats 1 --out /tmp/b    # what CI runs

--backend NAME[:PRECISION[:TORCH_MODE]] (repeatable) picks the runs, e.g. torch:bf16:compile; diffusers, the
baseline, runs at --precision. Every option is checked before any work; if a backend fails, the command exits 1
(the others' figures are still written), and if every one fails, no results are written (earlier ones are kept).

Each backend runs in its own worker process (its own thread pool and peak-memory reading). Warm-up runs are left
out; figures are medians over --repeats; ratios are baseline / ours computed pair by pair in the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # measure.py beside this file, however it's loaded
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import Timer, cuda_launches, flops_per_call, peak_gflops, peak_memory_mb  # noqa: E402

STAGE_OF = {"text_encoder": "text_encoder", "prior": "prior", "text_proj": "text_proj", "decoder": "decoder",
            "sr256_first": "sr256", "sr256_last": "sr256", "sr1024": "sr1024"}
STAGES = ["text_encoder", "prior", "text_proj", "decoder", "sr256", "sr1024"]
PROMPT = "a high-resolution photograph of a big red frog on a green leaf"
DEMO_PROMPT = "a big red star on a blue background"  # the demo model knows only the shapes world's words


# --- workers: one backend each -------------------------------------------------------------------------------

def _settings(cfg, n):
    from unclip.engine.pipeline import Settings
    s = cfg["steps"]
    return Settings(seed=0, num_images=n, size=cfg["size"], prior_steps=s[0], decoder_steps=s[1], sr256_steps=s[2],
                    sr1024_steps=s[3], sampler=cfg["sampler"], prior_guidance=cfg["guidance"][0],
                    decoder_guidance=cfg["guidance"][1])


def worker_ours(cfg: dict) -> dict:
    from types import SimpleNamespace

    from unclip.engine.backend import open_backend
    t = time.perf_counter()
    b = open_backend(SimpleNamespace(backend=cfg["backend"], model=cfg["model"], engines=cfg["engines"],
                                     device=cfg["device"], precision=cfg["precision"], max_batch=cfg["batch"],
                                     torch_mode=cfg["torch_mode"]),
                     notify=lambda m: print(m, file=sys.stderr))
    for name in b.spec.networks:  # load every session/engine now: cold start, not first-step time (openvino
        # reads its graphs here and compiles each input shape at its first call, i.e. in the warm-up)
        for load in ("session", "_model", "_load"):
            if hasattr(b, load):
                getattr(b, load)(name)
    from unclip.engine.pipeline import generate
    timer = Timer(cfg["device"])
    b.run = timer.wrap(b.run)

    def gen(n):
        return generate(b, b.spec, cfg["prompt"], _settings(cfg, n)).images
    return _measure(cfg, gen, timer, load_s=time.perf_counter() - t)


def worker_diffusers(cfg: dict) -> dict:
    """The baseline: diffusers' UnCLIPPipeline in eager torch, plus (when the model has sr1024) the same 256->1024
    loop written with diffusers' UNet2DModel and scheduler, so both sides do the same work."""
    t = time.perf_counter()
    import diffusers
    from diffusers import UnCLIPPipeline, UnCLIPScheduler, UNet2DModel
    try:
        from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    except ImportError:
        from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel
    diffusers.UnCLIPTextProjModel = UnCLIPTextProjModel  # diffusers >= 0.38 can't reload an unCLIP folder otherwise
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg["precision"]]
    pipe = UnCLIPPipeline.from_pretrained(cfg["folder"], torch_dtype=dtype).to(cfg["device"])
    pipe.set_progress_bar_config(disable=True)
    # Same maths on both sides: float64 noise-schedule tables (diffusers' float32 ones round 1 - abar_t/abar_s to 1
    # at t = 999 and drop a term of the first step). Costs nothing per step.
    for sch in (pipe.prior_scheduler, pipe.decoder_scheduler, pipe.super_res_scheduler):
        _float64_tables(sch, sch.betas.double())
    sr1024 = None
    if cfg["sr1024"]:
        sr1024 = UNet2DModel.from_pretrained(os.path.join(cfg["folder"], "sr1024"), torch_dtype=dtype).to(cfg["device"])
    load_s = time.perf_counter() - t
    timer = Timer(cfg["device"])
    for name, mod in (("text_encoder", pipe.text_encoder), ("prior", pipe.prior), ("text_proj", pipe.text_proj),
                      ("decoder", pipe.decoder), ("sr256_first", pipe.super_res_first),
                      ("sr256_last", pipe.super_res_last), ("sr1024", sr1024)):
        if mod is not None:
            mod.forward = timer.wrap(mod.forward, name_of=lambda a, kw, n=name: n)
    @torch.no_grad()
    def gen(n):
        steps = cfg["steps"]
        g = torch.Generator().manual_seed(0)
        x = pipe(cfg["prompt"], num_images_per_prompt=n, generator=g, prior_num_inference_steps=steps[0],
                 decoder_num_inference_steps=steps[1], super_res_num_inference_steps=steps[2], output_type="np",
                 prior_guidance_scale=cfg["guidance"][0], decoder_guidance_scale=cfg["guidance"][1]).images
        if sr1024 is None:
            return torch.from_numpy((x * 255).round().astype("uint8"))
        x = torch.from_numpy(x).permute(0, 3, 1, 2).to(cfg["device"], dtype) * 2 - 1
        size = 4 * x.shape[-1]
        low = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True).to(dtype)
        c = cfg["sr1024_schedule"]
        sched = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type=c["prediction_type"],
                                clip_sample=c["clip_sample"], clip_sample_range=c["clip_sample_range"])
        if c["beta_schedule"] == "linear":  # UnCLIPScheduler only builds cosine tables
            _float64_tables(sched, torch.linspace(c["beta_start"], c["beta_end"], c["num_train_timesteps"],
                                                  dtype=torch.float64))
        else:
            _float64_tables(sched, sched.betas.double())
        sched.set_timesteps(steps[3])
        lat = torch.randn(low.shape, generator=g).to(cfg["device"], dtype)
        ts = sched.timesteps
        for i, t in enumerate(ts):
            eps = sr1024(torch.cat([lat, low], 1), t).sample
            lat = sched.step(eps, t, lat, prev_timestep=None if i + 1 == len(ts) else ts[i + 1], generator=g).prev_sample
        return ((lat.float().clamp(-1, 1) * 0.5 + 0.5) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return _measure(cfg, gen, timer, load_s=load_s)


def _float64_tables(sched, betas: torch.Tensor) -> None:
    sched.betas = betas
    sched.alphas = 1.0 - betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
    sched.one = torch.tensor(1.0, dtype=torch.float64)


def _measure(cfg, gen, timer: Timer, load_s: float) -> dict:
    sync = torch.cuda.synchronize if cfg["device"].startswith("cuda") else (lambda: None)
    with torch.no_grad():
        steps = cfg["steps"]
        cfg["steps"] = [2, 2, 2, 2]  # warm-up: same shapes, fewer steps (sessions, kernels, allocator); not timed
        gen(1)
        gen(cfg["batch"])  # the batch's shapes too (torch.compile compiles per shape: its first call would be timed)
        cfg["steps"] = steps
        runs, per_net = [], []
        for _ in range(cfg["repeats"]):
            timer.spans.clear()
            t = time.perf_counter()
            image = gen(1)
            sync()
            runs.append(time.perf_counter() - t)
            per_net.append(timer.totals())
        t = time.perf_counter()
        gen(cfg["batch"])
        sync()
        batch_s = time.perf_counter() - t
    image_path = os.path.join(cfg["out"], f"image-{cfg.get('label', cfg['backend']).replace(' ', '-')}.npy")
    import io

    import numpy as np
    from unclip.core.artifacts import atomic_write_bytes
    buf = io.BytesIO()
    np.save(buf, image.numpy())
    atomic_write_bytes(Path(image_path), buf.getvalue())
    nets = {}
    for name in per_net[0]:
        secs = statistics.median(p[name][0] for p in per_net)
        calls = per_net[0][name][1]
        nets[name] = {"seconds": secs, "calls": calls}
    return {"image": image_path, "load_s": load_s, "seconds_per_image": statistics.median(runs), "runs": runs,
            "images_per_second": cfg["batch"] / batch_s, "batch": cfg["batch"],
            "peak_memory_mb": peak_memory_mb(cfg["device"]), "networks": nets,
            "network_calls_per_image": sum(n["calls"] for n in nets.values()),
            "cuda_launches_per_image": cuda_launches(gen) if cfg["device"].startswith("cuda") else None}


# --- orchestration -------------------------------------------------------------------------------------------

def machine(device: str) -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name()
    return out


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("torch", "onnxruntime", "onnxruntime-gpu", "onnx", "diffusers", "transformers", "tensorrt"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _parse_run(entry: str, precision: str) -> tuple[str, str, str, str]:
    """--backend NAME[:PRECISION[:TORCH_MODE]], e.g. torch:bf16:compile -> (label, backend, precision, mode)."""
    parts = entry.split(":")
    backend, prec = parts[0], parts[1] if len(parts) > 1 else precision
    mode = parts[2] if len(parts) > 2 else "eager"
    return f"{backend}" + (f" {prec}" if prec != precision or len(parts) > 1 else "") + (
        f" {mode}" if mode != "eager" else ""), backend, prec, mode


def run_worker(kind: str, cfg: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--worker-config", json.dumps(cfg)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{res.stderr[-3000:]}")
    sys.stderr.write(res.stderr)
    return json.loads(res.stdout.strip().splitlines()[-1])


def merge_rounds(rounds: list[dict]) -> dict:
    """One backend's worker results from several rounds -> one result: the median of each time and rate across the
    rounds (per network too), the largest peak memory, the first round's image; `rounds` keeps each round's
    seconds per image and images per second."""
    first = rounds[0]
    med = statistics.median
    out = {**first,
           "load_s": med(r["load_s"] for r in rounds),
           "seconds_per_image": med(r["seconds_per_image"] for r in rounds),
           "images_per_second": med(r["images_per_second"] for r in rounds),
           "peak_memory_mb": max(r["peak_memory_mb"] for r in rounds),
           "runs": [t for r in rounds for t in r["runs"]],
           "networks": {n: {**v, "seconds": med(r["networks"][n]["seconds"] for r in rounds)}
                        for n, v in first["networks"].items()},
           "rounds": [{"seconds_per_image": r["seconds_per_image"], "images_per_second": r["images_per_second"]}
                      for r in rounds]}
    return out


def round_ratios(base: list[dict], other: list[dict]) -> dict:
    """Speed-ups against the baseline within each round (a round runs every backend once, one after another, so
    the machine's drift between rounds cancels) and their medians."""
    one = [b["seconds_per_image"] / o["seconds_per_image"] for b, o in zip(base, other)]
    many = [o["images_per_second"] / b["images_per_second"] for b, o in zip(base, other)]
    return {"batch_1": one, "batch": many, "batch_1_median": statistics.median(one),
            "batch_median": statistics.median(many)}


def stage_rows(result: dict, flops: dict, peaks: dict[str, float], precision: str, ours: bool = True) -> dict:
    """Per stage: time, calls and FLOPs, and the fraction of the peak of the precision its networks compute in
    (our backends in bf16 keep the embedding networks fp32: core.stages.network_precision; diffusers does not)."""
    from unclip.core.stages import network_precision
    rows = {}
    for name, r in result["networks"].items():
        st = STAGE_OF.get(name)
        if st is None:
            continue
        row = rows.setdefault(st, {"seconds": 0.0, "calls": 0, "flops": 0.0,
                                   "peak": peaks[network_precision(name, precision) if ours else precision]})
        row["seconds"] += r["seconds"]
        row["calls"] += r["calls"]
        row["flops"] += flops.get(name, 0.0) * r["calls"]
    for row in rows.values():
        row["ms_per_step"] = 1000 * row["seconds"] / max(row["calls"], 1)
        row["ms_per_stage"] = 1000 * row["seconds"]
        row["gflops_per_step"] = row["flops"] / max(row["calls"], 1) / 1e9
        row["achieved_gflops"] = row["flops"] / max(row["seconds"], 1e-12) / 1e9
        row["fraction_of_peak"] = row["achieved_gflops"] / row.pop("peak")
    return rows


def markdown(report: dict) -> str:
    names = list(report["results"])
    base = report["results"].get("diffusers")
    lines = [f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores"
             + (f", {report['machine']['gpu']}" if "gpu" in report["machine"] else "")
             + f"; {report['settings']['device']}; preset/model `{report['settings']['model']}`; steps "
             f"{'/'.join(map(str, report['settings']['steps']))}; peak (best of GEMM/conv shapes) "
             + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in report["peak_gflops"].items())
             + f"; {report['date']}", "",
             "| stage | GFLOP/step | " + " | ".join(f"{n} ms/step" for n in names) + " | "
             + " | ".join(f"{n} % of peak" for n in names if n != "diffusers") + " |",
             "|---" * (2 + len(names) + len([n for n in names if n != "diffusers"])) + "|"]
    for st in STAGES:
        rows = [report["stages"][n].get(st) for n in names]
        if not any(rows):
            continue
        gf = next(r["gflops_per_step"] for r in rows if r)
        cells = [f"{r['ms_per_step']:.1f}" if r else "-" for r in rows]
        pct = [f"{100 * report['stages'][n][st]['fraction_of_peak']:.0f}%" if report["stages"][n].get(st) else "-"
               for n in names if n != "diffusers"]
        # three significant figures below 1 GFLOP (a 0.026 GFLOP text encoder would print 0.03 at two decimals)
        gf_text = f"{gf:.2f}" if gf >= 1 else f"{gf:.3g}"
        lines.append(f"| {st} | {gf_text} | " + " | ".join(cells) + " | " + " | ".join(pct) + " |")
    cuda = report["settings"]["device"].startswith("cuda")
    lines += ["", "| backend | load s | s/image (batch 1) | images/s (batch "
              f"{report['settings']['batch']}) | peak memory MB | speed-up vs diffusers (batch 1) | "
              "speed-up (batch) | network calls / image" + (" | CUDA launches / image |" if cuda else " |"),
              "|---" * (9 if cuda else 8) + "|"]
    ratios = report.get("ratios", {})
    for n in names:
        r = report["results"][n]
        # with several rounds: the median of each round's own speed-up (the machine's drift cancels within a round)
        pr = ratios.get(n, {}).get("per_round")
        up1 = (f"{pr['batch_1_median']:.2f}x" if pr else
               f"{base['seconds_per_image'] / r['seconds_per_image']:.2f}x") if base else "-"
        upb = (f"{pr['batch_median']:.2f}x" if pr else
               f"{r['images_per_second'] / base['images_per_second']:.2f}x") if base else "-"
        lines.append(f"| {n} | {r['load_s']:.1f} | {r['seconds_per_image']:.2f} | {r['images_per_second']:.3f} | "
                     f"{r['peak_memory_mb']:.0f} | {up1} | {upb} | {r.get('network_calls_per_image', '-')}"
                     + (f" | {r.get('cuda_launches_per_image')} |" if cuda else " |"))
    rounds = report["settings"].get("rounds", 1)
    if rounds > 1 and base:
        lines += ["", f"{rounds} rounds (every backend once per round, in turn); times are medians across rounds, "
                  "speed-ups the median of each round's own. Per round, batch 1 / batch "
                  f"{report['settings']['batch']}: diffusers "
                  + ", ".join(f"{x['seconds_per_image']:.2f} s" for x in base["rounds"]) + "; "
                  + "; ".join(f"{b} " + ", ".join(f"{x:.2f}x" for x in v["per_round"]["batch_1"]) + " / "
                              + ", ".join(f"{x:.2f}x" for x in v["per_round"]["batch"])
                              for b, v in ratios.items()) + "."]
    for b, d in report.get("image_difference", {}).items():
        lines.append(f"Image vs diffusers ({b}, batch 1, same seed, `unclip` sampler): mean abs difference "
                     f"{d['mean_abs']:.2e}, {100 * d['fraction_over_0.05']:.3f}% of pixels off by more than 0.05.")
    for p, secs in (report.get("export_s") or {}).items():
        lines += ["", f"Cold start: export of the {p} ONNX engines {secs:.1f} s."]
    return "\n".join(lines) + "\n"


# --- options: every one checked before any work or write ---------------------------------------------------

BASELINE = "diffusers"
PRESETS = ("demo", "tiny", "small")  # built-in models this benchmark takes (karlo: 3.4 B random parameters)


def fail(message: str, code: int):
    """One line on stderr, no traceback: 2 for a usage error (as argparse), 1 for a model or backend that can't
    load or run (as the project's commands)."""
    print(f"Error: {message}", file=sys.stderr)
    raise SystemExit(code)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors (a bad number, an unknown option): one line too
        fail(f"{message} (see --help)", 2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" after a help text that names its default
        return action.help if action.default is None else super()._get_help_string(action)


def backend_help() -> str:
    from unclip.engine.backend import BACKENDS, PRECISIONS
    from unclip.engine.request import TORCH_MODES
    names = [BASELINE + " (the baseline; runs at --precision, no suffix)"] + [
        f"{b} ({', '.join(PRECISIONS[b])})" for b in BACKENDS]
    return ("repeatable: NAME[:PRECISION[:TORCH_MODE]], NAME one of " + ", ".join(names) + "; PRECISION defaults to "
            "--precision; TORCH_MODE, torch only: " + ", ".join(TORCH_MODES) + " (cuda-graphs on --device cuda); "
            "e.g. torch:bf16:static, openvino:bf16 [default: diffusers, torch, onnxruntime, and openvino on the CPU "
            "or tensorrt on CUDA, those installed, at --precision]")


def backend_runs(entries: list[str], precision: str, device: str) -> list[tuple[str, str, str, str]]:
    """--backend entries -> (label, backend, precision, torch mode); exits 2 on a form this script doesn't take."""
    from unclip.engine.backend import BACKENDS, PRECISIONS
    from unclip.engine.request import TORCH_MODES
    runs, seen = [], {}
    for entry in entries:
        parts = entry.split(":")
        name = parts[0]
        if len(parts) > 3 or not all(parts):
            fail(f"--backend {entry!r} is not NAME[:PRECISION[:TORCH_MODE]] (e.g. torch:bf16:static)", 2)
        if name not in (BASELINE,) + BACKENDS:
            fail(f"--backend {entry}: unknown backend {name!r} (choose {', '.join((BASELINE,) + BACKENDS)})", 2)
        if name == BASELINE:
            if len(parts) > 1:
                fail(f"--backend {entry}: diffusers, the baseline, takes no suffix; it runs at --precision "
                     f"(e.g. --backend diffusers --precision {parts[1]})", 2)
        elif len(parts) > 1 and parts[1] not in PRECISIONS[name]:
            fail(f"--backend {entry}: {name} has no precision {parts[1]!r} (choose "
                 f"{', '.join(f'{name}:{q}' for q in PRECISIONS[name])})", 2)
        elif parts[1:2] == [] and precision not in PRECISIONS[name]:
            fail(f"--backend {name} runs at --precision {precision}, which {name} doesn't have (choose "
                 f"{', '.join(f'{name}:{q}' for q in PRECISIONS[name])})", 2)
        if len(parts) > 2:
            if name != "torch":
                fail(f"--backend {entry}: only torch takes a mode (e.g. torch:bf16:static)", 2)
            if parts[2] not in TORCH_MODES:
                fail(f"--backend {entry}: unknown torch mode {parts[2]!r} (choose {', '.join(TORCH_MODES)})", 2)
        run = _parse_run(entry, precision)
        if run[3] == "cuda-graphs" and not device.startswith("cuda"):
            fail(f"--backend {entry}: cuda-graphs needs --device cuda (static keeps the same buffers on the CPU)", 2)
        if name == "openvino" and device != "cpu":
            fail(f"--backend {entry}: openvino runs on the CPU; use --device cpu", 2)
        if name == "tensorrt" and not device.startswith("cuda"):
            fail(f"--backend {entry}: tensorrt runs on an NVIDIA GPU; add --device cuda", 2)
        if run[1:] in seen:
            fail(f"--backend {entry} is the same run as --backend {seen[run[1:]]}; give each once", 2)
        seen[run[1:]] = entry
        runs.append(run)
    return runs


def require_backends(runs: list[tuple], device: str) -> None:
    """The packages (and CPU or GPU features) of the backends asked for by name; exits 1 naming what to install."""
    from unclip.core.errors import UnclipError
    try:
        for _, backend, prec, _ in runs:
            if backend == BASELINE:
                if not importlib.util.find_spec("diffusers"):
                    fail("--backend diffusers: diffusers is not installed: pip install diffusers transformers "
                         "(or leave the baseline out)", 1)
            elif backend == "onnxruntime":
                from unclip.core.packages import require_onnxruntime
                ort = require_onnxruntime()
                if device.startswith("cuda") and "CUDAExecutionProvider" not in ort.get_available_providers():
                    fail("--backend onnxruntime with --device cuda: this onnxruntime has no CUDA provider; "
                         "pip install onnxruntime-gpu (instead of onnxruntime)", 1)
            elif backend == "openvino":
                from unclip.engine.backend_ov import require_openvino
                require_openvino()
                if prec == "bf16" and not _native_bf16():
                    fail("--backend openvino:bf16 needs a CPU with native bf16 (AVX512-BF16 or AMX), which this one "
                         "lacks; use openvino:fp32", 1)
            elif backend == "tensorrt":
                from unclip.core.packages import require_tensorrt
                require_tensorrt()
    except UnclipError as e:
        fail(str(e), 1)


def default_runs(precision: str, device: str, notes: list[str]) -> list[tuple]:
    """Every backend installed here that runs on `device` at `precision`; what is left out gets a note."""
    from unclip.engine.backend import PRECISIONS
    names = [BASELINE, "torch", "onnxruntime"] + (["openvino"] if device == "cpu" else []) + (
        ["tensorrt"] if device.startswith("cuda") else [])
    runs = []
    for name in names:
        package = {"diffusers": "diffusers", "onnxruntime": "onnxruntime", "openvino": "openvino",
                   "tensorrt": "tensorrt"}.get(name)
        if package and not importlib.util.find_spec(package):
            if name == BASELINE:
                notes.append("diffusers is not installed: the baseline was skipped "
                             "(pip install diffusers transformers)")
            elif name == "onnxruntime":
                notes.append("onnxruntime is not installed: skipped (pip install onnxruntime)")
            continue
        if name != BASELINE and precision not in PRECISIONS[name]:
            notes.append(f"{name} skipped: it has no {precision} ({', '.join(PRECISIONS[name])})")
            continue
        if name == "openvino" and precision == "bf16" and not _native_bf16():
            notes.append("openvino skipped: its bf16 needs a CPU with native bf16 (AVX512-BF16 or AMX)")
            continue
        if name == "onnxruntime" and device.startswith("cuda"):
            import onnxruntime
            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                notes.append("onnxruntime skipped: it has no CUDA provider here (pip install onnxruntime-gpu)")
                continue
        runs.append(_parse_run(name, precision))
    return runs


def _native_bf16() -> bool:
    from unclip.engine.backend_torch import native_bf16
    return native_bf16()


def parse_steps(text: str | None) -> list[int]:
    if text is None:
        return [25, 25, 7, 15]
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        steps = []
    if len(steps) != 4 or min(steps) < 1:
        fail(f"--steps must be four whole numbers >= 1, prior,decoder,sr256,sr1024 (e.g. 25,25,7,15), got {text!r}", 2)
    if max(steps) > 1000:  # the runtime refuses more steps than timesteps, after the export: say so before any work
        fail(f"--steps {text}: at most 1000 per stage (the timesteps every built-in model and Karlo were trained "
             "with)", 2)
    return steps


def check_out(path: str) -> None:
    """--out: a folder that exists or can be created; exits 2 if not."""
    from unclip.engine.outputs import folder_problem
    if problem := folder_problem(path, "--out"):
        fail(problem, 2)


def check_options(a) -> tuple[list[tuple], list[int], list[str]]:
    """Every option before any work or write: the runs, the steps and the notes of the default backends left out;
    exits 2 on a usage error, 1 on a backend that can't run here."""
    from unclip.core.errors import BackendUnavailable, RequestError
    from unclip.engine.backend import check_device
    for flag, v in (("--rounds", a.rounds), ("--repeats", a.repeats), ("--batch", a.batch)):
        if v < 1:
            fail(f"{flag} must be >= 1, got {v}", 2)
    steps = parse_steps(a.steps)
    try:
        check_device(a.device)
    except (RequestError, BackendUnavailable) as e:
        fail(str(e), 2)
    notes: list[str] = []
    runs = backend_runs(a.backend, a.precision, a.device) if a.backend else default_runs(a.precision, a.device, notes)
    if not runs:
        fail(f"no backend runs at --precision {a.precision} on --device {a.device} here ({'; '.join(notes)}); "
             "name one with --backend", 2)
    check_out(a.out)
    if a.backend:
        require_backends(runs, a.device)
    return runs, steps, notes


def load(a, out: Path):
    """The model (exits 1 with the loader's one line if it can't load) and the folder the workers read."""
    from unclip.core.errors import ModelLoadError
    from unclip.core.identity import demo_folder
    from unclip.models import build_preset, load_model
    try:
        model = load_model(a.model) if a.model else build_preset(a.preset)
    except ModelLoadError as e:
        hint = f"; for the built-in model use --preset {a.model}" if a.model in PRESETS and not Path(a.model).exists() \
            else ""
        fail(f"{e}{hint}", 1)
    return model, a.model or (str(demo_folder()) if a.preset == "demo" else str(out / f"model-{a.preset}"))


def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--preset", default="demo", choices=PRESETS, help="built-in model (ignored with --model)")
    p.add_argument("--model", default=None, help="a diffusers-layout model folder (e.g. Karlo)")
    p.add_argument("--backend", action="append", default=None, metavar="NAME[:PRECISION[:TORCH_MODE]]",
                   help=backend_help())
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="the baseline's, and that of each --backend given without :PRECISION")
    p.add_argument("--batch", type=int, default=4, help="images per call for the throughput figure")
    p.add_argument("--steps", default=None, help="prior,decoder,sr256,sr1024 [default: 25,25,7,15]")
    p.add_argument("--repeats", type=int, default=2, help="timed images at batch 1, per backend and round")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every backend this many times, in turn (the figures are medians across rounds)")
    p.add_argument("--out", default="benchmarks/results",
                   help="folder for latency.md and latency.json (and the engines, images and preset models they use)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-config", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        cfg = json.loads(a.worker_config)
        res = worker_diffusers(cfg) if a.worker == "diffusers" else worker_ours(cfg)
        print(json.dumps(res))
        return
    runs, steps, notes = check_options(a)
    from unclip.core.errors import UnclipError, one_line
    out = Path(a.out)
    model, folder = load(a, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        report, failures = benchmark(a, runs, steps, notes, model, folder, out)
    except (UnclipError, PermissionError) as e:  # an export that fails, a shared folder this user may not write
        fail(f"{one_line(e)}; no results were written", 1)
    if not report["results"]:  # keep the results of an earlier run rather than replace them with empty tables
        fail(f"every backend failed, no results were written ({'; '.join(failures)})", 1)
    md = markdown(report) + "".join(f"\nNote: {n}\n" for n in report["notes"])
    from unclip.core.artifacts import atomic_write_bytes
    try:
        atomic_write_bytes(out / "latency.json", json.dumps(report, indent=1).encode())
        atomic_write_bytes(out / "latency.md", md.encode())
    except OSError as e:
        fail(f"{e.filename or out}: cannot write the results ({e.strerror or e})", 1)
    print(md)
    if failures:  # the others' figures are written, but a benchmark that lost a backend it was asked for failed
        fail(f"{len(failures)} of {len(runs)} backends failed and were left out of {out / 'latency.md'} "
             f"({'; '.join(failures)})", 1)


def benchmark(a, runs, steps, notes, model, folder, out) -> tuple[dict, list[str]]:
    """Export, measure the machine's peak, run every backend's worker --rounds times: the report (nothing is
    written here but the model folder, engines and images the workers read and save) and the failures."""
    from unclip.models import save_model
    name = a.model or a.preset
    if not Path(folder, "model_index.json").exists():
        save_model(model, folder, overwrite=True)
    from unclip.core.spec import spec_from_model
    from unclip.engine.pipeline import Settings, for_model, image_sizes
    size = max(image_sizes(spec_from_model(model)))
    resolved = for_model(Settings(), spec_from_model(model))  # the model's guidance scales, on both sides
    guidance = [resolved.prior_guidance, resolved.decoder_guidance]
    from unclip.engine.backend import export_precision
    engines, export_s = {}, {}
    for prec in sorted({export_precision(r[1], r[2]) for r in runs if r[1] not in ("diffusers", "torch")}):
        from unclip.export.onnx_export import export_model
        engines[prec] = str(out / f"engines-{Path(name).name}-{prec}")
        t = time.perf_counter()
        export_model(model, engines[prec], precision=prec, max_batch=a.batch, source=folder)
        export_s[prec] = time.perf_counter() - t
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    from unclip.core.stages import NETWORK_STAGE, network_precision
    peaks = {p: peak_gflops(a.device, dtypes[p])  # every precision a network computes in
             for p in sorted({network_precision(n, r[2]) for r in runs for n in NETWORK_STAGE})}
    flops = flops_per_call(model, 1)
    model_schedulers, has_sr1024 = model.schedulers, model.sr1024 is not None
    del model
    cfg = {"model": folder, "folder": folder, "device": a.device, "batch": a.batch, "steps": steps, "size": size,
           "guidance": guidance,
           "sr1024": has_sr1024, "repeats": a.repeats, "sampler": "unclip", "out": str(out),
           "prompt": DEMO_PROMPT if name == "demo" else PROMPT,
           "sr1024_schedule": dataclasses.asdict(model_schedulers["sr1024"])}
    per_round: dict[str, list[dict]] = {}
    failed: set[str] = set()
    failures: list[str] = []
    for k in range(a.rounds):
        for label, backend, prec, mode in runs:
            if label in failed:
                continue
            print(f"benchmarking {label} ..." + (f" (round {k + 1} of {a.rounds})" if a.rounds > 1 else ""),
                  file=sys.stderr)
            try:
                per_round.setdefault(label, []).append(run_worker(backend, dict(
                    cfg, backend=backend, precision=prec, torch_mode=mode, label=label,
                    engines=engines.get(export_precision(backend, prec)))))
            except RuntimeError as e:  # e.g. onnxruntime without CUDA on --device cuda: report it, keep the rest
                last = [line for line in str(e).splitlines() if line.strip()][-1]
                notes.append(f"{label} failed and was left out: {last}")
                failures.append(f"{label}: {last}")
                failed.add(label)
                per_round.pop(label, None)
    results, stages = {}, {}
    for label, backend, prec, mode in runs:
        if label not in per_round:
            continue
        results[label] = merge_rounds(per_round[label])
        stages[label] = stage_rows(results[label], flops, {p: v[0] for p, v in peaks.items()}, prec,
                                   ours=backend != "diffusers")
        results[label]["precision"] = prec
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(a.device), "versions": versions(),
              "settings": {**cfg, "model": name, "rounds": a.rounds},
              "peak_gflops": {p: v[0] for p, v in peaks.items()}, "peak_shapes": {p: v[1] for p, v in peaks.items()},
              "flops_per_call": flops, "export_s": export_s, "results": results, "stages": stages, "notes": notes}
    if "diffusers" in results and len(results) > 1:
        import numpy as np
        base = results["diffusers"]
        ref = np.load(base["image"]).astype(np.float64) / 255
        report["image_difference"] = {}
        for b, r in results.items():
            if b == "diffusers":
                continue
            d = np.abs(np.load(r["image"]).astype(np.float64) / 255 - ref)
            report["image_difference"][b] = {"mean_abs": float(d.mean()), "max_abs": float(d.max()),
                                             "fraction_over_0.05": float((d > 0.05).mean())}
        report["ratios"] = {b: {"seconds_per_image": base["seconds_per_image"] / r["seconds_per_image"],
                                "images_per_second": r["images_per_second"] / base["images_per_second"],
                                "per_round": round_ratios(per_round["diffusers"], per_round[b])}
                            for b, r in results.items() if b != "diffusers"}
    return report, failures


if __name__ == "__main__":
    main()
