"""Faults and bad input (issue 11): nothing lost, nothing silently wrong, no traceback. Interrupts and kills run as
real subprocesses with signals; a full disk is injected at the write call. Permission faults (a read-only working
directory, another user's files) are in test_permissions.py; the right engines for the right model (item 5) in
test_export_identity.py; the shared checks in faults.py."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from faults import (
    EXE,
    FAST,
    _ok,
    _one_line_error,
    _one_line_error_of_process,
    _popen,
    _run,
)
from PIL import Image
from unclip.engine.cli import main
from unclip.export.cli import main as export_main
from unclip.models import build_preset, save_model


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return CliRunner()


# 1. interrupted exports -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig,networks", [(signal.SIGINT, 1), (signal.SIGKILL, 3)])
def test_a_run_after_an_interrupted_first_export_finishes_it(tmp_path, sig, networks):
    from unclip.core.artifacts import export_state
    engines = tmp_path / "engines" / "tiny-fp32"
    p = _popen(["a cat", *FAST], tmp_path, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # stop it once `networks` graphs of the automatic export are written
        try:
            if len(json.loads((engines / "manifest.json").read_text())["networks"]) >= networks:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    p.send_signal(sig)
    p.communicate(timeout=60)
    assert export_state(engines) == "partial"  # really stopped half-way
    res = _run(["a cat", *FAST], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "finishing the interrupted export" in res.stderr
    assert "Traceback" not in res.stderr and res.stdout.strip().endswith(".png")
    assert export_state(engines) == "complete"
    assert not [p for p in engines.iterdir() if p.name.startswith(".") and p.name != ".export.lock"]


def test_a_partial_export_is_finished_by_the_next_run(runner):
    _ok(runner.invoke(export_main, ["--model", "tiny", "--out", "engines/tiny-fp32", "--stage", "prior"]))
    res = _ok(runner.invoke(main, ["a cat", *FAST]))
    assert "finishing the interrupted export" in res.stderr


# 2. non-finite values ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,flag", [(["--eta", "nan"], "--eta"), (["--eta", "inf"], "--eta"),
                                       (["--decoder-guidance", "nan"], "--decoder-guidance"),
                                       (["--prior-guidance", "inf"], "--prior-guidance")])
def test_non_finite_options_refused(runner, args, flag):
    _one_line_error(runner.invoke(main, ["cat", *FAST, *args]), f"{flag} must be a finite number")


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    m = build_preset("tiny")
    with torch.no_grad():
        m.decoder.conv_out.weight.fill_(float("nan"))
    return save_model(m, tmp_path_factory.mktemp("nan") / "nan")


def test_nan_weights_stop_the_run_naming_the_stage(runner, nan_model):
    res = runner.invoke(main, ["cat", *FAST, "--model", str(nan_model), "--backend", "torch"])
    _one_line_error(res, "the decoder stage produced NaN or inf")
    assert not list(Path("out").glob("*.png"))


def test_inf_outputs_are_caught_although_clipping_would_hide_them(runner, tmp_path):
    m = build_preset("tiny")
    with torch.no_grad():
        m.prior.proj_to_clip_embeddings.bias.fill_(float("inf"))  # x0 = inf, clipped to +-5 by the sampler
    folder = save_model(m, tmp_path / "inf")
    res = runner.invoke(main, ["cat", *FAST, "--model", str(folder), "--backend", "torch"])
    _one_line_error(res, "the prior stage produced NaN or inf")


def test_the_export_gate_fails_on_nan(runner, nan_model):
    res = runner.invoke(export_main, ["--model", str(nan_model), "--out", "e", "--stage", "decoder"])
    _one_line_error(res, "the torch module itself gives NaN or inf")


def test_text_diff_of_texts_that_encode_the_same(runner):
    res = runner.invoke(main, ["a cat", *FAST, "--backend", "torch", "--text-diff", "a photo", "A  PHOTO"])
    _one_line_error(res, "the two texts encode the same")


# 3 + 4. no link followed, nothing overwritten ----------------------------------------------------------------------

def test_planted_links_are_never_followed(runner, tmp_path):  # 3: the old write probe truncated the link's target
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".unclip-write-test").symlink_to(victim)
    (out / "0-0.png").symlink_to(victim)
    res = _ok(runner.invoke(main, ["cat", *FAST, "--backend", "torch"]))
    assert victim.read_text() == "precious"
    assert res.stdout.split() == [str(Path("out") / "0-0-1.png")]


def test_images_are_never_overwritten_unless_asked(runner, tmp_path):  # 4, without the probe link of 3
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "0-0.png").symlink_to(victim)  # a link (or any file) where the first image would go
    res = _ok(runner.invoke(main, ["cat", *FAST, "--backend", "torch"]))
    assert victim.read_text() == "precious"
    assert res.stdout.split() == [str(Path("out") / "0-0-1.png")]
    res = _ok(runner.invoke(main, ["cat", *FAST, "--backend", "torch"]))
    assert res.stdout.split() == [str(Path("out") / "0-0-2.png")]
    (out / "0-0.png").unlink()
    _ok(runner.invoke(main, ["cat", *FAST, "--backend", "torch"]))
    first = (out / "0-0.png").read_bytes()
    _ok(runner.invoke(main, ["dog", *FAST, "--backend", "torch", "--overwrite"]))
    assert (out / "0-0.png").read_bytes() != first  # asked: replaced
    assert victim.read_text() == "precious"


def test_concurrent_runs_into_one_folder_keep_every_image(tmp_path):
    procs = [subprocess.Popen([str(EXE / "unclip-run"), "a cat", *FAST], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    paths = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)  # the first exports the engines, the others wait for it
    flat = [x for ps in paths for x in ps]
    assert len(set(flat)) == 3 and all((tmp_path / x).is_file() for x in flat)


def test_concurrent_runs_on_exported_engines_keep_every_image(tmp_path):
    res = _run(["x", *FAST, "--out", "warm"], tmp_path)  # engines first: only the images' file names can collide
    assert res.returncode == 0, res.stderr
    procs = [subprocess.Popen([str(EXE / "unclip-run"), "a cat", *FAST], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    flat = [x for o, _ in outs for x in o.split()]
    assert len(set(flat)) == 3 and all((tmp_path / x).is_file() for x in flat), flat


# 6. permissions -----------------------------------------------------------------------------------------------

def test_created_files_honour_the_umask(runner, tmp_path):
    old = os.umask(0o022)
    try:
        _ok(runner.invoke(main, ["cat", *FAST, "--dump", "d"]))
        folder = save_model(build_preset("tiny"), tmp_path / "saved")
    finally:
        os.umask(old)
    for p in [tmp_path / "out" / "0-0.png", tmp_path / "engines" / "tiny-fp32" / "manifest.json",
              tmp_path / "d" / "dump.json", folder / "decoder" / "config.json",
              folder / "decoder" / "diffusion_pytorch_model.safetensors"]:
        assert p.stat().st_mode & 0o777 == 0o644, p
    assert folder.stat().st_mode & 0o777 == 0o755 and (folder / "decoder").stat().st_mode & 0o777 == 0o755


# 7. one-line errors -------------------------------------------------------------------------------------------

def _full(*a, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_an_unwritable_engines_folder(runner, tmp_path):
    (tmp_path / "file").write_text("x")
    _one_line_error(runner.invoke(main, ["cat", *FAST, "--engines", "file/e"]), "cannot write the export")


def test_an_unwritable_export_folder(runner, tmp_path):
    (tmp_path / "file").write_text("x")
    _one_line_error(runner.invoke(export_main, ["--model", "tiny", "--out", "file/e"]), "cannot write the export")


def test_an_unwritable_dump_folder_is_found_before_any_work(runner, tmp_path):
    (tmp_path / "file").write_text("x")
    res = runner.invoke(main, ["cat", *FAST, "--backend", "torch", "--dump", "file/d"])
    _one_line_error(res, "--dump file/d: cannot write there")
    assert not list(Path("out").glob("*.png"))  # checked before any work


def test_a_full_disk_during_export(runner, monkeypatch):
    import onnx
    monkeypatch.setattr(onnx, "save_model", _full)
    _one_line_error(runner.invoke(export_main, ["--model", "tiny", "--out", "e2"]), "No space left on device")


def test_a_full_disk_while_writing_an_image(runner, monkeypatch):
    monkeypatch.setattr(Image.Image, "save", _full)
    _one_line_error(runner.invoke(main, ["cat", *FAST, "--backend", "torch"]), "No space left on device")
    assert not [p for p in Path("out").iterdir() if p.name.endswith(".tmp")]  # nothing half-written


def test_bad_images(runner, tmp_path, monkeypatch):
    from PIL import Image as PILImage
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2 x the limit: a "bomb"
    _one_line_error(runner.invoke(main, [*FAST, "--backend", "torch", "--variation", "big.png"]), "too large to decode")


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    from unclip.engine.manipulate import load_image
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 ... 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    img = np.asarray(load_image(tmp_path / "g16.png"))
    assert img.shape == (64, 64, 3)
    expected = np.round(ramp / 65535 * 255)
    assert np.abs(img[..., 0].astype(int) - expected).max() <= 1  # scaled: mid-grey in the middle, not white


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "tokenizer" / "vocab.json").write_text("{not json"), "tokenizer files are damaged"),
    (lambda f: (f / "tokenizer" / "merges.txt").write_bytes(b"\xff\xfe\x00"), "tokenizer files are damaged"),
    (lambda f: _edit_json(f / "decoder" / "config.json", norm_num_groups="8"), "should be int"),
    (lambda f: _edit_json(f / "decoder" / "config.json", norm_num_groups=0), "no network this engine can build"),
    (lambda f: _edit_json(f / "decoder_scheduler" / "scheduler_config.json", num_train_timesteps=0),
     "num_train_timesteps=0 must be"),
])
def test_damaged_model_folders(runner, tmp_path, damage, message):
    folder = save_model(build_preset("tiny"), tmp_path / "m")
    damage(folder)
    _one_line_error(runner.invoke(main, ["cat", *FAST, "--model", str(folder), "--backend", "torch"]), message)


def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# 10-13. bounded work, seeds and small things ----------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["cat", *FAST, "--num-images", "100000"], "raise it with --max-images"),
    ([*FAST, "--interpolate", "a", "b", "--frames", "10000"], "--frames 10000 is over the cap"),
])
def test_unbounded_work_is_refused_over_the_cap(tmp_path, args, message):
    try:  # a subprocess with a time limit: a tool without the cap would be at work for hours
        res = _run(args, tmp_path, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(args[-2:])}: still at work after 60 s (accepted, not refused)")
    _one_line_error_of_process(res, message)
    assert not (tmp_path / "engines").exists()  # refused before any work


class _Reader(threading.Thread):
    """Collects a pipe's bytes as they come (progress lines end in a carriage return, not a newline)."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.data = pipe, b""
        self.start()

    def run(self):
        for chunk in iter(lambda: os.read(self.pipe.fileno(), 1 << 16), b""):
            self.data += chunk

    def wait_for(self, pattern: bytes, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.data)) < count:
            if time.monotonic() > deadline or not self.is_alive():
                return False
            time.sleep(0.05)
        return True


