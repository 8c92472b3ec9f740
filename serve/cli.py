"""`unclip-serve`: parse options into a ServeConfig, start a local Ray (or join a cluster), run the application and
serve until Ctrl-C; then shut Serve (and a Ray it started) down."""
from __future__ import annotations

import logging
import os
import signal
import time

import click
from unclip.core.console import warnings_to_stderr
from unclip.core.errors import UnclipError
from unclip.engine.backend import BACKENDS
from unclip.engine.request import TORCH_MODES
from unclip.serve.config import (
    STAGES,
    ServeConfig,
    StageOptions,
    model_stages,
    quiet_ray_env,
)

C, O = ServeConfig(), StageOptions()


def _per_stage(values: tuple[str, ...], flag: str, kind: type) -> dict[str, object]:
    """('decoder=2', 'sr1024=0.5') -> {'decoder': 2, 'sr1024': 0.5}; 'all=N' sets every stage."""
    out = {}
    for v in values:
        stage, _, number = v.partition("=")
        if stage not in (*STAGES, "all") or not number:
            raise click.BadParameter(f"{v!r}: write STAGE=N with STAGE one of {', '.join(STAGES)} or all", param_hint=flag)
        try:
            n = kind(number)
        except ValueError:
            raise click.BadParameter(f"{v!r}: {number!r} is not a number", param_hint=flag) from None
        out.update({s: n for s in STAGES} if stage == "all" else {stage: n})
    return out


def _check_port(host: str, port: int, flag: str) -> None:
    import socket
    if not 1 <= port <= 65535:
        raise UnclipError(f"{flag} {port} is not a TCP port (1 ... 65535)")
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UnclipError(f"{flag} {port}: can't listen on {host}:{port} ({e.strerror}); choose another "
                              f"{flag}") from None


def _stop(signum, frame):
    raise KeyboardInterrupt


def _cores_warning(cfg: ServeConfig, local: bool) -> str | None:
    """--cores that can't do what it says: ignored under --shared-compute; on this machine, more cores than this
    process may use (lanes past them only take turns on the same cores). A cluster's machines are not counted."""
    if cfg.cores is None:
        return None
    if not cfg.node_lock:
        return f"--cores {cfg.cores} has no effect with shared compute (--shared-compute, the default on cuda: the " \
               "stages compute at once); leave it out, or add --exclusive-compute"
    have = len(os.sched_getaffinity(0))
    if local and cfg.cores > have:
        return f"--cores {cfg.cores} is more than the {have} cores this process may use: the lanes past {have} " \
               f"only take turns on the same cores; pass --cores {have} or leave it out"
    return None


def _check_gpus(stages: dict) -> None:
    """On this machine (no --address), Ray never places a replica that asks for more GPUs than there are: the service
    would wait for it forever. Refused here instead, naming the numbers."""
    import torch
    have = torch.cuda.device_count()
    need = sum(o.replicas * o.num_gpus for o in stages.values())
    if need > have + 1e-9:
        raise UnclipError(f"the stages' replicas ask for {need:g} GPUs in all and this machine has {have}; lower "
                          "--num-gpus (fractions share one GPU, e.g. all=0.25) or --replicas, or serve on a Ray "
                          "cluster with --address")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", default=C.model, help="model folder, or built in: demo (trained), tiny, small (random)")
@click.option("--backend", type=click.Choice(BACKENDS), default=C.backend)
@click.option("--engines", default=None, help="export folder [default: engines/<model>-<precision>]")
@click.option("--device", default=C.device, help="cpu, or cuda (each replica's own GPU: give stages --num-gpus)")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=C.precision)
@click.option("--max-batch", type=int, default=C.max_batch, help="images per engine call when exporting engines")
@click.option("--torch-mode", type=click.Choice(TORCH_MODES), default=C.torch_mode)
@click.option("--host", default="127.0.0.1", help="address the HTTP server listens on (0.0.0.0: every interface)")
@click.option("--port", type=int, default=8000)
@click.option("--address", default=None, help="a Ray cluster to join (auto, or HOST:6379); default: a local Ray")
@click.option("--metrics-port", type=int, default=8080, help="Ray's Prometheus endpoint (a local Ray only)")
@click.option("--replicas", multiple=True, metavar="STAGE=N", help=f"replicas of a stage [default: {O.replicas}]")
@click.option("--num-cpus", multiple=True, metavar="STAGE=X", help=f"CPUs per replica [default: {O.num_cpus}]")
@click.option("--num-gpus", multiple=True, metavar="STAGE=X", help=f"GPUs per replica, fractions share one "
              f"[default: {O.num_gpus}]")
