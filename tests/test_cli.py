"""unclip-run through click's runner (and once as a real subprocess): outputs, PNG metadata, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from unclip.engine.cli import main

FAST = ["--model", "tiny", "--prior-steps", "3", "--decoder-steps", "3", "--sr256-steps", "2", "--size", "64"]


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return CliRunner()


def test_generates_pngs_with_metadata_and_dump(runner, tmp_path):
    res = runner.invoke(main, ["a photo of a cat", *FAST, "--num-images", "3", "--max-batch", "2", "--dump", "d"])
    assert res.exit_code == 0, res.output
    assert "no engines in engines/tiny-fp32: exporting tiny" in res.stderr
    assert "weights are random" in res.stderr
    paths = res.stdout.split()
    assert len(paths) == 3
    img = Image.open(paths[0])
    assert img.size == (64, 64) and img.text["prompt"] == "a photo of a cat" and img.text["backend"] == "onnxruntime"
    assert json.loads(img.text["prior_steps"]) == 3 and img.text["model"] == "tiny"
    # a model without generation_config.json (the built-in tiny) runs at Karlo's scales, and the PNG says which
    assert json.loads(img.text["prior_guidance"]) == 4.0 and json.loads(img.text["decoder_guidance"]) == 8.0
    meta = json.loads((tmp_path / "d" / "dump.json").read_text())
    assert meta["timesteps"]["sr256"] == [999, 0]
    assert np.load(tmp_path / "d" / "image_sr256.npy").shape == (3, 3, 64, 64)
    assert np.load(tmp_path / "d" / "image_embeds.npy").shape == (3, 32)


def test_empty_prompt_and_torch_backend(runner):
    res = runner.invoke(main, ["", *FAST, "--backend", "torch", "--size", "16"])
    assert res.exit_code == 0, res.output
    assert Image.open(res.stdout.split()[0]).size == (16, 16)


@pytest.mark.parametrize("args,message", [
    (["--size", "512"], "--size 512 is not an image size of model 'tiny' (its sizes: 16, 64, 256)"),
    (["--prior-steps", "0"], "--prior-steps must be a whole number >= 1"),
    (["--decoder-steps", "-3"], "--decoder-steps must be a whole number >= 1"),
    (["--model", "/nonexistent/model"], "no such model folder"),
    (["--out", "/proc/forbidden"], "cannot write there"),
    (["--eta", "-1"], "--eta must be >= 0"),
    (["--prior-guidance", "-1"], "--prior-guidance must be a finite number >= 0, got -1.0"),  # as generation_config
    (["--decoder-guidance", "-0.5"], "--decoder-guidance must be a finite number >= 0, got -0.5"),
    (["--num-images", str(10**12)], f"{10**12} images exceed the cap of 1000 per run"),  # not the seed's range
    (["--num-images", str(10**19)], f"--num-images {10**19} is more than the 2^63 seeds there are"),
    (["--max-images", "0"], "--max-images must be at least 1, got 0"),
    (["--dump", ""], "--dump needs a folder name"),
])
def test_bad_input_one_line(runner, args, message):
    res = runner.invoke(main, ["cat", *FAST, *args])
    assert res.exit_code != 0
    assert message in res.output and "Traceback" not in res.output, res.output


def test_size_without_stage(runner, tmp_path):
    from unclip.models import build_preset, save_model
    m = build_preset("tiny")
    m.sr1024 = None
    save_model(m, tmp_path / "no1024")
    res = runner.invoke(main, ["cat", *FAST, "--model", str(tmp_path / "no1024"), "--size", "256",
                               "--backend", "torch"])
    assert res.exit_code == 1 and "(its sizes: 16, 64)" in res.output


def test_corrupt_engines_name_the_fix(runner, tmp_path):
    assert runner.invoke(main, ["cat", *FAST]).exit_code == 0
    (tmp_path / "engines" / "tiny-fp32" / "prior.onnx").write_bytes(b"broken")
    res = runner.invoke(main, ["cat", *FAST])
    assert res.exit_code == 1 and "run: unclip-export --model tiny --out engines/tiny-fp32" in res.output


def test_real_subprocess_non_utf8_prompt(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "unclip-run")
    res = subprocess.run([exe, b"caf\xe9", *FAST], cwd=tmp_path, capture_output=True)
    assert res.returncode == 1
    assert b"not valid UTF-8" in res.stderr and b"Traceback" not in res.stderr


def test_backend_package_missing_names_it(runner, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    res = runner.invoke(main, ["cat", *FAST])
    assert res.exit_code == 1 and "pip install onnxruntime" in res.output and "Traceback" not in res.output


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_one_line(runner):
    res = runner.invoke(main, ["cat", *FAST, "--backend", "torch", "--device", "cuda"])
    assert res.exit_code == 1 and "torch sees no CUDA GPU here" in res.output


def test_engines_of_another_model_refused(runner, tmp_path):
    assert runner.invoke(main, ["cat", *FAST, "--engines", "e"]).exit_code == 0
    from unclip.models import build_preset, save_model
    save_model(build_preset("tiny"), tmp_path / "other")
    res = runner.invoke(main, ["cat", *FAST, "--model", str(tmp_path / "other"), "--engines", "e"])
    assert res.exit_code == 1 and "holds engines of 'tiny'" in res.output and res.output.count("--force") == 1, \
        res.output


def test_tensorrt_without_tensorrt_one_line(runner, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    res = runner.invoke(main, ["cat", *FAST, "--backend", "tensorrt"])
    assert res.exit_code == 1 and "TensorRT is not installed: pip install tensorrt" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("device", ["foo", "mps", "cuda:x"])
def test_unsupported_device_one_line(runner, device):
    res = runner.invoke(main, ["cat", *FAST, "--device", device])
    assert res.exit_code == 1 and f"--device {device!r} is not supported" in res.output, res.output


def test_demo_runs_at_its_own_decoder_guidance(runner):
    """The shipped demo folder's generation_config.json (decoder 3, upsamplers 5 steps) is the default; the PNG
    records it."""
    res = runner.invoke(main, ["a red circle", "--backend", "torch", "--size", "32", "--prior-steps", "2",
                               "--decoder-steps", "2"])
    assert res.exit_code == 0, res.output
    img = Image.open(res.stdout.split()[0])
    assert json.loads(img.text["decoder_guidance"]) == 3.0 and json.loads(img.text["prior_guidance"]) == 4.0
    # its step counts too (upsamplers 5 / 5), where the command left them out; given ones win
    assert [json.loads(img.text[k]) for k in ("prior_steps", "decoder_steps", "sr256_steps", "sr1024_steps")] == \
        [2, 2, 5, 5]


def test_a_dump_never_writes_over_a_users_files(runner, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "tokens.npy").write_text("mine")
    res = runner.invoke(main, ["cat", *FAST, "--backend", "torch", "--dump", "d"])
    assert res.exit_code == 1 and "--dump d holds files that are not a dump (tokens.npy)" in res.output, res.output
    assert (tmp_path / "d" / "tokens.npy").read_text() == "mine" and not list((tmp_path / "out").glob("*.png"))
    (tmp_path / "d" / "dump.json").write_text('{"unfinished": true}')  # a dump stopped part-way: one of ours
    res = runner.invoke(main, ["cat", *FAST, "--backend", "torch", "--dump", "d"])
    assert res.exit_code == 1 and "--dump d already holds a dump; choose another folder or pass --overwrite" in \
        res.output, res.output


def test_prompts_file_with_a_byte_order_mark_reads_the_same_prompts(runner, tmp_path):
    from unclip.engine.request import read_prompts
    (tmp_path / "bom.txt").write_bytes("\ufeffa red circle\r\nblue square\n".encode("utf-8"))
    assert read_prompts(str(tmp_path / "bom.txt")) == ("a red circle", "blue square")


def test_options_a_variation_does_not_use_are_named_and_not_recorded(runner, tmp_path):
    picture = tmp_path / "p.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(picture)
    res = runner.invoke(main, ["a red circle", *FAST, "--backend", "torch", "--variation", str(picture),
                               "--negative", "blue", "--prior-steps", "3", "--out", "v"])
    assert res.exit_code == 0, res.output
    assert ("PROMPT, --negative, --prior-steps are not used by --variation" in res.output
            and "--prior-guidance" not in res.output), res.output
    text = Image.open(next((tmp_path / "v").glob("*.png"))).text
    assert text["prompt"] == "" and not {"negative", "prior_steps", "prior_guidance"} & set(text), text
    res = runner.invoke(main, [*FAST, "--backend", "torch", "--variation", str(picture), "--invert", "--out", "w"])
    assert res.exit_code == 0 and "--invert with --eta 0 decodes the inversion deterministically" in res.output


def test_num_images_with_a_prompts_file_is_named_unused(runner, tmp_path):
    (tmp_path / "p.txt").write_text("cat\n")
    res = runner.invoke(main, [*FAST, "--backend", "torch", "--prompts", "p.txt", "--num-images", "3"])
    assert res.exit_code == 0 and "--num-images is not used with --prompts FILE" in res.output, res.output
    assert len(res.stdout.split()) == 1


@pytest.mark.parametrize("end", ["phot.png", "./missing/photo.jpg", "~/nowhere/x.webp", "/no/such/dir/"])
def test_an_interpolate_end_that_looks_like_a_path_must_exist(runner, end):
    res = runner.invoke(main, [*FAST, "--backend", "torch", "--interpolate", "a cat", end, "--frames", "2"])
    assert res.exit_code == 1 and f"--interpolate {end!r} looks like an image path but is no file" in res.output, \
        res.output
    assert "Traceback" not in res.output and not (Path("out").exists() and any(Path("out").iterdir()))


def test_prompts_are_not_taken_for_paths():
    from unclip.engine.request import looks_like_a_path
    assert not any(map(looks_like_a_path, ["/imagine a cat", "~dreamy forest~", "a red/blue circle", "a cat"]))
    assert all(map(looks_like_a_path, ["photo.PNG", "./a", "../b c", "~/x", "/tmp/x"]))


def test_warnings_quote_a_huge_word_briefly(runner, tmp_path):
    word = "x" * 200_000
    res = runner.invoke(main, [word, *FAST, "--backend", "torch"])
    assert res.exit_code == 0, res.output[-500:]
    assert max(len(line) for line in res.output.splitlines()) < 400, [len(x) for x in res.output.splitlines()]
