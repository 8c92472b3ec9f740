"""What the fault tests share (tests/test_hardening.py, tests/test_permissions.py, tests/test_train*.py): the fast
CLI options, the one-line-error checks for click's runner and for real subprocesses, unclip-run started as a real
process, and a training step that raises (Ctrl-C or a failure) at a chosen point."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

FAST = ["--model", "tiny", "--prior-steps", "2", "--decoder-steps", "2", "--sr256-steps", "2", "--size", "64"]
EXE = Path(sys.executable).parent


def _ok(res):
    assert res.exit_code == 0, res.output
    return res


def _one_line_error(res, message):
    assert res.exit_code == 1, res.output
    assert message in res.output, res.output
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)


def _one_line_error_of_process(res, message):
    """The same for a real subprocess (its stderr)."""
    assert res.returncode == 1, (res.returncode, res.stderr[-3000:])
    assert message in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]


def _run(args, cwd, **kw):
    return subprocess.run([str(EXE / "unclip-run"), *args], cwd=cwd, capture_output=True, text=True, **kw)


def _popen(args, cwd, **kw):
    """unclip-run started to be signalled, so that SIGINT is a KeyboardInterrupt in it as under Ctrl-C even where the
    test runner ignores SIGINT (a background job of a shell): an ignored signal stays ignored across exec, a handled
    one starts at its default."""
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([str(EXE / "unclip-run"), *args], cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, **kw)
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def interrupt_training(monkeypatch, stage: str, call: int | None, error=KeyboardInterrupt):
    """`stage`'s training step number `call` (1-based) raises `error` after drawing its batch (the data generators
    moved on) and before the optimiser step, so a checkpoint must hold the step before; None: building the stage
    raises. The held-out loss (no grad) does not count as a step."""
    import torch
    from unclip.demo import stages as st
    real_build, calls = st.build, []

    def build(name, ctx):
        if name == stage and call is None:
            raise error
        s = real_build(name, ctx)
        if name == stage:
            real_loss = s.loss

            def loss():
                out = real_loss()
                if torch.is_grad_enabled():
                    calls.append(1)
                    if len(calls) == call:
                        raise error
                return out
            s.loss = loss
        return s

    monkeypatch.setattr(st, "build", build)
