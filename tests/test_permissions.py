"""Permission faults (issue 11 items 6, 7 and 13): a read-only working directory, and files or folders of another
user's; each case injected at the call and, where this machine can deny it, for real in a subprocess."""
from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from faults import EXE, FAST, _one_line_error, _one_line_error_of_process
from unclip.engine.cli import main
from unclip.export.cli import main as export_main
from unclip.models import build_preset, save_model


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return CliRunner()


# a read-only working directory, and files or folders of another user's (issue items 6, 7 and 13) ------------------
#
# Each case runs twice: with the denial injected at the call (everywhere), and for real in a subprocess where this
# machine can deny it (an ordinary user: mode 000; root: setpriv without the capabilities that let root ignore modes).

ELSEWHERE = "{elsewhere}"  # replaced by a writable folder outside the read-only working directory
READ_ONLY_CWD_CASES = {
    "run (engines in it)": (["unclip-run", "cat", *FAST, "--out", ELSEWHERE], "cannot write the export"),
    "unclip-export --out": (["unclip-export", "--model", "tiny", "--out", "e"], "cannot write the export"),
    "run --dump": (["unclip-run", "cat", *FAST, "--backend", "torch", "--out", ELSEWHERE, "--dump", "d"],
                   "--dump d: cannot write there"),
}


def _deny_creating_in_cwd(monkeypatch):
    """Creating anything directly in the working directory raises PermissionError, as in a folder of another user's
    (os.mkdir and os.open with O_CREAT are the calls every folder and file creation goes through)."""
    cwd, real_mkdir, real_open = os.getcwd(), os.mkdir, os.open

    def denied(path, dir_fd=None) -> bool:
        path = os.fsdecode(path)
        return dir_fd is None and os.path.dirname(os.path.abspath(path)) == cwd and not os.path.lexists(path)

    def mkdir(path, *a, **kw):
        if denied(path, kw.get("dir_fd")):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real_mkdir(path, *a, **kw)

    def open_(path, flags, *a, **kw):
        if flags & os.O_CREAT and denied(path, kw.get("dir_fd")):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)


@pytest.mark.parametrize("case", list(READ_ONLY_CWD_CASES))
def test_a_read_only_working_directory_injected(tmp_path, monkeypatch, case):
    cmd, message = READ_ONLY_CWD_CASES[case]
    (tmp_path / "ro").mkdir()
    monkeypatch.chdir(tmp_path / "ro")
    _deny_creating_in_cwd(monkeypatch)
    args = [a.replace(ELSEWHERE, str(tmp_path / "out")) for a in cmd[1:]]
    res = CliRunner().invoke(main if cmd[0] == "unclip-run" else export_main, args)
    _one_line_error(res, message)
    assert "Permission denied" in res.output


@pytest.fixture(scope="module")
def as_another_user(tmp_path_factory) -> list[str]:
    """A command prefix under which mode 000 files and mode 555 folders really deny access: none for an ordinary
    user; for root, setpriv without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH. Skips where neither is possible."""
    if os.geteuid() != 0:
        return []
    caps = "-dac_override,-dac_read_search"
    prefix = ["setpriv", "--bounding-set", caps, "--inh-caps", caps]
    probe = tmp_path_factory.mktemp("probe") / "f"
    probe.write_text("x")
    probe.chmod(0)
    try:
        denied = subprocess.run([*prefix, "cat", str(probe)], capture_output=True, timeout=60).returncode != 0
    except (OSError, subprocess.SubprocessError):
        denied = False
    if not denied:
        pytest.skip("running as root, and setpriv cannot drop root's permission override here")
    return prefix


@pytest.mark.parametrize("case", list(READ_ONLY_CWD_CASES))
def test_a_read_only_working_directory_for_real(tmp_path, as_another_user, case):
    cmd, message = READ_ONLY_CWD_CASES[case]
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    args = [a.replace(ELSEWHERE, str(tmp_path / "out")) for a in cmd[1:]]
    res = subprocess.run([*as_another_user, str(EXE / cmd[0]), *args], cwd=ro, capture_output=True, text=True,
                         timeout=300)
    _one_line_error_of_process(res, message)
    assert "Permission denied" in res.stderr and not list(ro.iterdir())


@pytest.fixture(scope="module")
def tiny_engines(tmp_path_factory) -> Path:
    """Engines of the tiny preset, exported once; tests copy them."""
    out = tmp_path_factory.mktemp("tiny_engines") / "e"
    res = CliRunner().invoke(export_main, ["--model", "tiny", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


UNREADABLE = ("model weights", "engines manifest", "engines graph")


def _unreadable_case(what: str, tmp_path: Path, tiny_engines: Path) -> tuple[list[str], Path]:
    """The arguments of a run and the file it must read that another user's folder may deny."""
    if what == "model weights":  # save_model wrote these 0600 before issue 11
        folder = save_model(build_preset("tiny"), tmp_path / "m")
        return ["cat", *FAST, "--model", "m", "--backend", "torch"], folder / "decoder" / \
            "diffusion_pytorch_model.safetensors"
    shutil.copytree(tiny_engines, tmp_path / "e")
    return ["cat", *FAST, "--engines", "e"], tmp_path / "e" / ("manifest.json" if what == "engines manifest" else
                                                                 "prior.onnx")


def _deny_reading(monkeypatch, path: Path):
    """Reading `path` fails as it does for another user's file of mode 0600: open() raises PermissionError, and
    safetensors' safe_open raises what it raises then (checked with safetensors 0.8 under a real denial):
    FileNotFoundError("No such file or directory: ...")."""
    import safetensors
    target = os.path.abspath(path)
    real_open, real_safe_open = builtins.open, safetensors.safe_open

    def denied(f) -> bool:
        return isinstance(f, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(f)) == target

    def open_(file, *a, **kw):
        if denied(file):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(file))
        return real_open(file, *a, **kw)

    def safe_open(filename, *a, **kw):
        if denied(filename):
            raise FileNotFoundError(f"No such file or directory: {filename}")
        return real_safe_open(filename, *a, **kw)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)  # pathlib's read_text / read_bytes
    monkeypatch.setattr(safetensors, "safe_open", safe_open)


@pytest.mark.parametrize("what", UNREADABLE)
def test_an_unreadable_file_is_a_permission_problem_injected(runner, tmp_path, monkeypatch, tiny_engines, what):
    args, path = _unreadable_case(what, tmp_path, tiny_engines)
    _deny_reading(monkeypatch, path)
    res = runner.invoke(main, args)
    _one_line_error(res, "permission denied")
    assert "truncated or corrupt" not in res.output


@pytest.mark.parametrize("what", [*UNREADABLE, "model subfolder", "model subfolder, unclip-export"])
def test_an_unreadable_file_is_a_permission_problem_for_real(tmp_path, as_another_user, tiny_engines, what):
    if what.startswith("model subfolder"):  # save_model made folders 0700 before issue 11
        folder = save_model(build_preset("tiny"), tmp_path / "m")
        path = folder / "decoder"
        args = ["unclip-export", "--model", "m", "--out", "e2"] if "export" in what else \
            ["unclip-run", "cat", *FAST, "--model", "m", "--backend", "torch"]
    else:
        run_args, path = _unreadable_case(what, tmp_path, tiny_engines)
        args = ["unclip-run", *run_args]
    mode = path.stat().st_mode & 0o777
    path.chmod(0)
    try:
        res = subprocess.run([*as_another_user, str(EXE / args[0]), *args[1:]], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    finally:
        path.chmod(mode)
    _one_line_error_of_process(res, "permission denied")
    assert "truncated or corrupt" not in res.stderr
