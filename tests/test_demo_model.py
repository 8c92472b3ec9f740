"""The shipped `demo` model (trained on the shapes world): it loads, exports, agrees across onnxruntime and torch,
and draws what it is asked, as the world's judge reads the pixels."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from unclip.core.identity import demo_folder
from unclip.demo import world
from unclip.demo.judge import judge
from unclip.engine.backend_ort import OnnxRuntimeBackend
from unclip.engine.backend_torch import TorchBackend
from unclip.engine.pipeline import Settings, generate, image_sizes
from unclip.export.onnx_export import export_model
from unclip.models import build_preset

PROMPTS = world.sample_prompts(24, seed=99)  # fixed: 24 captions of the grammar, image i from seed i
AT_128 = Settings(size=128)  # end to end through prior, decoder and the first upsampler; the judge reads 128 px


@pytest.fixture(scope="module")
def torch_backend():
    return TorchBackend(build_preset("demo"))


def _generate(backend, prompts, settings, batch=8):
    images = []
    for first in range(0, len(prompts), batch):
        chunk = prompts[first:first + batch]
        images += [im.numpy() for im in generate(backend, backend.spec, chunk,
                                                 replace(settings, num_images=len(chunk)), first_image=first).images]
    return images


def test_ships_compact_and_loads():
    files = list(demo_folder().rglob("*.safetensors"))
    assert len(files) == 8 and sum(f.stat().st_size for f in files) <= 30e6
    model = build_preset("demo")
    assert model.name == "demo" and model.image_encoder is not None
    from unclip.core.spec import spec_from_model
    assert sorted(image_sizes(spec_from_model(model))) == [32, 128, 512]
    from unclip.demo.config import GENERATION
    assert model.defaults == spec_from_model(model).defaults == GENERATION  # its generation_config.json


@pytest.fixture(scope="module")
def verdicts(torch_backend):
    images = _generate(torch_backend, PROMPTS, AT_128)
    return [judge(im).matches(world.parse_caption(p)) for p, im in zip(PROMPTS, images)]


@pytest.mark.xfail(strict=True, reason="issue 9's target is not reached yet: the shipped model gets every named "
                   "attribute right for 75% of these prompts (shape 75%, colour 96%); see README 'Quality'")
def test_draws_what_the_prompt_names(verdicts):
    right = [all(m.values()) for m in verdicts]
    assert np.mean(right) >= 0.9, [p for p, ok in zip(PROMPTS, right) if not ok]


def test_background_and_size_as_named(verdicts):
    """The attributes the shipped model does reach, at issue 9's targets (background 97%, size 90%)."""
    for attribute, target in (("background", 0.97), ("size", 0.90)):
        named = [m[attribute] for m in verdicts if attribute in m]
        assert len(named) >= 5 and np.mean(named) >= target, (attribute, np.mean(named), len(named))


def test_onnxruntime_agrees_with_torch(torch_backend, tmp_path):
    export_model(build_preset("demo"), tmp_path, source="demo")
    ort_b = OnnxRuntimeBackend(tmp_path)
    prompts = PROMPTS[:4]
    a = _generate(ort_b, prompts, AT_128, batch=4)
    b = _generate(torch_backend, prompts, AT_128, batch=4)
    d = np.abs(np.stack(a).astype(np.float64) - np.stack(b)) / 255
    assert d.mean() <= 2e-3 and (d > 0.05).mean() <= 1e-3, (d.mean(), (d > 0.05).mean())
    assert [judge(x).as_dict() for x in a] == [judge(x).as_dict() for x in b]
