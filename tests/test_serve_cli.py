"""`unclip-serve` as a user runs it: bad options are one line and exit 2 before Ray starts; the README's command
serves the tiny model (health, an image equal to the Python API's), and SIGTERM or Ctrl-C shuts Ray down leaving
no process behind. The config file for `serve run` builds the application."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from click.testing import CliRunner
from refs import descendants, free_port
from unclip.engine.backend_torch import TorchBackend
from unclip.engine.pipeline import Settings, generate
from unclip.models import build_preset
from unclip.serve.cli import main

EXE = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("args,words", [
    (["--replicas", "encoder=2"], "'encoder=2': write STAGE=N with STAGE one of prior, decoder, sr256, sr1024 or all"),
    (["--num-gpus", "decoder=half"], "'half' is not a number"),
    (["--port", "0"], "--port 0 is not a TCP port"),
    (["--max-images", "0"], "--max-images must be at least 1, got 0"),
    (["--batch-wait-ms", "nan"], "--batch-wait-ms must be a finite number >= 0"),
    (["--timeout-s", "0"], "--timeout-s must be a finite number of seconds > 0"),
    (["--device", "cuda"], "--device cuda needs a GPU for every stage's replicas, and stage prior asks for none"),
    (["--model", "/no/such/model"], "/no/such/model"),
    # more GPUs than the machine has: Ray would wait for them forever
    (["--num-gpus", "all=64"], "the stages' replicas ask for 256 GPUs in all and this machine has"),
])
def test_bad_options_are_one_line_before_ray_starts(args, words, tmp_path):
    r = CliRunner().invoke(main, ["--model", "tiny", "--engines", str(tmp_path / "e"), *args])
    assert r.exit_code != 0 and words in r.output, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit), r.output


@pytest.mark.parametrize("args,warning", [
    (["--cores", "1"], None),
    (["--cores", str(len(os.sched_getaffinity(0)) + 7)], f"warning: --cores {len(os.sched_getaffinity(0)) + 7} is "
     f"more than the {len(os.sched_getaffinity(0))} cores this process may use: the lanes past "
     f"{len(os.sched_getaffinity(0))} only take turns on the same cores; pass --cores {len(os.sched_getaffinity(0))} "
     "or leave it out"),
    (["--cores", "99", "--address", "10.0.0.1:6379"], None),  # a cluster's cores are not this machine's
    (["--cores", "1", "--shared-compute"], "warning: --cores 1 has no effect with shared compute"),
])
def test_cores_that_cannot_take_effect_are_named(args, warning, tmp_path):
    """Warned before Ray starts (here the bad --port stops the command right after the warning)."""
    r = CliRunner().invoke(main, ["--model", "tiny", "--engines", str(tmp_path / "e"), *args, "--port", "0"])
    assert r.exit_code == 1 and "--port 0 is not a TCP port" in r.output, r.output
    if warning is None:
        assert "warning:" not in r.output, r.output
    else:
        assert r.output.count("warning:") == 1 and warning in r.output, r.output


def test_a_port_in_use_is_named(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = CliRunner().invoke(main, ["--model", "tiny", "--port", str(port)])
    assert r.exit_code == 1 and f"--port {port}: can't listen on 127.0.0.1:{port}" in r.output, r.output


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("stop", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_the_readme_command_serves_and_stops_cleanly(tmp_path, stop):
    port, metrics = free_port(), free_port()
    p = subprocess.Popen([str(EXE / "unclip-serve"), "--model", "tiny", "--backend", "torch", "--port", str(port),
                          "--metrics-port", str(metrics)], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        deadline, health = time.monotonic() + 240, None
        while time.monotonic() < deadline and p.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
                    health = json.loads(r.read())
                    break
            except OSError:  # not listening yet, or the application not deployed yet
                time.sleep(1)
        assert health is not None and health["status"] == "ok", (p.poll(), health)
        body = {"prompt": "a red circle", "seed": 3, "size": 16, "steps": {"prior": 3, "decoder": 3}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/images", json.dumps(body).encode(),
                                     {"Content-Type": "application/json", "Accept": "image/png"})
        with urllib.request.urlopen(req, timeout=120) as r:
            from PIL import Image
            got = torch.from_numpy(np.array(Image.open(io.BytesIO(r.read())).convert("RGB")))
        b = TorchBackend(build_preset("tiny"))
        want = generate(b, b.spec, "a red circle", Settings(seed=3, size=16, prior_steps=3, decoder_steps=3)).images[0]
        assert torch.equal(got, want)
        ray_procs = descendants(p.pid)
        assert ray_procs, "no Ray processes under unclip-serve"
    finally:
        p.send_signal(stop)
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
    at = err.find("Traceback")  # on failure show the traceback's whole text (whose code it is), else the tail
    assert p.returncode == 0 and "shutting down" in err and at < 0, err[max(0, at - 300):at + 4000] if at >= 0 \
        else err[-2000:]
    deadline = time.monotonic() + 60
    while (left := {q for q in ray_procs if _alive(q)}) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind: {sorted(left)}"


def test_the_cluster_config_builds_the_application():
    yaml = pytest.importorskip("yaml")
    from unclip.serve.app import app_builder
    from unclip.serve.config import STAGES
    conf = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    (app,) = conf["applications"]
    assert app["import_path"] == "unclip.serve.app:app_builder"
    assert {d["name"] for d in app["deployments"]} <= {*STAGES, "api"}
    assert type(app_builder(app["args"])).__name__ == "Application"
    with pytest.raises(Exception, match="unknown argument 'modle'"):
        app_builder({**app["args"], "modle": "demo"})
