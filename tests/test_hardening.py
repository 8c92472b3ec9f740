"""Faults and bad input (issue 11): nothing lost, nothing silently wrong, no traceback. Interrupts and kills run as
real subprocesses with signals; a full disk is injected at the write call. Permission faults (a read-only working
directory, another user's files) are in test_permissions.py; the shared checks in faults.py."""
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


# 5. the right model ----------------------------------------------------------------------------------------------

def test_engines_of_a_model_edited_in_place_are_refused(runner, tmp_path):
    folder = save_model(build_preset("tiny"), tmp_path / "m")
    args = ["cat", *FAST, "--model", "m", "--engines", "e"]
    _ok(runner.invoke(main, args))
    w = folder / "decoder" / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"  # weights edited in place (same size)
    w.write_bytes(bytes(data))
    res = runner.invoke(main, args)
    _one_line_error(res, "holds engines of an earlier version of --model m")
    line = res.output.strip().splitlines()[-1]
    fix = line.split("again: ")[1].split()  # unclip-export --model m --out e --precision fp32 (no --force needed)
    assert fix[:1] == ["unclip-export"] and "--force" not in fix, line
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    res = runner.invoke(export_main, fix[1:])
    assert res.exit_code == 0, res.output
    after = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert after["networks"]["decoder"]["files"] != manifest["networks"]["decoder"]["files"]
    assert {n: e for n, e in after["networks"].items() if n != "decoder"} == {
        n: e for n, e in manifest["networks"].items() if n != "decoder"}  # the unchanged networks are kept
    _ok(runner.invoke(main, args))


def test_the_default_engines_of_a_model_edited_in_place_are_exported_again(runner, tmp_path):
    """Without --engines the folder is the tool's own cache (engines/<model>-<precision>): engines of the same
    model before its weights changed (a package upgrade, a retrained folder) are exported again, and the run
    draws with the new weights (the image equals the torch backend's on the edited model)."""
    from unclip.core.identity import fingerprint
    folder = save_model(build_preset("tiny"), tmp_path / "m")
    args = ["cat", *FAST, "--model", "m"]
    _ok(runner.invoke(main, [*args, "--out", "first"]))
    manifest = json.loads((tmp_path / "engines" / "m-fp32" / "manifest.json").read_text())
    before, graphs = manifest["fingerprint"], manifest["networks"]["decoder"]["files"]
    prior = manifest["networks"]["prior"]
    w = folder / "decoder" / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"  # weights edited in place (same size)
    w.write_bytes(bytes(data))
    res = runner.invoke(main, [*args, "--out", "o"])
    assert res.exit_code == 0, res.output
    assert "earlier version of m" in res.output and "exporting m (fp32) again" in res.output, res.output
    manifest = json.loads((tmp_path / "engines" / "m-fp32" / "manifest.json").read_text())
    assert before != manifest["fingerprint"] == fingerprint("m")
    assert manifest["networks"]["decoder"]["files"] != graphs  # the decoder's graph holds the edited weights
    assert manifest["networks"]["prior"] == prior  # a network whose weights and config didn't change is kept
    res = runner.invoke(main, [*args, "--backend", "torch", "--out", "t"])
    assert res.exit_code == 0, res.output
    a = np.asarray(Image.open(next((tmp_path / "o").glob("*.png"))), dtype=np.float64)
    b = np.asarray(Image.open(next((tmp_path / "t").glob("*.png"))), dtype=np.float64)
    assert np.abs(a - b).mean() < 1.0, np.abs(a - b).mean()  # 8-bit pixels: onnxruntime vs torch on the same weights


def test_a_touched_large_model_keeps_its_engines_and_takes_the_new_fingerprint(tmp_path, monkeypatch):
    """A folder over identity.FULL_HASH_BYTES is fingerprinted by file times: after a touch (a copy-over, a sync) the
    export finds every network's weights and config unchanged, keeps their graphs, and records the new
    fingerprint, so runs accept the engines again."""
    from unclip.core import identity
    from unclip.core.errors import ExportError
    from unclip.engine.backend import check_export
    from unclip.export.onnx_export import export_model
    from unclip.models import load_model
    monkeypatch.setattr(identity, "FULL_HASH_BYTES", 0)  # the tiny folder read as a large one
    folder = save_model(build_preset("tiny"), tmp_path / "m")
    out = tmp_path / "e"
    export_model(load_model(folder), out, source=str(folder))
    before = json.loads((out / "manifest.json").read_text())
    os.utime(folder / "decoder" / "config.json", ns=(10**18, 10**18))
    with pytest.raises(ExportError, match="earlier version"):
        check_export(before, out, str(folder), "fp32", "fix")
    reports = export_model(load_model(folder), out, source=str(folder))
    assert len(reports) == len(before["networks"]) and all(r.skipped for r in reports)
    after = json.loads((out / "manifest.json").read_text())
    assert after["networks"] == before["networks"] and after["fingerprint"] != before["fingerprint"]
    check_export(after, out, str(folder), "fp32", "fix")


