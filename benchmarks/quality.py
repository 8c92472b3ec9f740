"""What the demo model draws, read back by the shapes world's judge (../shared/WORLD.md), per backend and precision.

    python benchmarks/quality.py                       # demo model, default settings, final size; ~1 hour on 2 cores
    python benchmarks/quality.py --n 24 --backend torch:fp32 --quick    # a short look

    python benchmarks/quality.py --backend onnxruntime:fp32 --pictures docs    # also redraws the README's pictures

Writes --out's quality.{md,json} [default: benchmarks/results/], and with --pictures DIR the README's pictures
(demo-sheet.png; without --quick also demo-diversity, -variations and -interpolation.png): for a fixed list of
prompts sampled from the caption grammar (image i uses seed i), the judge's accuracy on every attribute the prompt
names, per backend x precision, with seconds per image; how often two backends give the same verdict; the diversity
of what a prompt leaves out; variations of rendered scenes; an interpolation. Every file is written at the end, each
under a temporary name and renamed; a bad option is refused before any work, and a failed run writes nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from unclip.core.errors import UnclipError, one_line
from unclip.demo import world
from unclip.demo.judge import ATTRIBUTES, judge
from unclip.engine import manipulate as mp
from unclip.engine.backend import open_backend
from unclip.engine.pipeline import Settings, for_model, generate

TARGETS = {"background": 0.97, "colour": 0.95, "shape": 0.90, "size": 0.90, "position": 0.90, "all": 0.80}


def generate_many(backend, prompts: list[str], settings: Settings, batch: int) -> list[np.ndarray]:
    """One image per prompt, image i from seed settings.seed + i (the same as one call with the whole list)."""
    out = []
    for first in range(0, len(prompts), batch):
        chunk = prompts[first:first + batch]
        res = generate(backend, backend.spec, chunk, dataclasses.replace(settings, num_images=len(chunk)),
                       first_image=first)
        out.extend(im.numpy() for im in res.images)
    return out


def score(prompts: list[str], images: list[np.ndarray]) -> tuple[dict, list[dict]]:
    """Accuracy of each attribute over the prompts that name it, and of all named attributes at once."""
    right: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    verdicts, whole = [], []
    for p, im in zip(prompts, images):
        v = judge(im)
        verdicts.append(v.as_dict())
        m = v.matches(world.parse_caption(p))
        for a, ok in m.items():
            right[a].append(ok)
        whole.append(all(m.values()))
    acc = {a: (float(np.mean(r)) if r else None, len(r)) for a, r in right.items()}  # None: no prompt names it
    acc["all"] = (float(np.mean(whole)), len(whole))
    return acc, verdicts


def seconds_per_image(backend, settings: Settings, repeats: int = 3) -> float:
    generate(backend, backend.spec, "a red circle", settings)  # warm-up: sessions, allocations
    times = []
    for r in range(repeats):
        t = time.perf_counter()
        generate(backend, backend.spec, "a red circle", dataclasses.replace(settings, seed=100 + r))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def diversity(backend, settings: Settings, prompt: str = "a red circle", n: int = 16) -> dict:
    images = generate_many(backend, [prompt] * n, settings, 4)
    vs = [judge(im) for im in images]
    return {"prompt": prompt, "images": n, "positions": len({v.position for v in vs}),
            "backgrounds": len({v.background for v in vs}),
            "right": float(np.mean([v.colour == "red" and v.shape == "circle" for v in vs]))}, images


def variations(backend, settings: Settings, n: int) -> tuple[dict, list]:
    """Variations of rendered scenes (256 px): does the judge read the source's shape and colour?"""
    from PIL import Image
    rng = np.random.default_rng(17)
    ok, pairs = [], []
    for i in range(n):
        scene = world.sample_scene(rng)
        src = world.render(scene, 256)
        res = mp.variation(backend, backend.spec, dataclasses.replace(settings, seed=i), Image.fromarray(src))
        v = judge(res.images[0].numpy())
        ok.append(v.shape == scene.shape and v.colour == scene.colour)
        pairs.append((src, res.images[0].numpy()))
    return {"scenes": n, "shape_and_colour": float(np.mean(ok))}, pairs


