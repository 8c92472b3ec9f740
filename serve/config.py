"""The service's settings: which model and backend every stage opens, the batching wait, the request caps, and each
stage deployment's replicas and resources. Checked once, here; each error names its command-line flag."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from unclip.core.errors import RequestError
from unclip.engine.request import check_backend_choice

STAGES = ("prior", "decoder", "sr256", "sr1024")
# Ray Serve's bookkeeping, slower than its defaults (0.1 s each): on a 2-core machine an idle local service took 18%
# of a core with the defaults and 11% with these (measured 2026-11-26). Set before ray.init starts a local cluster
# (its processes inherit them); the environment's own values win.
RAY_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1.0", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"}


def model_stages(model: str) -> tuple[str, ...]:
    """The stage deployments a model needs: all but sr1024 where it has no second upsampler (Karlo's folders: an
    sr1024 replica would hold resources, a GPU on a cluster, and never run). Found as load_model finds the stage, by
    its folder; the built-in presets all have it."""
    from pathlib import Path

    from unclip.core.identity import RANDOM_PRESETS, demo_folder
    if model in RANDOM_PRESETS:
        return STAGES
    root = demo_folder() if model == "demo" else Path(model)
    return STAGES if (root / "sr1024").is_dir() else STAGES[:-1]


def quiet_ray_env() -> None:
    import os
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)  # one deployment each; prior holds text_encoder (+ image_encoder)


@dataclass(frozen=True)
class StageOptions:
    """One stage deployment: replicas and what each replica reserves (fractional GPUs share a card)."""
    replicas: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    max_ongoing_requests: int = 32  # jobs a replica holds: one batch running, the next ones queued

    def ray_options(self) -> dict:
        """Keyword arguments of Deployment.options."""
        return {"num_replicas": self.replicas, "max_ongoing_requests": self.max_ongoing_requests,
                "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}}


@dataclass(frozen=True)
class ServeConfig:
    model: str = "demo"
    backend: str = "onnxruntime"
    engines: str | None = None  # export folder [default: engines/<model>-<precision>]
    device: str = "cpu"  # inside each replica: with num_gpus > 0, cuda is the GPU Ray gave it
    precision: str = "fp32"
    max_batch: int = 4  # images per engine call when exporting engines; batches are capped by the engines' own
    torch_mode: str = "eager"
    batch_wait_s: float = 0.01  # how long an idle stage waits for company before it runs a batch
    max_images: int = 8  # per request
    max_prompt_chars: int = 1000
    max_steps: int = 1000  # per stage
    max_upload_bytes: int = 20 * 2 ** 20
    timeout_s: float = 300.0  # a request still running after this is cancelled (504)
    # CPU: the stage replicas of one machine share its cores through lock files (unclip.serve.cores: a core per lane,
    # jobs wait for a free one and join bigger batches meanwhile) instead of all computing at once with every thread;
    # None: on for device cpu, off for GPUs
    exclusive_compute: bool | None = None
    cores: int | None = None  # the machine's cores the stages share (exclusive compute) [default: this process's]
    stages: dict[str, StageOptions] = field(default_factory=lambda: {s: StageOptions() for s in STAGES})

    def __post_init__(self):
        check_backend_choice(self.backend, self.precision, self.torch_mode)
        for name in ("max_batch", "max_images", "max_prompt_chars", "max_steps", "max_upload_bytes"):
            if getattr(self, name) < 1:
                raise RequestError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (math.isfinite(self.batch_wait_s) and self.batch_wait_s >= 0):
            raise RequestError(f"--batch-wait-ms must be a finite number >= 0, got {self.batch_wait_s * 1000:g}")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise RequestError(f"--timeout-s must be a finite number of seconds > 0, got {self.timeout_s}")
        if self.cores is not None and self.cores < 1:
            raise RequestError(f"--cores must be at least 1, got {self.cores}")
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise RequestError(f"unknown stage {min(unknown)!r} (the stages: {', '.join(STAGES)})")
        object.__setattr__(self, "stages", {s: self.stages.get(s, StageOptions()) for s in STAGES})
        for s, o in self.stages.items():
            if o.replicas < 1 or o.num_cpus < 0 or o.num_gpus < 0 or o.max_ongoing_requests < 1:
                raise RequestError(f"stage {s}: replicas and max_ongoing_requests must be >= 1 and num_cpus, "
                                   f"num_gpus >= 0, got {asdict(o)}")

    @property
    def node_lock(self) -> bool:
        return self.device == "cpu" if self.exclusive_compute is None else self.exclusive_compute

    def backend_request(self, threads: int | None = None):
        """The fields unclip.engine.backend.open_backend reads (threads: per session on the CPU; None: the cores)."""
        from types import SimpleNamespace
        return SimpleNamespace(backend=self.backend, model=self.model, engines=self.engines, device=self.device,
                               precision=self.precision, max_batch=self.max_batch, torch_mode=self.torch_mode,
                               threads=threads)

    @classmethod
    def from_args(cls, args: dict) -> ServeConfig:
        """From a `serve run` config's `args:` (plain values; stages as {name: {replicas: N, ...}})."""
        names = {f.name for f in fields(cls)}
        unknown = set(args) - names
        if unknown:
            raise RequestError(f"unknown argument {min(unknown)!r} (known: {', '.join(sorted(names))})")
        try:
            stages = {s: StageOptions(**o) for s, o in (args.get("stages") or {}).items()}
        except TypeError as e:
            raise RequestError(f"stages: {e} (each stage takes {', '.join(f.name for f in fields(StageOptions))})")
        return cls(**{**args, "stages": stages})
