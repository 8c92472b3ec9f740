"""The shapes world of the built-in `demo` model (../shared/WORLD.md, to the letter): scenes, their renderer and the
caption grammar.

A scene is one flat shape of one palette colour on a flat background of another. Coordinates are fractions of
the canvas side, x to the right, y down. Rendering samples 4x4 points per output pixel (the scene drawn at 4x the
target side) and averages them (a box filter), so edges are anti-aliased; any canvas size and any pixel window of
it (the upsamplers train on crops) can be rendered.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 220, 40), "green": (40, 170, 70),
    "blue": (40, 90, 220), "purple": (140, 60, 190), "white": (245, 245, 245), "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
SIZES = {"small": (0.34, 0.02), "big": (0.62, 0.03)}  # side s: centre, uniform jitter
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5), "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
    "top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73), "bottom right": (0.73, 0.73),
}
POSITION_JITTER = 0.03
PHRASES = {
    "center": "in the center", "left": "on the left", "right": "on the right", "top": "at the top",
    "bottom": "at the bottom", "top left": "in the top left corner", "top right": "in the top right corner",
    "bottom left": "in the bottom left corner", "bottom right": "in the bottom right corner",
}
VOCABULARY = (*COLOURS, *SHAPES, *SIZES, "center", "left", "right", "top", "bottom", "a", "an", "on", "background",
              "in", "the", "at", "corner")
SUPERSAMPLE = 4
P_BIG = 1 / 3  # a scene's size when nothing asks for one (big objects only take the center)


@dataclass(frozen=True)
class Scene:
    background: str
    colour: str
    shape: str
    size: str  # "small" | "big"
    position: str  # a key of POSITIONS
    side: float  # s, fraction of the canvas
    cx: float
    cy: float

    def __post_init__(self):
        assert self.colour != self.background, self
        assert self.size == "small" or self.position == "center", self


def sample_scene(rng: np.random.Generator, background: str | None = None, colour: str | None = None,
                 shape: str | None = None, size: str | None = None, position: str | None = None) -> Scene:
    """A random scene; any attribute given is kept (a big object is always in the center)."""
    if size is None:
        size = "small" if position not in (None, "center") else ("big" if rng.random() < P_BIG else "small")
    if position is None:
        position = "center" if size == "big" else str(rng.choice(list(POSITIONS)))
    if colour is None:
        colour = str(rng.choice([c for c in COLOURS if c != background]))
    if background is None:
        background = str(rng.choice([c for c in COLOURS if c != colour]))
    if shape is None:
        shape = str(rng.choice(SHAPES))
    mean, jitter = SIZES[size]
    px, py = POSITIONS[position]
    side = mean + rng.uniform(-jitter, jitter)
    cx, cy = px + rng.uniform(-POSITION_JITTER, POSITION_JITTER), py + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    return Scene(background, colour, shape, size, position, float(side), float(cx), float(cy))


# --- geometry ----------------------------------------------------------------------------------------------

def polygon(shape: str, cx: float, cy: float, s: float) -> np.ndarray | None:
    """The outline of a polygonal shape as (V, 2) points; None for the circle."""
    h = s / 2
    if shape == "circle":
        return None
    if shape == "square":
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        pts = [(0, -h), (h, h), (-h, h)]
    elif shape == "diamond":
        pts = [(0, -h), (h, 0), (0, h), (-h, 0)]
    elif shape == "star":
        pts = []
        for k in range(10):
            r = h if k % 2 == 0 else 0.4 * h
            a = -math.pi / 2 + k * math.pi / 5  # the first point straight up
            pts.append((r * math.cos(a), r * math.sin(a)))
    elif shape == "cross":
        a = s / 6  # half the bar thickness s/3
        pts = [(-a, -h), (a, -h), (a, -a), (h, -a), (h, a), (a, a), (a, h), (-a, h), (-a, a), (-h, a), (-h, -a),
               (-a, -a)]
    else:
        raise ValueError(f"unknown shape {shape!r} (choose from: {', '.join(SHAPES)})")
    return np.array(pts, dtype=np.float64) + np.array([cx, cy])


def inside(shape: str, cx: float, cy: float, s: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether the points (x, y) (fractions of the canvas) lie inside the shape; even-odd rule for polygons."""
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= (s / 2) ** 2
    pts = polygon(shape, cx, cy, s)
    out = np.zeros(np.broadcast(x, y).shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(pts, np.roll(pts, -1, axis=0)):
        if y1 == y2:
            continue
        crosses = (y1 > y) != (y2 > y)
        x_at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        out ^= crosses & (x < x_at)
    return out


def coverage(scene: Scene, size: int, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (h, w) float32, over `window` = (left, top, w, h) pixels of a
    size x size canvas (default: all of it). Only pixels that meet the shape's bounding square are sampled."""
    left, top, w, h = window or (0, 0, size, size)
    out = np.zeros((h, w), dtype=np.float32)
    half = scene.side / 2
    # Pixel range of the bounding square inside the window (one pixel of margin against rounding).
    x0 = max(int(math.floor((scene.cx - half) * size)) - 1 - left, 0)
    x1 = min(int(math.ceil((scene.cx + half) * size)) + 1 - left, w)
    y0 = max(int(math.floor((scene.cy - half) * size)) - 1 - top, 0)
    y1 = min(int(math.ceil((scene.cy + half) * size)) + 1 - top, h)
    if x0 >= x1 or y0 >= y1:
        return out
    k = SUPERSAMPLE
    sub = (np.arange(k) + 0.5) / k
    xs = ((left + np.arange(x0, x1))[:, None] + sub[None]).reshape(-1) / size  # sample x, canvas fractions
    ys = ((top + np.arange(y0, y1))[:, None] + sub[None]).reshape(-1) / size
    hit = inside(scene.shape, scene.cx, scene.cy, scene.side, xs[None, :], ys[:, None])  # (h*k, w*k)
    out[y0:y1, x0:x1] = hit.reshape(y1 - y0, k, x1 - x0, k).mean(axis=(1, 3))
    return out


def render(scene: Scene, size: int, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The scene as an (h, w, 3) uint8 sRGB image (box-filtered 4x supersampling)."""
    return np.round(render_float(scene, size, window)).astype(np.uint8)


def render_float(scene: Scene, size: int, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Like render, without the final rounding: (h, w, 3) float32 in [0, 255]."""
    c = coverage(scene, size, window)[..., None]
    bg, fg = np.array(PALETTE[scene.background], np.float32), np.array(PALETTE[scene.colour], np.float32)
    return bg * (1 - c) + fg * c


# --- captions ----------------------------------------------------------------------------------------------

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: np.random.Generator | None = None, p_size: float = 0.5, p_position: float = 0.5,
            p_background: float = 0.5, full: bool = False) -> str:
    """`a [SIZE] COLOR SHAPE [POSITION] [on a BACKGROUND background]`; each optional part is named with its
    probability (all of them with full=True)."""
    def named(p: float) -> bool:
        return full or (rng is not None and rng.random() < p)

    words = [scene.colour, scene.shape]
    if named(p_size):
        words.insert(0, scene.size)
    text = f"{_article(words[0])} {' '.join(words)}"
    if named(p_position):
        text += " " + PHRASES[scene.position]
    if named(p_background):
        text += f" on {_article(scene.background)} {scene.background} background"
    return text


_CAPTION = re.compile(
    r"^an? (?:(?P<size>small|big) )?(?P<colour>\w+) (?P<shape>\w+)"
    r"(?: (?P<position>in the center|on the left|on the right|at the top|at the bottom|"
    r"in the (?:top|bottom) (?:left|right) corner))?"
    r"(?: on an? (?P<background>\w+) background)?$")


def parse_caption(text: str) -> dict[str, str] | None:
    """The attributes a caption names ({"colour": "red", "shape": "circle", ...}); None if it isn't a caption of
    the grammar (or names a scene the world can't have)."""
    m = _CAPTION.match(" ".join(text.lower().split()))
    if m is None:
        return None
    out = {k: v for k, v in m.groupdict().items() if v is not None}
    if "position" in out:
        out["position"] = next(k for k, v in PHRASES.items() if v == out["position"])
    if out["colour"] not in PALETTE or out["shape"] not in SHAPES or out.get("background", "red") not in PALETTE:
        return None
    if out.get("background") == out["colour"]:
        return None
    if out.get("size") == "big" and out.get("position", "center") != "center":
        return None
    return out


def sample_prompts(n: int, seed: int = 0) -> list[str]:
    """n captions drawn from the grammar (each optional part named half the time), seeded."""
    rng = np.random.default_rng(seed)
    return [caption(sample_scene(rng), rng) for _ in range(n)]