@click.option("--batch-wait-ms", type=float, default=C.batch_wait_s * 1000, help="how long an idle stage waits "
              "for other requests to batch with")
@click.option("--max-images", type=int, default=C.max_images, help="images per request")
@click.option("--max-prompt-chars", type=int, default=C.max_prompt_chars)
@click.option("--max-steps", type=int, default=C.max_steps, help="steps per stage")
@click.option("--max-upload-bytes", type=int, default=C.max_upload_bytes)
@click.option("--exclusive-compute/--shared-compute", default=None, help="the stages on one machine share its cores "
              "(a core per lane, jobs wait for a free one) instead of all computing at once [default: exclusive on "
              "cpu, shared on cuda]")
@click.option("--cores", type=int, default=None, help="cores the stages share with --exclusive-compute [default: "
              "those this process may use]")
@click.option("--timeout-s", type=float, default=C.timeout_s, help="cancel requests running longer (504)")
def main(host, port, address, metrics_port, replicas, num_cpus, num_gpus, batch_wait_ms, **opts):
    """Serve unCLIP over HTTP on Ray Serve: POST /v1/images, POST /v1/variations, GET /healthz, docs at /docs."""
    warnings_to_stderr()
    per_stage = {"replicas": _per_stage(replicas, "--replicas", int),
                 "num_cpus": _per_stage(num_cpus, "--num-cpus", float),
                 "num_gpus": _per_stage(num_gpus, "--num-gpus", float)}
    stages = {s: StageOptions(**{k: v[s] for k, v in per_stage.items() if s in v}) for s in STAGES}
    try:
        cfg = ServeConfig(batch_wait_s=batch_wait_ms / 1000, stages=stages, **opts)
        for s in model_stages(cfg.model):  # (a `serve run` config gives GPUs in its deployments: section instead)
            if cfg.device.startswith("cuda") and cfg.stages[s].num_gpus == 0:
                raise UnclipError(f"--device {cfg.device} needs a GPU for every stage's replicas, and stage {s} "
                                  f"asks for none: give it --num-gpus {s}=1 (or a fraction, e.g. all=0.25)")
        if warning := _cores_warning(cfg, address is None):
            logging.getLogger("unclip").warning(warning)
        if address is None:  # this machine's GPUs (a cluster's are Ray's to count)
            _check_gpus({s: cfg.stages[s] for s in model_stages(cfg.model)})
        _check_port(host, port, "--port")
        if address is None:
            _check_port("127.0.0.1", metrics_port, "--metrics-port")
            from unclip.engine.backend import open_backend
            # the model and engines are checked (and exported, once) here, not in four replicas' logs
            open_backend(cfg.backend_request(), lambda m: click.echo(m, err=True))
    except UnclipError as e:
        raise click.ClickException(str(e)) from None
    import ray
    from ray import serve
    from unclip.serve.app import build_app
    local = address is None
    if local:
        quiet_ray_env()
    ray.init(address=address, **({"_metrics_export_port": metrics_port} if local else {}))
    # after ray.init, which installs its own (aborting) handler: `kill` and service managers stop the service as
    # Ctrl-C does, shutting Ray down
    signal.signal(signal.SIGTERM, _stop)
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(build_app(cfg), name="unclip", route_prefix="/")
        except RuntimeError as e:  # a replica failed to start: Ray's message names the deployment
            raise click.ClickException(f"the service did not start: {str(e).splitlines()[0][:300]} (the replicas' "
                                       "logs are under /tmp/ray/session_latest/logs/serve)") from None
        click.echo(f"serving {cfg.model} ({cfg.backend}) on http://{host}:{port} (docs: /docs)"
                   + (f"; metrics on http://127.0.0.1:{metrics_port}/metrics" if local else ""), err=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("shutting down", err=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not leave Ray's processes behind
            signal.signal(sig, signal.SIG_IGN)
        if local:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete("unclip")  # the cluster's Serve and its other applications stay


if __name__ == "__main__":
    main()
