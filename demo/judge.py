"""The judge of the shapes world (../shared/WORLD.md): reads an image back into (background, colour, shape, size,
position) from its pixels alone, so any generated image can be checked against its prompt.

- background: the palette colour nearest to the median of a thin border ring;
- object: pixels whose RGB distance from that median is > 70, largest 8-connected component only; its colour is
  the palette colour nearest to its median, its size and position the nearest of the world's values to its
  bounding box;
- shape: the object's mask cropped to its bounding box and resized to a fixed grid, compared by IoU with each
  shape's mask treated the same way; the best wins;
- images larger than 128 px are box-downsampled to 128 first.
"""
from __future__ import annotations

import functools
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
from unclip.demo.world import PALETTE, POSITIONS, SHAPES, SIZES, Scene, coverage

OBJECT_DISTANCE = 70.0
MAX_SIDE = 128
GRID = 32  # shape masks are compared on a GRID x GRID raster
ATTRIBUTES = ("background", "colour", "shape", "size", "position")
_PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float64)  # (8, 3)
_NAMES = list(PALETTE)


@dataclass(frozen=True)
class Verdict:
    background: str
    colour: str | None  # None: no object found
    shape: str | None
    size: str | None
    position: str | None

    def matches(self, named: dict[str, str]) -> dict[str, bool]:
        """For each attribute a caption names, whether the image shows it."""
        return {k: getattr(self, k) == v for k, v in named.items()}

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)


def nearest_colour(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE_RGB - rgb) ** 2).sum(axis=1)))]


def box_downsample(image: np.ndarray, side: int) -> np.ndarray:
    """(H, W, 3) -> (side, side, 3) float by averaging pixel boxes (PIL's BOX filter for non-integer ratios)."""
    h, w = image.shape[:2]
    if h % side == 0 and w % side == 0:
        return image.reshape(side, h // side, side, w // side, 3).mean(axis=(1, 3))
    from PIL import Image
    chans = [np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode="F").resize((side, side), Image.BOX))
             for c in range(3)]
    return np.stack(chans, axis=-1).astype(np.float64)