def test_ctrl_c_keeps_finished_chunks(tmp_path):
    res = _run(["x", *FAST, "--out", "warm", "--max-batch", "1"], tmp_path)  # engines of one image per call
    assert res.returncode == 0, res.stderr
    p = _popen(["a cat", *FAST, "--num-images", "1000"], tmp_path)
    out, err = _Reader(p.stdout), _Reader(p.stderr)
    try:  # Ctrl-C once the second image's prior starts: the first image is done, 998 are not
        assert err.wait_for(rb"prior\s+1/", 2, timeout=300), err.data.decode(errors="replace")[-3000:]
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    out.join(timeout=60)
    err.join(timeout=60)
    stdout, stderr = out.data.decode(), err.data.decode(errors="replace")
    kept = sorted((tmp_path / "out").glob("*.png"))
    diag = f"exit {p.returncode}, {len(kept)} PNG(s) kept; stderr ends: {stderr[-600:]!r}"
    assert len(kept) >= 1, diag  # the finished chunk was saved before the interrupt
    assert p.returncode == 130 and "interrupted:" in stderr and "Traceback" not in stderr, diag
    assert len(kept) < 1000 and [str(Path("out") / k.name) for k in kept] == sorted(stdout.split()), diag


@pytest.mark.parametrize("args,message", [
    (["--seed", str(2 ** 70)], "--seed must be in 0"), (["--seed", "-1"], "--seed must be in 0"),
    (["--seed", str(2 ** 63 - 2), "--num-images", "3"], "--seed must be in 0"),
    (["--seed", str(2 ** 64 - 2), "--num-images", "3", "--max-batch", "1"], "--seed must be in 0"),  # failed mid-run
    (["--max-batch", "0"], "--max-batch must be at least 1"), (["--max-batch", "-1"], "--max-batch must be"),
    (["--interpolate", "a", "b"], "--interpolate needs --frames N"),
    (["--precision", "bf16"], "--precision bf16 is not available with --backend onnxruntime"),
])
def test_bad_values_one_line(runner, args, message):
    res = runner.invoke(main, ["cat", *FAST, *args])
    _one_line_error(res, message)
    assert "exporting" not in res.output and not Path("engines").exists()  # refused before any work


