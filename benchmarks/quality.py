"""What the demo model draws, read back by the shapes world's judge (../shared/WORLD.md), per backend and precision.

    python benchmarks/quality.py                       # demo model, default settings, final size; ~1 hour on 2 cores
    python benchmarks/quality.py --n 24 --backend torch:fp32 --quick    # a short look

Writes benchmarks/results/quality.{md,json} and the README's pictures (docs/): for a fixed list of prompts sampled
from the caption grammar (image i uses seed i), the judge's accuracy on every attribute the prompt names, per
backend x precision, with seconds per image; how often two backends give the same verdict; the diversity of what a
prompt leaves out; variations of rendered scenes; an interpolation.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
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
    acc = {a: (float(np.mean(r)), len(r)) for a, r in right.items()}
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


def save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, optimize=True)


# --- main ----------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--backend", action="append", default=None, metavar="NAME:PRECISION",
                   help="repeatable [default: onnxruntime:fp32, torch:fp32, torch:bf16, openvino:fp32, openvino:bf16; "
                        "bf16 where the CPU has it natively]; the first one also makes "
                        "the diversity, variation and interpolation figures and the pictures")
    p.add_argument("--n", type=int, default=200, help="prompts, sampled from the caption grammar (seed 2026)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--variations", type=int, default=50)
    p.add_argument("--size", type=int, default=None, help="image side in pixels [default: the model's largest]")
    p.add_argument("--quick", action="store_true", help="skip diversity, variations and interpolation")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--pictures", default="docs", help="folder for the README's pictures ('' for none)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    # The defaults: the model's steps and guidance scales (generation_config.json; demo: 25/25/5/5, 4 / 3, else
    # Karlo's 25/25/7/15, 4 / 8), ddim, the model's largest size.
    settings = Settings(size=a.size)
    prompts = world.sample_prompts(a.n, seed=2026)
    import importlib.util
    from unclip.engine.backend_torch import native_bf16
    bf16 = native_bf16()  # without it torch emulates bf16 (several times slower) and OpenVINO refuses it
    openvino = importlib.util.find_spec("openvino") is not None
    runs = a.backend or (["onnxruntime:fp32", "torch:fp32"] + ["torch:bf16"] * bf16
                         + (["openvino:fp32"] + ["openvino:bf16"] * bf16) * openvino)
    report: dict = {"date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}"
                    f", {torch.get_num_threads()} threads", "model": a.model, "prompts": a.n,
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
    if pics:
        save_png(sheet(first_images[:24], prompts[:24], cols=6), pics / "demo-sheet.png")
    if not a.quick:
        report["diversity"], div_images = diversity(first_backend, settings)
        report["variations"], pairs = variations(first_backend, settings, a.variations)
        report["interpolation"], frames = interpolation(first_backend, settings)
        if pics:
            save_png(sheet(div_images, None, cols=8, side=128), pics / "demo-diversity.png")
            row = [im for pair in pairs[:6] for im in pair]
            save_png(sheet(row, ["source", "variation"] * 6, cols=12, side=128), pics / "demo-variations.png")
            save_png(sheet(frames, None, cols=len(frames), side=128), pics / "demo-interpolation.png")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "quality.md").write_text(markdown(report) + "\n")
    print(markdown(report))


def markdown(r: dict) -> str:
    lines = [f"Judge's accuracy, `{r['model']}` model, {r['prompts']} prompts from the caption grammar (seed 2026; "
             f"image i uses seed i), default settings, {r['settings']['size'] or 'the final'} px; {r['machine']}; "
             f"{r['date']}", f"`{r['command']}`", "",
             "| backend | " + " | ".join(list(ATTRIBUTES) + ["all named"]) + " | s/image | s/image (batch 4) |",
             "|---|" + "---|" * (len(ATTRIBUTES) + 3)]
    for run, v in r["backends"].items():
        cells = [f"{v['accuracy'][k][0]:.1%}" for k in list(ATTRIBUTES) + ["all"]]
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
