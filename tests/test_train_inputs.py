"""`unclip-train`'s bad input: every option, the model folder and the stages' order are checked before anything is
written (one line, a non-zero exit, no traceback, nothing left behind), a folder of other files is never written
over, a start that kept nothing takes back what it wrote, and Ctrl-C says where training stopped."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from faults import interrupt_training
from unclip.demo import train as tr


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _invoke(tmp_path, *args):
    """unclip-train in tmp_path (the default --out is tmp_path/m); returns (exit code, stderr lines, stdout)."""
    args = list(args)
    if "--out" not in args:
        args = ["--out", str(tmp_path / "m")] + args
    res = CliRunner().invoke(tr.main, ["--config", "smoke"] + args)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    return res.exit_code, res.stderr.splitlines(), res.stdout


def _refused(tmp_path, *args) -> str:
    before = _files(tmp_path)
    code, err, out = _invoke(tmp_path, *args)
    assert code == 1 and len(err) == 1 and err[0].startswith("Error: ") and out == "", (code, err, out)
    assert _files(tmp_path) == before  # nothing written, nothing left behind
    return err[0]


@pytest.mark.parametrize("args, message", [
    (["--device", "mps"], "--device mps: choose cpu, cuda or cuda:N"),
    (["--device", "foo"], "--device foo: choose cpu, cuda or cuda:N"),
    (["--device", "cpu:1"], "--device cpu:1: choose cpu, cuda or cuda:N"),
    (["--threads", "-1"], "--threads must be in 0 ... 1024"),
    (["--threads", "100000000000"], "--threads must be in 0 ... 1024"),
    (["--seed", "-1"], f"--seed must be an integer in 0 ... {tr.MAX_SEED}, got -1"),
    (["--seed", "99999999999999999999999"], "got 99999999999999999999999"),
    (["--seed", str(tr.MAX_SEED + 1)], "--seed must be an integer in 0 ..."),
    (["--checkpoints", "{tmp}/afile"], "is a file; give a folder"),
    (["--out", "{tmp}/afile"], "--out {tmp}/afile is a file; choose a new or empty folder"),
    (["--out", ""], "--out needs a folder name"),
    (["--out", "{tmp}"], "--out {tmp} is a folder of other files (afile)"),  # a folder whose name ends the path
    (["--out", "{tmp}/m", "--stage", "prior"], "--stage prior reads the clip stage, which {tmp}/m does not have yet: "
     "train clip first (unclip-train --out {tmp}/m --config smoke --stage clip), or every stage"),
    (["--stage", "decoder", "--stage", "sr256", "--seed", "3"], "train clip first (unclip-train --out {tmp}/m "
     "--config smoke --seed 3 --stage clip)"),
])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, args, message):
    (tmp_path / "afile").write_text("mine\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert message.replace("{tmp}", str(tmp_path)) in _refused(tmp_path, *args)


def test_cuda_devices_are_checked(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        assert "--device cuda: torch sees no CUDA GPU here; use --device cpu" in _refused(tmp_path, "--device", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert "--device cuda:2: torch sees 2 CUDA GPUs here; choose cuda:0 or cuda:1" in \
        _refused(tmp_path, "--device", "cuda:2")


def test_a_folder_of_other_files_is_never_written_over(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "model_index.json").write_text('{"user": 1}\n')
    (d / "generation_config.json").write_text("notes\n")
    line = _refused(tmp_path, "--out", str(d), "--stage", "clip")
    assert "is a folder of other files (generation_config.json, model_index.json), not a model folder of " \
           "unclip-train; choose an empty or new --out" in line
    assert (d / "model_index.json").read_text() == '{"user": 1}\n' and (d / "generation_config.json").read_text() \
        == "notes\n"
    (d / "training.json").write_text("notes, not JSON\n")
    assert "training.json is not a training record of unclip-train; choose an empty or new --out" in \
        _refused(tmp_path, "--out", str(d))
    (d / "training.json").write_text("[1, 2]\n")
    assert "is not a training record" in _refused(tmp_path, "--out", str(d))


def test_an_empty_folder_or_one_an_interrupted_start_left_is_taken(tmp_path):
    """An empty folder, one with dot-files only (.git, .DS_Store) or what a first run stopped before training.json
    was in place leaves, passes the folder check (here the run then stops at --stage prior's missing clip)."""
    for name, files in (("empty", []), ("dots", [".DS_Store", ".git/HEAD"]), ("tmp", ["training.json.tmp"])):
        d = tmp_path / name
        d.mkdir()
        for f in files:
            (d / f).parent.mkdir(parents=True, exist_ok=True)
            (d / f).write_text("x")
        assert "--stage prior reads the clip stage" in _refused(tmp_path, "--out", str(d), "--stage", "prior")


def test_a_checkpoint_without_its_model_folder_is_not_continued(tmp_path):
    (tmp_path / "m.ckpt").mkdir()
    (tmp_path / "m.ckpt" / "clip.pt").write_bytes(b"an earlier run's")
    line = _refused(tmp_path)
    assert f"{tmp_path}/m.ckpt/clip.pt is a checkpoint of an earlier run, but --out holds no training to continue; " \
           f"delete {tmp_path}/m.ckpt to start afresh" in line


def test_a_recorded_stage_whose_folder_is_gone_is_named(tmp_path):
    from unclip.demo.config import CONFIGS
    m = tmp_path / "m"
    m.mkdir()
    record = {"config": CONFIGS["smoke"].to_dict(), "seed": 0, "stages": {"clip": {}}}
    (m / "training.json").write_text(json.dumps(record))
    assert f"{m}/text_encoder is missing, though training.json records the clip stage as trained" in \
        _refused(tmp_path, "--stage", "prior")


def test_ctrl_c_checkpoints_the_running_stage_and_says_so(tmp_path, monkeypatch):
    interrupt_training(monkeypatch, "clip", 3)
    code, err, out = _invoke(tmp_path, "--stage", "clip")
    ckpt = tmp_path / "m.ckpt" / "clip.pt"
    assert code == 130 and out == "" and "Aborted!" not in err[-1], (code, err)
    assert err[-1] == f"interrupted: clip stopped at step 2/30, checkpointed in {ckpt}; run the same command to " \
                      "continue from there"
    assert torch.load(ckpt, weights_only=False)["step"] == 2 and (tmp_path / "m" / "training.json").is_file()


def test_a_kill_during_a_step_checkpoints_it_whole(tmp_path):
    """SIGTERM (`kill`, a service manager) during clip's 5th optimiser step: held until the step is done, then the
    same path as Ctrl-C (the checkpoint holds step 5, exit 130); the test process's own SIGTERM handler is put back."""
    import os
    import signal

    from torch.optim.optimizer import register_optimizer_step_post_hook
    steps: list[int] = []

    def kill_on_the_5th_step(*_):
        steps.append(1)
        if len(steps) == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    hook = register_optimizer_step_post_hook(kill_on_the_5th_step)
    try:
        code, err, out = _invoke(tmp_path, "--stage", "clip")
    finally:
        hook.remove()
    ckpt = tmp_path / "m.ckpt" / "clip.pt"
    assert code == 130 and err[-1].startswith(f"interrupted: clip stopped at step 5/30, checkpointed in {ckpt}"), err
    assert torch.load(ckpt, weights_only=False)["step"] == 5
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("call, error, last", [
    (1, KeyboardInterrupt, "interrupted before clip's first step finished, so there was nothing of it to keep; run "
                           "the same command to start it again"),
    (None, KeyboardInterrupt, "interrupted before training started; nothing was kept: run the same command to "
                              "start"),
    (None, RuntimeError, None),
])
def test_a_start_that_kept_nothing_leaves_nothing(tmp_path, monkeypatch, call, error, last):
    """Stopped or failed before a step finished: the run takes back what it wrote, so a later run with another seed
    is not refused as a folder of another seed."""
    interrupt_training(monkeypatch, "clip", call, error)
    res = CliRunner().invoke(tr.main, ["--out", str(tmp_path / "m"), "--config", "smoke", "--stage", "clip"])
    if last is None:
        assert isinstance(res.exception, RuntimeError)
    else:
        assert res.exit_code == 130 and res.stderr.splitlines()[-1] == last.replace("{tmp}", str(tmp_path))
    assert _files(tmp_path) == []
    monkeypatch.undo()
    assert "--stage prior reads the clip stage" in _refused(tmp_path, "--seed", "5", "--stage", "prior")