def test_a_fix_message_names_force_once_for_a_corrupt_file(runner, tmp_path):
    _ok(runner.invoke(main, ["cat", *FAST]))
    (tmp_path / "engines" / "tiny-fp32" / "prior.onnx").write_bytes(b"broken")
    res = runner.invoke(main, ["cat", *FAST])
    assert res.exit_code == 1 and res.output.count("--force") == 1, res.output


def test_negative_with_both_guidance_scales_1_warns(runner):
    res = _ok(runner.invoke(main, ["cat", *FAST, "--backend", "torch", "--prior-guidance", "1",
                                   "--decoder-guidance", "1", "--negative", "dog"]))
    assert "--negative is not used" in res.stderr


@pytest.mark.parametrize("sampler", ["ddpm", "unclip"])  # unclip: diffusers' name of the same sampler
def test_eta_with_the_ddpm_sampler_warns(runner, sampler):
    res = _ok(runner.invoke(main, ["cat", *FAST, "--backend", "torch", "--sampler", sampler, "--eta", "0.5"]))
    assert f"--eta is not used by the {sampler} sampler" in res.stderr


def test_a_prompt_with_interpolate_warns(runner):
    res = _ok(runner.invoke(main, ["cat", *FAST, "--backend", "torch", "--interpolate", "a", "b", "--frames", "2"]))
    assert "PROMPT is not used with --interpolate" in res.stderr