def test_a_config_edit_that_keeps_the_weights_exports_that_network_again(tmp_path):
    """A network's export key holds its weights; its config is recorded beside it, so an edit that changes the graph
    but no tensor (here sr1024's GroupNorm epsilon) exports that network again, and only it. An entry exported
    before configs were recorded is kept while the folder is unchanged (and gains the record), not after an edit."""
    from unclip.export.onnx_export import export_model
    from unclip.models import load_model
    folder = save_model(build_preset("tiny"), tmp_path / "m")
    stages = ["text_proj", "sr1024"]  # two small networks: one edited, one kept
    out = tmp_path / "e"
    export_model(load_model(folder), out, stages, source=str(folder))
    before = json.loads((out / "manifest.json").read_text())
    cfg_path = folder / "sr1024" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["norm_eps"] = 0.5
    cfg_path.write_text(json.dumps(cfg))
    reports = {r.network: r.skipped for r in export_model(load_model(folder), out, stages, source=str(folder))}
    assert reports == {n: n != "sr1024" for n in before["networks"]}, reports
    after = json.loads((out / "manifest.json").read_text())
    assert after["networks"]["sr1024"]["files"] != before["networks"]["sr1024"]["files"]
    assert after["networks"]["sr1024"]["config"] != before["networks"]["sr1024"]["config"]
    # an export of other stages after an edit drops the edited network's entry (never stamped as current)
    cfg["norm_eps"] = 0.25
    cfg_path.write_text(json.dumps(cfg))
    assert export_model(load_model(folder), out, ["text_proj"], source=str(folder))[0].skipped
    assert "sr1024" not in json.loads((out / "manifest.json").read_text())["networks"]
    export_model(load_model(folder), out, stages, source=str(folder))
    after = json.loads((out / "manifest.json").read_text())
    # an entry of an older export (no config record): kept for the unchanged folder, which records it now ...
    old = {**after, "networks": {n: {k: v for k, v in e.items() if k != "config"}
                                 for n, e in after["networks"].items()}}
    (out / "manifest.json").write_text(json.dumps(old))
    assert all(r.skipped for r in export_model(load_model(folder), out, stages, source=str(folder)))
    assert json.loads((out / "manifest.json").read_text())["networks"] == after["networks"]
    # ... and exported again once the folder changed, as its config is unknown
    (out / "manifest.json").write_text(json.dumps(old))
    (folder / "prior" / "config.json").write_text((folder / "prior" / "config.json").read_text() + "\n")
    assert not any(r.skipped for r in export_model(load_model(folder), out, stages, source=str(folder)))


def test_engines_of_the_same_relative_name_elsewhere_are_refused(runner, tmp_path, monkeypatch):
    save_model(build_preset("tiny"), tmp_path / "m")
    _ok(runner.invoke(main, ["cat", *FAST, "--model", "m", "--engines", "e"]))
    (tmp_path / "sub").mkdir()
    save_model(build_preset("small"), tmp_path / "sub" / "m")  # the same relative name elsewhere
    monkeypatch.chdir(tmp_path / "sub")
    _one_line_error(runner.invoke(main, ["cat", *FAST, "--model", "m", "--engines", str(tmp_path / "e")]),
                    "holds engines of")


def test_engines_of_the_preset_are_refused_for_a_folder_named_like_it(runner, tmp_path):
    save_model(build_preset("tiny"), tmp_path / "tiny")  # a folder named like the preset
    _ok(runner.invoke(main, ["cat", *FAST, "--engines", "t"]))
    _one_line_error(runner.invoke(main, ["cat", *FAST, "--model", "./tiny", "--engines", "t"]), "holds engines of")


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


def _edit_manifest(change) -> None:
    path = Path("engines/tiny-fp32/manifest.json")
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def test_a_hand_edited_manifest_is_refused(runner):
    _ok(runner.invoke(main, ["cat", *FAST]))
    _edit_manifest(lambda m: m.update(spec="{broken"))
    _one_line_error(runner.invoke(main, ["cat", *FAST]), "model description is unreadable")


def test_a_network_missing_from_the_manifest_is_exported_again(runner):
    _ok(runner.invoke(main, ["cat", *FAST]))
    _edit_manifest(lambda m: m["networks"].pop("decoder"))
    res = _ok(runner.invoke(main, ["cat", *FAST]))
    assert "finishing the interrupted export" in res.stderr


