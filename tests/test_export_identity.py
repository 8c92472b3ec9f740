"""The right engines for the right model (issue 11 item 5, and the export's own records): engines of a model edited
in place, copied, touched or reconfigured; of another folder, precision or model; a hand-edited, incomplete or
swapped manifest; a folder of a user's files; an export another process is writing. Split from test_hardening.py."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from faults import FAST, _ok, _one_line_error
from PIL import Image
from unclip.engine.cli import main
from unclip.export.cli import main as export_main
from unclip.models import build_preset, save_model


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return CliRunner()


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


def test_a_fix_message_names_force_once_for_another_models_engines(runner, tmp_path):
    _ok(runner.invoke(main, ["cat", *FAST, "--engines", "e"]))
    save_model(build_preset("tiny"), tmp_path / "other")
    res = runner.invoke(main, ["cat", *FAST, "--model", str(tmp_path / "other"), "--engines", "e"])
    assert res.exit_code == 1 and res.output.count("--force") == 1, res.output
    _one_line_error(res, "holds engines of 'tiny'")


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
