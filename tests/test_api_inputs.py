"""The Python API as a notebook user calls it (a new-user probe's findings): every value a Request, Settings,
generate() or a manipulation takes is checked by type as well as range, with one RequestError naming the flag, before
any work or write; numpy integers and pathlib.Paths are taken as the command line's ints and strings; images come as
paths, PIL images of any mode or uint8 arrays; a failed run leaves no empty folders."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from unclip.core.errors import RequestError, UnclipError
from unclip.core.spec import spec_from_model
from unclip.engine import manipulate as mp
from unclip.engine.api import run
from unclip.engine.backend_ort import OnnxRuntimeBackend
from unclip.engine.backend_torch import TorchBackend
from unclip.engine.pipeline import Settings, generate, timesteps
from unclip.engine.request import Request
from unclip.models import build_preset

S = dict(prior_steps=2, decoder_steps=2, sr256_steps=2, sr1024_steps=2)
ST = Settings(**S, size=16)


@pytest.fixture(scope="module")
def tiny():
    return TorchBackend(build_preset("tiny"))


def _refused(make, message: str):
    with pytest.raises(RequestError) as e:
        make()
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("fields,message", [
    # a str where a sequence belongs would be read one character at a time
    (dict(prompts="a red circle"), "--prompts must be a list or tuple of prompts (str), got 'a red circle' (str) "
                                   "(for one prompt, pass prompt=...)"),
    (dict(interpolate="ab", frames=2), "--interpolate takes two prompts or image paths A and B, as a tuple (A, B), "
                                       "got 'ab' (str)"),
    (dict(prompt="a", text_diff="cs"), "--text-diff takes two texts (str) A and B"),
    (dict(interpolate=("a", "b", "c"), frames=2), "--interpolate takes two prompts or image paths A and B"),
    (dict(prompts=(p for p in ["a"])), "--prompts must be a list or tuple of prompts (str)"),
    (dict(prompts=["a", 5]), "--prompts: every prompt must be a str, got 5 (int)"),
    (dict(prompt=["a", "b"]), "PROMPT must be a str, got ['a', 'b'] (list) (for several prompts, pass prompts=[...])"),
    # a config file's strings: "no" would read as true and overwrite a user's image
    (dict(prompt="a", overwrite="no"), "--overwrite must be True or False, got 'no' (str)"),
    (dict(variation="x.png", invert="no"), "--invert must be True or False, got 'no' (str)"),
    # a float max_batch used to be written into the export's manifest, breaking every later run
    (dict(prompt="a", max_batch=2.5), "--max-batch must be a whole number, got 2.5 (float)"),
    (dict(prompt="a", max_batch="4"), "--max-batch must be a whole number, got '4' (str)"),
    (dict(interpolate=("a", "b"), frames=2.5), "--frames must be a whole number, got 2.5 (float)"),
    (dict(prompt="a", prior_candidates=None), "--prior-candidates must be a whole number, got None"),
    (dict(prompt="a", max_images=None), "--max-images must be a whole number, got None"),
    (dict(prompt="a", amount="0.5"), "--amount must be a number, got '0.5' (str)"),
    (dict(prompt="a", settings=None), "settings must be an unclip.engine.pipeline.Settings, got None"),
    (dict(prompt="a", settings={"seed": 1}), "settings must be an unclip.engine.pipeline.Settings, got {'seed': 1}"),
    (dict(prompt="a", model=None), "--model must be a model folder's path (a str or pathlib.Path), got None"),
    (dict(prompt="a", device=None), "--device must be a str, got None"),
    (dict(prompt="a", engines=""), "--engines needs a folder name (it got an empty one); pass --engines DIR"),
    (dict(prompt="a", out=""), "--out needs a folder name (it got an empty one); pass --out DIR"),
    (dict(prompt="a", dump=b"d"), "--dump must be a folder's path (a str or pathlib.Path), got b'd' (bytes)"),
    (dict(variation=Image.new("RGB", (8, 8))), "--variation must be an image file's path (a str or pathlib.Path), "
                                               "got an object of type Image; save the image first"),
])
def test_request_values_of_the_wrong_type_are_named(fields, message):
    _refused(lambda: Request(**fields), message)


@pytest.mark.parametrize("fields,message", [
    (dict(seed=1.0), "--seed must be a whole number, got 1.0 (float)"),
    (dict(seed=True), "--seed must be a whole number, got True (bool)"),
    (dict(seed="1"), "--seed must be a whole number, got '1' (str)"),
    (dict(size="64"), "--size must be a whole number, got '64' (str)"),
    (dict(size=16.0), "--size must be a whole number, got 16.0 (float)"),
    (dict(prior_steps=2.0), "--prior-steps must be a whole number, got 2.0 (float)"),
    (dict(prior_guidance="4"), "--prior-guidance must be a number, got '4' (str)"),
    (dict(eta=None), "--eta must be a number, got None"),
    (dict(negative=None), "--negative must be a str, got None"),
    (dict(sampler=None), "--sampler must be a str, got None"),
])
def test_settings_values_of_the_wrong_type_are_named(fields, message):
    _refused(lambda: Settings(**fields), message)


def test_numpy_numbers_and_paths_are_taken_as_plain_values(tmp_path):
    s = Settings(seed=np.int64(3), num_images=np.int32(2), prior_steps=np.int64(2), prior_guidance=np.float32(4),
                 size=np.uint16(16))
    assert (s.seed, s.num_images, s.prior_steps, s.prior_guidance, s.size) == (3, 2, 2, 4.0, 16)
    assert all(type(v) is t for v, t in ((s.seed, int), (s.num_images, int), (s.prior_steps, int),
                                         (s.prior_guidance, float), (s.size, int)))
    r = Request(prompts=["a", "b"], out=tmp_path / "o", dump=tmp_path / "d", max_batch=np.int64(2),
                overwrite=np.bool_(False), settings=s)
    assert (r.prompts, r.out, r.dump, r.max_batch, r.overwrite) == (("a", "b"), str(tmp_path / "o"),
                                                                      str(tmp_path / "d"), 2, False)
    assert type(r.max_batch) is int and type(r.overwrite) is bool


def test_a_run_with_numpy_values_records_plain_ones(tmp_path):
    """The seed names the file and is recorded in the PNG as the command line records it."""
    paths = run(Request(prompt="a", out=tmp_path / "o", model="tiny", backend="torch",
                        settings=Settings(**S, size=16, seed=np.int64(5))))
    assert [p.name for p in paths] == ["5-0.png"]
    assert Image.open(paths[0]).text["seed"] == "5"


def test_generate_and_the_manipulations_check_their_arguments(tiny):
    b = tiny
    _refused(lambda: generate(b, b.spec, [], ST), "no prompts: pass a prompt")
    _refused(lambda: generate(b, b.spec, ["a", 5], ST), "--prompts: every prompt must be a str, got 5 (int)")
    _refused(lambda: generate(b, b.spec, "a", ST, candidates=0), "--prior-candidates must be at least 1, got 0")
    _refused(lambda: generate(b, b.spec, "a", None), "settings must be an unclip.engine.pipeline.Settings")
    demo_spec = spec_from_model(build_preset("demo"))
    _refused(lambda: generate(b, demo_spec, "a", Settings(**S, size=32)),
             "spec is that of model 'demo', and the backend runs model 'tiny'; pass backend.spec")
    _refused(lambda: generate(b, replace(b.spec, decoder_size=32), "a", ST),
             "spec is that of another version of model 'tiny' than the backend's; pass backend.spec")
    # the same model with other generation defaults: the caller's to choose (an engines folder's spec records the
    # defaults of its export; spec_from_model(model) reads today's)
    other = replace(b.spec, defaults={"decoder_guidance": 1.0})
    assert generate(b, other, "a", Settings(**S, size=16)).images.shape == (1, 16, 16, 3)
    _refused(lambda: mp.interpolate(b, b.spec, ST, "a", "b", 1), "--frames must be at least 2")  # at the call
    _refused(lambda: mp.text_diff(b, b.spec, ST, "a", ("circle", "square"), 2.0),
             "--amount 2.0 is outside [0, 1]")
    _refused(lambda: mp.text_diff(b, b.spec, ST, "a", ("circle", "square"), 0.5, frames=0),
             "--frames must be at least 1, got 0")
    _refused(lambda: mp.text_diff(b, b.spec, ST, "a", "cs", 0.5), "--text-diff takes two texts")


def test_step_counts_above_the_trained_timesteps_are_refused(tiny):
    """3000 prior steps on a 1000-step schedule repeated timesteps (999, 999, 998, ...); diffusers' DDIM and DDPM
    schedulers refuse them. Only the stages that run up to the size count; a count from generation_config.json is
    named as such."""
    b = tiny
    assert len(set(timesteps(b.spec, Settings(**{**S, "prior_steps": 1000}, size=16))["prior"])) == 1000
    for stage in ("prior", "decoder", "sr256", "sr1024"):
        settings = Settings(**{**S, f"{stage}_steps": 1001}, size=256)
        _refused(lambda: generate(b, b.spec, "a", settings), f"--{stage}-steps 1001 is more than the 1000 "
                 f"timesteps {stage} was trained with; pass --{stage}-steps 1000 or fewer")
    unused = Settings(**{**S, "sr256_steps": 5000, "sr1024_steps": 5000}, size=16)  # the decoder's size: not run
    assert generate(b, b.spec, "a", unused).images.shape == (1, 16, 16, 3)
    from_file = replace(b.spec, defaults={"prior_steps": 2000})
    _refused(lambda: generate(b, from_file, "a", Settings(decoder_steps=2, size=16)),
             "the model's generation_config.json sets prior_steps 2000, more than the 1000 timesteps prior was "
             "trained with; pass --prior-steps 1000 or fewer")


def test_images_come_as_paths_pil_images_of_any_mode_or_arrays(tiny, tmp_path):
    """The same picture given as a file, a PIL image and a uint8 array makes the same variation; greyscale and RGBA
    images are converted as files are (load_image: the reference route) instead of failing inside torch."""
    b = tiny
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8))
    rgba = Image.fromarray((rng.random((40, 50, 4)) * 255).astype(np.uint8), "RGBA")
    for name, im in (("rgb", img), ("l", img.convert("L")), ("rgba", rgba)):
        im.save(tmp_path / f"{name}.png")
        ref = mp.variation(b, b.spec, ST, mp.load_image(tmp_path / f"{name}.png")).images
        for given in (str(tmp_path / f"{name}.png"), tmp_path / f"{name}.png", im, np.asarray(im)):
            assert mp.variation(b, b.spec, ST, given).images.equal(ref), (name, type(given))
    frames = list(mp.interpolate(b, b.spec, ST, img.convert("L"), "a red circle", 2))
    assert frames[0].equal(mp.variation(b, b.spec, ST, tmp_path / "l.png").images[0])
    frames = list(mp.interpolate(b, b.spec, ST, tmp_path / "l.png", "a red circle", 2))  # a Path is an image
    assert frames[0].equal(mp.variation(b, b.spec, ST, tmp_path / "l.png").images[0])
    with pytest.raises(mp.ImageInputError, match=r"an array must be uint8 of shape \(H, W\), \(H, W, 3\) or "):
        mp.variation(b, b.spec, ST, np.asarray(img) / 255)
    with pytest.raises(mp.ImageInputError, match="must be an image file's path, a PIL image or a uint8 array"):
        mp.variation(b, b.spec, ST, [1, 2])


def _openvino():
    pytest.importorskip("openvino")  # an optional extra (declared for tests)
    from unclip.engine.backend_ov import OpenVINOBackend
    return OpenVINOBackend


@pytest.mark.parametrize("make,message", [
    (lambda m: TorchBackend(m, precision="fp64"), "--precision 'fp64' is not available with --backend torch"),
    (lambda m: TorchBackend(m, mode="Eager"), "--torch-mode 'Eager' is not one of eager, static, cuda-graphs"),
    (lambda m: TorchBackend("tiny"), "TorchBackend takes a loaded model (unclip.models.load_model(folder) or "),
    (lambda m: TorchBackend(m, device="foo"), "--device 'foo' is not supported (choose cpu, cuda or cuda:N)"),
    (lambda m: TorchBackend(m, max_batch=0), "--max-batch must be at least 1, got 0"),
    (lambda m: OnnxRuntimeBackend("e", device="foo"), "--device 'foo' is not supported"),
    (lambda m: OnnxRuntimeBackend(None), "--engines must be a folder's path (a str or pathlib.Path), got None"),
    (lambda m: _openvino()("e", precision="fp64"), "--precision 'fp64' is not available with --backend openvino"),
    (lambda m: _openvino()(None), "--engines must be a folder's path (a str or pathlib.Path), got None"),
])
def test_backends_opened_directly_check_their_options(make, message):
    _refused(lambda: make(build_preset("tiny")), message)


def test_a_failed_run_leaves_no_empty_folders(tmp_path):
    """The output and dump folders (and their missing parents) are made by the first result written, so a run that
    fails before writing leaves none behind (nor takes away one another run made meanwhile); a folder that can't
    be made is still refused before any work."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(UnclipError, match=f"--out {tmp_path}/file/o: cannot write there"):
        run(Request(prompt="a", out=tmp_path / "file" / "o", model="tiny", backend="torch", settings=ST))
    (tmp_path / "mine").mkdir()
    bad = Settings(**S, size=17)
    with pytest.raises(UnclipError, match="--size 17 is not an image size"):
        run(Request(prompt="a", out=tmp_path / "new" / "deeper", dump=tmp_path / "d", model="tiny",
                    backend="torch", settings=bad))
    with pytest.raises(UnclipError, match="--size 17 is not an image size"):
        run(Request(prompt="a", out=tmp_path / "mine", model="tiny", backend="torch", settings=bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"]
    paths = run(Request(prompt="a", out=tmp_path / "ok" / "deep", model="tiny", backend="torch", settings=ST))
    assert [p.relative_to(tmp_path) for p in paths] == [Path("ok/deep/0-0.png")]


def test_overwrite_no_as_a_string_keeps_the_users_image(tmp_path):
    """overwrite="no" used to be truthy: the user's image was replaced."""
    first = run(Request(prompt="a red circle", out=tmp_path, model="tiny", backend="torch", settings=ST))[0]
    before = first.read_bytes()
    _refused(lambda: Request(prompt="a blue square", out=tmp_path, overwrite="no", model="tiny", backend="torch",
                             settings=ST), "--overwrite must be True or False")
    second = run(Request(prompt="a blue square", out=tmp_path, overwrite=False, model="tiny", backend="torch",
                         settings=ST))[0]
    assert first.read_bytes() == before and second.name == "0-0-1.png"


@pytest.mark.parametrize("name,meant", [("Tiny", "tiny"), ("demo ", "demo")])
def test_a_mistyped_built_in_name_names_the_model(name, meant, tmp_path):
    from unclip.core.errors import ModelLoadError
    with pytest.raises(ModelLoadError) as e:
        run(Request(prompt="a", model=name, backend="torch", out=tmp_path / "o", settings=ST))
    assert str(e.value) == f"{name!r}: no such model folder; the built-in model is {meant!r} (built in: demo, tiny, " \
                           "small, karlo)"
    assert not (tmp_path / "o").exists()