def test_engines_of_another_precision_are_refused(runner):
    _ok(runner.invoke(main, ["cat", *FAST, "--engines", "e"]))
    _one_line_error(runner.invoke(main, ["cat", *FAST, "--engines", "e", "--precision", "fp16"]),
                    "holds fp32 engines, not fp16")


def test_a_swapped_graph_names_the_network(runner):
    _ok(runner.invoke(main, ["cat", *FAST]))
    e = Path("engines/tiny-fp32")
    m = json.loads((e / "manifest.json").read_text())
    m["networks"]["prior"]["files"] = m["networks"]["decoder"]["files"]  # prior's entry points at decoder.onnx
    (e / "manifest.json").write_text(json.dumps(m))
    _one_line_error(runner.invoke(main, ["cat", *FAST]), "are not those of prior")


def test_stale_export_temporaries_are_cleaned(runner):
    _ok(runner.invoke(main, ["cat", *FAST]))
    stale = Path("engines/tiny-fp32/.decoder.abc123")
    stale.mkdir()
    (stale / "decoder.onnx").write_bytes(b"x" * 100)
    _ok(runner.invoke(export_main, ["--model", "tiny", "--out", "engines/tiny-fp32", "--stage", "prior", "--force"]))
    assert not stale.exists()


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


def test_a_fix_message_names_force_once_for_another_models_engines(runner, tmp_path):
    _ok(runner.invoke(main, ["cat", *FAST, "--engines", "e"]))
    save_model(build_preset("tiny"), tmp_path / "other")
    res = runner.invoke(main, ["cat", *FAST, "--model", str(tmp_path / "other"), "--engines", "e"])
    assert res.exit_code == 1 and res.output.count("--force") == 1, res.output
    _one_line_error(res, "holds engines of 'tiny'")


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


def test_a_run_waiting_on_another_export_loads_the_model_once(tmp_path, monkeypatch):
    """While another live process holds the export lock, ensure_export looks at the lock every second without
    loading the model (gigabytes for Karlo) or repeating its messages; once the lock is gone it loads the model
    once and exports."""
    from types import SimpleNamespace

    from unclip import models
    from unclip.engine import backend
    from unclip.export import onnx_export
    out = tmp_path / "e"
    out.mkdir()
    lock = out / ".export.lock"
    lock.write_text(str(os.getppid()))  # a live process other than this one
    loads, tries, sleeps = [], [], []
    real = models.resolve_model
    monkeypatch.setattr(models, "resolve_model", lambda m: loads.append(m) or real(m))
    monkeypatch.setattr(onnx_export, "export_model", lambda model, out, **kw: tries.append(out))

    def sleep(s):
        sleeps.append(s)
        if len(sleeps) == 3:
            lock.unlink()  # the other export finished (without writing engines: this run exports)

    monkeypatch.setattr(time, "sleep", sleep)
    told = []
    req = SimpleNamespace(backend="onnxruntime", model="tiny", engines=str(out), device="cpu", precision="fp32",
                          max_batch=1)
    backend.ensure_export(req, out, told.append)
    assert len(sleeps) == 3 and loads == ["tiny"] and tries == [out]
    assert len(told) == 2 and "another export is writing" in told[0] and "exporting tiny (fp32) first" in told[1], told


def test_an_export_never_writes_over_a_users_files(runner, tmp_path):
    """A folder without this tool's manifest that holds files is a user's: unclip-export and unclip-run's
    auto-export refuse it (the files untouched) unless --force says to export into it anyway."""
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "manifest.json").write_text('{"mine": true}')
    (tmp_path / "e" / "text_encoder.onnx").write_text("keep")
    res = runner.invoke(export_main, ["--model", "tiny", "--out", "e", "--stage", "text_encoder"])
    _one_line_error(res, "e holds files that are not engines of this tool (manifest.json, text_encoder.onnx)")
    assert (tmp_path / "e" / "text_encoder.onnx").read_text() == "keep"
    assert (tmp_path / "e" / "manifest.json").read_text() == '{"mine": true}'
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "decoder.onnx").write_text("keep")
    _one_line_error(runner.invoke(main, ["cat", *FAST, "--engines", "r"]), "r holds files that are not engines")
    assert (tmp_path / "r" / "decoder.onnx").read_text() == "keep"
    _one_line_error(runner.invoke(export_main, ["--model", "tiny", "--out", ""]), "--out needs a folder name")
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "manifest.json").write_text("[]")  # JSON, but no manifest
    _one_line_error(runner.invoke(export_main, ["--model", "tiny", "--out", "j"]), "j holds files that are not engines")
    _ok(runner.invoke(export_main, ["--model", "tiny", "--out", "e", "--stage", "text_encoder", "--force"]))
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["networks"].keys() == {"text_encoder"}