def interpolation(backend, settings: Settings, a="a red circle", b="a blue square", frames=8) -> tuple[dict, list]:
    imgs = [im.numpy() for im in mp.interpolate(backend, backend.spec, settings, a, b, frames)]  # a generator
    first, last = judge(imgs[0]), judge(imgs[-1])
    return {"from": a, "to": b, "frames": frames, "first": first.as_dict(), "last": last.as_dict(),
            "ok": first.colour == "red" and first.shape == "circle" and last.colour == "blue"
            and last.shape == "square"}, imgs


# --- pictures ------------------------------------------------------------------------------------------------

def sheet(images: list[np.ndarray], labels: list[str] | None, cols: int, side: int = 192) -> np.ndarray:
    """Images in a grid, each resized to `side`, with its label underneath."""
    from PIL import Image, ImageDraw, ImageFont
    rows = (len(images) + cols - 1) // cols
    label_h = 34 if labels else 0
    canvas = Image.new("RGB", (cols * side, rows * (side + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    for k, im in enumerate(images):
        x, y = (k % cols) * side, (k // cols) * (side + label_h)
        canvas.paste(Image.fromarray(im).resize((side, side), Image.LANCZOS), (x, y))
        if labels:
            words, lines = labels[k].split(), [""]
            for w in words:  # wrap to the tile's width
                if draw.textlength((lines[-1] + " " + w).strip(), font=font) > side - 6:
                    lines.append("")
                lines[-1] = (lines[-1] + " " + w).strip()
            draw.multiline_text((x + 3, y + side + 2), "\n".join(lines[:2]), fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def png_bytes(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_files(files: dict[Path, bytes]) -> None:
    """Each file under a temporary name in its folder, then renamed over the old one (never a half-written file)."""
    from unclip.core.artifacts import atomic_write_bytes
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)


# --- options ---------------------------------------------------------------------------------------------------

QUALITY_BACKENDS = ("onnxruntime", "openvino", "torch")  # on the CPU (tensorrt needs a GPU)


def fail(message: str, code: int) -> None:
    """One line on stderr, no traceback; 2 for a usage error (as argparse), 1 for a model or backend that can't run."""
    print(f"Error: {message}", file=sys.stderr)
    raise SystemExit(code)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors (a bad number, an unknown option): one line too
        fail(f"{message} (see --help)", 2)


def backend_runs(entries: list[str]) -> list[str]:
    """--backend NAME[:PRECISION] entries -> 'name:precision' runs (NAME alone: fp32); exits 2 on a bad one."""
    from unclip.engine.backend import PRECISIONS
    runs = []
    for entry in entries:
        parts = entry.split(":")
        name = parts[0]
        if len(parts) > 2 or not all(parts):
            fail(f"--backend {entry!r} is not NAME:PRECISION (e.g. torch:bf16)", 2)
        if name not in QUALITY_BACKENDS:
            fail(f"--backend {entry}: unknown backend {name!r} (choose {', '.join(QUALITY_BACKENDS)}"
                 + (": quality.py runs on the CPU)" if name == "tensorrt" else ")"), 2)
        precision = parts[1] if len(parts) > 1 else "fp32"
        if precision not in PRECISIONS[name]:
            fail(f"--backend {entry}: {name} has no precision {precision!r} (choose "
                 f"{', '.join(f'{name}:{q}' for q in PRECISIONS[name])})", 2)
        run = f"{name}:{precision}"
        if run in runs:
            fail(f"--backend {run} is given twice; give each backend once", 2)
        runs.append(run)
    return runs


def check_folder(path: str, flag: str) -> None:
    """A folder that exists or can be created; exits 2 if not."""
    from unclip.engine.outputs import folder_problem
    if problem := folder_problem(path, flag):
        fail(problem, 2)


def check_options(a) -> list[str]:
    """Every option, before any work or write: the runs, or exit 2 (1 for a model or backend that can't run)."""
    for flag, v in (("--n", a.n), ("--batch", a.batch)):
        if v < 1:
            fail(f"{flag} must be >= 1, got {v}", 2)
    if a.variations < 1:
        fail(f"--variations must be >= 1, got {a.variations} (--quick skips diversity, variations and "
             "interpolation)", 2)
    runs = backend_runs(a.backend) if a.backend else None
    check_folder(a.out, "--out")
    if a.pictures:  # '' (none) too, as before pictures became opt-in
        check_folder(a.pictures, "--pictures")
    from unclip.core.errors import ModelLoadError, RequestError
    from unclip.core.spec import spec_from_model
    from unclip.engine.pipeline import final_stage
    from unclip.models import NAMES, resolve_model
    try:
        spec = spec_from_model(resolve_model(a.model))
    except ModelLoadError as e:
        hint = "" if Path(a.model).exists() or a.model in NAMES else " or a built-in name (demo, tiny, small)"
        fail(f"{e}{hint}", 1)
    try:
        final_stage(spec, a.size)  # a size the model makes: the message lists its sizes
    except RequestError as e:
        fail(str(e), 2)
    from unclip.engine.backend_torch import native_bf16
    bf16 = native_bf16()  # without it torch emulates bf16 (several times slower) and OpenVINO refuses it
    if runs is None:
        openvino = importlib.util.find_spec("openvino") is not None
        return (["onnxruntime:fp32", "torch:fp32"] + ["torch:bf16"] * bf16
                + (["openvino:fp32"] + ["openvino:bf16"] * bf16) * openvino)
    from unclip.core.packages import require_onnxruntime
    from unclip.engine.backend_ov import require_openvino
    try:
        for run in runs:
            if run.startswith("onnxruntime:"):
                require_onnxruntime()
            elif run.startswith("openvino:"):
                require_openvino()
    except UnclipError as e:
        fail(str(e), 1)
    if "openvino:bf16" in runs and not bf16:
        fail("--backend openvino:bf16 needs a CPU with native bf16 (AVX512-BF16 or AMX), which this one lacks; "
             "use openvino:fp32", 1)
    return runs


# --- main ----------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="built-in name (demo) or a model folder")
    p.add_argument("--backend", action="append", default=None, metavar="NAME:PRECISION",
                   help="repeatable; onnxruntime:fp32|fp16, torch:fp32|fp16|bf16, openvino:fp32|bf16 (NAME alone: "
                        "fp32) [default: onnxruntime:fp32, torch:fp32, torch:bf16, openvino:fp32, openvino:bf16; "
                        "bf16 where the CPU has it natively]; the first one also makes "
                        "the diversity, variation and interpolation figures and the pictures")
    p.add_argument("--n", type=int, default=200, help="prompts, sampled from the caption grammar (seed 2026)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--variations", type=int, default=50)
    p.add_argument("--size", type=int, default=None, help="image side in pixels [default: the model's largest]")
    p.add_argument("--quick", action="store_true", help="skip diversity, variations and interpolation")
    p.add_argument("--out", default="benchmarks/results", help="folder for quality.md and quality.json")
    p.add_argument("--pictures", default=None, metavar="DIR",
                   help="also write the README's pictures into DIR (the README's are in docs) [default: none]")
    a = p.parse_args(argv)
    runs = check_options(a)  # before any work or write
    try:
        files, md = run_benchmark(a, runs, argv)
    except (UnclipError, PermissionError) as e:  # a backend that fails to open or run, a shared engines folder
        fail(f"{one_line(e)}; nothing was written", 1)
    try:
        write_files(files)  # all at the end: a run that fails half-way writes nothing
    except OSError as e:  # a full disk, a folder removed meanwhile
        fail(f"{e.filename or a.out}: cannot write the results ({e.strerror or e})", 1)
    print(md)


def run_benchmark(a, runs: list[str], argv) -> tuple[dict[Path, bytes], str]:
    """The figures and pictures, as the files to write (nothing is written here) and the markdown table."""
    torch.manual_seed(0)
    # The defaults: the model's steps and guidance scales (generation_config.json; demo: 25/25/5/5, 4 / 3, else
    # Karlo's 25/25/7/15, 4 / 8), ddim, the model's largest size.
    settings = Settings(size=a.size)
    prompts = world.sample_prompts(a.n, seed=2026)
    report: dict = {"date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}"
                    f", {torch.get_num_threads()} threads", "model": a.model, "prompts": a.n, "batch": a.batch,
                    "settings": dataclasses.asdict(settings), "backends": {}, "command": " ".join(["python benchmarks/quality.py"] + (argv if argv is not None else sys.argv[1:]))}
    verdicts: dict[str, list[dict]] = {}
    first_backend, first_images = None, None
    for run in runs:
        name, precision = run.split(":")
        b = open_backend(SimpleNamespace(backend=name, model=a.model, engines=None, device="cpu", precision=precision,
                                         max_batch=a.batch), notify=lambda m: print(m, file=sys.stderr))
        t = time.perf_counter()
        report["settings"] = dataclasses.asdict(for_model(settings, b.spec))  # the scales it ran with
        images = generate_many(b, prompts, settings, a.batch)
        elapsed = time.perf_counter() - t
        acc, verdicts[run] = score(prompts, images)
        report["backends"][run] = {"accuracy": acc, "s_per_image_batched": elapsed / a.n,
                                   "s_per_image": seconds_per_image(b, settings)}
        print(run, json.dumps(report["backends"][run]), file=sys.stderr)
        if first_backend is None:
            first_backend, first_images = b, images
    base = runs[0]
    report["agreement"] = {r: float(np.mean([x == y for x, y in zip(verdicts[base], verdicts[r])]))
                           for r in runs[1:]}
    pics = Path(a.pictures) if a.pictures else None
    files: dict[Path, bytes] = {}
    if pics:
        files[pics / "demo-sheet.png"] = png_bytes(sheet(first_images[:24], prompts[:24], cols=6))
    if not a.quick:
        report["diversity"], div_images = diversity(first_backend, settings)
        report["variations"], pairs = variations(first_backend, settings, a.variations)
        report["interpolation"], frames = interpolation(first_backend, settings)
        if pics:
            files[pics / "demo-diversity.png"] = png_bytes(sheet(div_images, None, cols=8, side=128))
            row = [im for pair in pairs[:6] for im in pair]
            files[pics / "demo-variations.png"] = png_bytes(sheet(row, ["source", "variation"] * (len(row) // 2),
                                                                  cols=12, side=128))
            files[pics / "demo-interpolation.png"] = png_bytes(sheet(frames, None, cols=len(frames), side=128))
    out = Path(a.out)
    files[out / "quality.json"] = (json.dumps(report, indent=1) + "\n").encode()
    files[out / "quality.md"] = (markdown(report) + "\n").encode()
    return files, markdown(report)


def markdown(r: dict) -> str:
    lines = [f"Judge's accuracy, `{r['model']}` model, {r['prompts']} prompts from the caption grammar (seed 2026; "
             f"image i uses seed i), default settings, {r['settings']['size'] or 'the final'} px; {r['machine']}; "
             f"{r['date']}", f"`{r['command']}`", "",
             "| backend | " + " | ".join(list(ATTRIBUTES) + ["all named"])
             + f" | s/image | s/image (batch {r.get('batch', 4)}) |",
             "|---|" + "---|" * (len(ATTRIBUTES) + 3)]
    for run, v in r["backends"].items():
        # "-": no prompt names the attribute (a short --n)
        cells = [f"{v['accuracy'][k][0]:.1%}" if v["accuracy"][k][0] is not None else "-"
                 for k in list(ATTRIBUTES) + ["all"]]
        lines.append(f"| {run} | " + " | ".join(cells) + f" | {v['s_per_image']:.2f} | {v['s_per_image_batched']:.2f} |")
    lines.append("| target | " + " | ".join(f"≥ {TARGETS[k]:.0%}" for k in list(ATTRIBUTES) + ["all"]) + " | | |")
    for run, agree in r.get("agreement", {}).items():
        lines.append(f"\nSame verdict as {next(iter(r['backends']))}: {run} {agree:.1%} of prompts.")
    if "diversity" in r:
        d = r["diversity"]
        lines.append(f"\nDiversity, \"{d['prompt']}\" over {d['images']} seeds: {d['positions']} positions, "
                     f"{d['backgrounds']} backgrounds (right colour and shape: {d['right']:.0%}).")
        v = r["variations"]
        lines.append(f"Variations of {v['scenes']} rendered scenes: shape and colour kept in "
                     f"{v['shape_and_colour']:.0%}.")
        i = r["interpolation"]
        lines.append(f"Interpolation \"{i['from']}\" -> \"{i['to']}\", {i['frames']} frames: first "
                     f"{i['first']['colour']} {i['first']['shape']}, last {i['last']['colour']} {i['last']['shape']}"
                     f" ({'as asked' if i['ok'] else 'NOT as asked'}).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
