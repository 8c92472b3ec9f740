"""The shapes world (WORLD.md): renderer geometry against hand-computed areas, captions, and the judge's accuracy
on rendered, blurred and noised scenes."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageFilter
from unclip.demo import world
from unclip.demo.judge import judge, scene_attributes

# Areas of each shape as a fraction of s^2 (WORLD.md's geometry, by hand): the star is 10 triangles of sides
# h and 0.4 h at 36 degrees; the cross two s x s/3 bars minus their shared s/3 square.
AREA = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5,
        "star": 10 * 0.5 * 0.5 * 0.2 * math.sin(math.pi / 5), "cross": 2 / 3 - 1 / 9}


@pytest.mark.parametrize("shape", world.SHAPES)
def test_rendered_area_matches_geometry(shape):
    s = 0.6
    scene = world.Scene("white", "black", shape, "big", "center", s, 0.5, 0.5)
    cov = world.coverage(scene, 256)
    assert cov.min() == 0.0 and cov.max() == 1.0
    assert abs(cov.mean() - AREA[shape] * s * s) < 2e-3, (cov.mean(), AREA[shape] * s * s)


def test_render_colours_antialiasing_and_windows():
    scene = world.Scene("blue", "yellow", "square", "small", "top left", 0.34, 0.27, 0.27)
    img = world.render(scene, 128)
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    assert tuple(img[100, 100]) == world.PALETTE["blue"] and tuple(img[34, 34]) == world.PALETTE["yellow"]
    edge = img[34, int(0.1 * 128)]  # the square's left edge at x = 0.1 falls inside pixel 12 (12.8 px)
    assert all(min(a, b) < v < max(a, b) for v, a, b in zip(edge, world.PALETTE["blue"], world.PALETTE["yellow"]))
    np.testing.assert_array_equal(world.render(scene, 128, window=(20, 10, 40, 30)), img[10:40, 20:60])


def test_star_points_and_triangle_apex_up():
    star = world.polygon("star", 0.5, 0.5, 0.5)
    assert np.allclose(star[0], (0.5, 0.25))  # one point straight up, outer radius h
    radii = np.hypot(*(star - 0.5).T)
    assert np.allclose(radii[::2], 0.25) and np.allclose(radii[1::2], 0.1)
    tri = world.polygon("triangle", 0.5, 0.5, 0.5)
    assert np.allclose(tri, [(0.5, 0.25), (0.75, 0.75), (0.25, 0.75)])


def test_scenes_follow_the_rules():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        s = world.sample_scene(rng)
        assert s.colour != s.background
        lo, jit = world.SIZES[s.size]
        assert abs(s.side - lo) <= jit
        px, py = world.POSITIONS[s.position]
        assert abs(s.cx - px) <= 0.03 and abs(s.cy - py) <= 0.03
        assert s.size == "small" or s.position == "center"
    assert world.sample_scene(rng, position="left").size == "small"
    assert world.sample_scene(rng, size="big").position == "center"


def test_captions_grammar_and_articles():
    s = world.Scene("orange", "yellow", "star", "small", "top left", 0.34, 0.27, 0.27)
    assert world.caption(s, full=True) == "a small yellow star in the top left corner on an orange background"
    o = world.Scene("white", "orange", "star", "big", "center", 0.62, 0.5, 0.5)
    assert world.caption(o) == "an orange star"
    assert world.parse_caption("a orange star on a orange background") is None  # same colour twice: no scene
    assert world.parse_caption("a orange star") == {"colour": "orange", "shape": "star"}
    assert world.parse_caption("a big red circle on the left") is None  # big objects are only in the center
    assert world.parse_caption("a photo of a cat") is None
    rng = np.random.default_rng(1)
    for _ in range(500):
        scene = world.sample_scene(rng)
        text = world.caption(scene, rng)
        assert set(text.split()) <= set(world.VOCABULARY), text
        named = world.parse_caption(text)
        assert named is not None and all(scene_attributes(scene)[k] == v for k, v in named.items()), text


def _blur(img: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(2 * img.shape[0] / 128)))


def _noise(img: np.ndarray, rng) -> np.ndarray:
    return np.clip(np.round(img + rng.normal(0, 10, img.shape)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size,n,required", [(32, 600, 0.99), (64, 300, 1.0), (128, 150, 1.0), (256, 60, 1.0),
                                              (512, 30, 1.0)])
def test_judge_reads_rendered_blurred_and_noised_scenes(size, n, required):
    rng = np.random.default_rng(size)
    scenes = [world.sample_scene(rng) for _ in range(n)]
    for kind in ("clean", "blurred", "noised"):
        right = 0
        for s in scenes:
            img = world.render(s, size)
            img = _blur(img) if kind == "blurred" else _noise(img, rng) if kind == "noised" else img
            right += judge(img).as_dict() == scene_attributes(s)
        assert right / n >= required, (size, kind, right / n)


def test_judge_on_an_empty_canvas_and_matches():
    v = judge(np.full((64, 64, 3), world.PALETTE["green"], dtype=np.uint8))
    assert v.background == "green" and v.shape is None
    s = world.Scene("black", "red", "cross", "small", "bottom right", 0.34, 0.73, 0.73)
    v = judge(world.render(s, 96))  # not a multiple of 128: PIL's box filter is not involved below 128
    assert v.matches({"colour": "red", "shape": "circle"}) == {"colour": True, "shape": False}