def components(mask: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """8-connected components of a boolean mask: a label image (0 = outside, k >= 1) and each label's pixel count
    (index k - 1)."""
    H, W = mask.shape
    label = np.zeros((H, W), dtype=np.int32)
    sizes: list[int] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if label[y0, x0]:
            continue
        current = len(sizes) + 1
        label[y0, x0] = current
        queue, n = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            n += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < H and 0 <= xx < W and mask[yy, xx] and not label[yy, xx]:
                        label[yy, xx] = current
                        queue.append((yy, xx))
        sizes.append(n)
    return label, sizes


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (all False if the mask is empty)."""
    label, sizes = components(mask)
    return label == (int(np.argmax(sizes)) + 1) if sizes else np.zeros_like(mask)


def _grid(cov: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Coverage cropped to the mask's bounding box and resized to GRID x GRID (bilinear), in [0, 1]."""
    from PIL import Image
    ys, xs = np.nonzero(mask)
    crop = np.clip(cov[ys.min():ys.max() + 1, xs.min():xs.max() + 1], 0, 1).astype(np.float32)
    return np.asarray(Image.fromarray(crop, mode="F").resize((GRID, GRID), Image.BILINEAR))


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return x
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    x = np.apply_along_axis(lambda v: np.convolve(np.pad(v, r, mode="edge"), k, mode="valid"), 0, x)
    return np.apply_along_axis(lambda v: np.convolve(np.pad(v, r, mode="edge"), k, mode="valid"), 1, x)


BLUR_LEVELS = (0.0, 0.025, 0.05, 0.075)  # Gaussian sigma / object side of the reference masks


@dataclass(frozen=True)
class _Reference:
    grid: np.ndarray  # (GRID, GRID) coverage
    extent: float  # max(bbox w, h) / side s
    offset: tuple[float, float]  # (bbox centre - shape centre) / side s


@functools.lru_cache(maxsize=None)
def _references() -> dict[str, list[_Reference]]:
    """Each shape's mask treated the same way (half coverage, cropped, gridded), sharp and at a few blurs, since a
    softened edge moves the half-coverage line of thin parts (a star's points) inward; with the bounding box's
    extent and centre relative to the shape's side and centre, to read size and position off a bounding box."""
    side = 128  # object side in pixels
    refs: dict[str, list[_Reference]] = {}
    for s in SHAPES:
        cov = coverage(Scene("white", "black", s, "big", "center", 0.5, 0.5, 0.5), 2 * side)
        refs[s] = []
        for b in BLUR_LEVELS:
            blurred = _gaussian_blur(cov, b * side)
            mask = blurred >= 0.5
            ys, xs = np.nonzero(mask)
            extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / side
            offset = ((xs.min() + xs.max() + 1) / 2 / side - 1, (ys.min() + ys.max() + 1) / 2 / side - 1)
            refs[s].append(_Reference(_grid(blurred, mask), extent, offset))
    return refs


def _nearest(value: float, options: dict[str, float]) -> str:
    return min(options, key=lambda k: abs(options[k] - value))


def judge(image: np.ndarray) -> Verdict:
    """Read an (H, W, 3) uint8 RGB image of the shapes world."""
    img = np.asarray(image)
    assert img.ndim == 3 and img.shape[2] == 3, img.shape
    img = img.astype(np.float64)
    if max(img.shape[:2]) > MAX_SIDE:
        img = box_downsample(img, MAX_SIDE)
    H, W = img.shape[:2]
    r = max(1, round(min(H, W) / 32))  # ring width: 1 px at 32, 4 px at 128
    ring = np.concatenate([img[:r].reshape(-1, 3), img[-r:].reshape(-1, 3), img[r:-r, :r].reshape(-1, 3),
                           img[r:-r, -r:].reshape(-1, 3)])
    bg_rgb = np.median(ring, axis=0)
    background = nearest_colour(bg_rgb)
    dist = np.sqrt(((img - bg_rgb) ** 2).sum(axis=-1))  # (H, W)
    obj = largest_component(dist > OBJECT_DISTANCE)
    if not obj.any():
        return Verdict(background, None, None, None, None)
    # Its colour: the median of its core (the half of its pixels farthest from the background), so that the
    # anti-aliased or blurred rim, a blend with the background, doesn't pull the median toward another colour.
    d = dist[obj]
    fg_rgb = np.median(img[obj][d >= np.median(d)], axis=0)
    colour = nearest_colour(fg_rgb)
    # Its mask: where the image is at least half-way from the background to the object's colour (the coverage
    # threshold of the reference masks), the region of that set which overlaps the object most.
    axis = fg_rgb - bg_rgb
    cov = ((img - bg_rgb) @ axis) / max(float(axis @ axis), 1e-9)  # (H, W) estimated coverage
    half = cov >= 0.5
    label, _ = components(half | obj)
    mask = label == np.bincount(label[obj]).argmax()
    ys, xs = np.nonzero(mask & half) if (mask & half).any() else np.nonzero(mask)
    mask = np.zeros_like(mask)
    mask[ys, xs] = True
    w, h = (xs.max() - xs.min() + 1) / W, (ys.max() - ys.min() + 1) / H
    cx, cy = (xs.min() + xs.max() + 1) / 2 / W, (ys.min() + ys.max() + 1) / 2 / H
    grid = _grid(np.where(mask, cov, 0.0), mask)
    candidates = [(s, r) for s, rs in _references().items() for r in rs]
    iou = [np.minimum(grid, r.grid).sum() / max(np.maximum(grid, r.grid).sum(), 1e-9) for _, r in candidates]  # soft
    shape, ref = candidates[int(np.argmax(iou))]
    side = max(w, h) / ref.extent  # the shape's side s, from its bounding box
    size = _nearest(side, {k: v[0] for k, v in SIZES.items()})
    cx, cy = cx - ref.offset[0] * side, cy - ref.offset[1] * side
    position = min(POSITIONS, key=lambda k: (POSITIONS[k][0] - cx) ** 2 + (POSITIONS[k][1] - cy) ** 2)
    return Verdict(background, colour, shape, size, position)


def scene_attributes(scene: Scene) -> dict[str, str]:
    return {"background": scene.background, "colour": scene.colour, "shape": scene.shape, "size": scene.size,
            "position": scene.position}