def test_the_long_prompt_warning_is_short(tmp_path):
    long = " ".join(["zebra"] * 2000)  # a real process: its whole stderr, as a user sees it
    res = _run([long, *FAST, "--backend", "torch"], tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "dropped" in res.stderr and len(res.stderr.encode()) < 2000, res.stderr[:3000]


@pytest.mark.parametrize("mode", ["prompt", "variation", "interpolate"])
def test_png_metadata_holds_names_not_local_paths(runner, tmp_path, mode):
    folder = save_model(build_preset("tiny"), tmp_path / "mfolder")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "pic.png")
    pic = str(tmp_path / "pic.png")
    args = {"prompt": ["zebra"], "variation": ["--variation", pic],
            "interpolate": ["--interpolate", pic, "a dog", "--frames", "2"]}[mode]
    res = _ok(runner.invoke(main, [*args, *FAST, "--model", str(folder), "--backend", "torch"]))
    assert res.stdout.split()
    for p in res.stdout.split():
        text = json.dumps(dict(Image.open(p).text))
        assert str(tmp_path) not in text, text  # names, not local paths


def test_version(runner):
    assert _ok(runner.invoke(main, ["--version"])).stdout.strip()


def test_negative_warns_when_the_models_own_scales_are_1(runner, tmp_path):
    """The check runs on the scales the request runs with, the model folder's generation_config.json included."""
    from unclip.models import build_preset, save_model
    folder = save_model(build_preset("tiny"), tmp_path / "ones")
    (folder / "generation_config.json").write_text(json.dumps({"prior_guidance": 1.0, "decoder_guidance": 1.0}))
    args = ["cat", *FAST, "--model", str(folder), "--backend", "torch", "--negative", "dog"]
    assert "--negative is not used" in _ok(runner.invoke(main, args)).stderr


