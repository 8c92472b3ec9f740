"""What travels between the stage deployments: one Job per image, and the functions that run a stage over a batch of
jobs from different requests. No Ray here: the deployments (unclip.serve.stages) call these, and so can tests.

A job is one image of one request. Its noise comes from its own generator (seed + i), whose state the job carries
from stage to stage, so an image is the same whether a stage ran it alone or batched with other requests' images:
each stage calls the same pipeline function that unclip.engine.pipeline.generate calls, on the jobs' rows stacked.
Jobs share a stage's network calls when the settings that stage reads are the same (`Job.key(stage)`): its steps and
guidance, the sampler and eta, and whether the text rows are guided. A call that fails is run again one job at a
time, so one request's NaN or error stays with that request."""
from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace

import torch
from unclip.core.errors import UnclipError
from unclip.core.stages import IMAGE_STAGES, guided
from unclip.engine.pipeline import (
    Noise,
    Settings,
    Text,
    decode,
    encode_text,
    final_stage,
    sample_prior,
    upsample_stage,
)

STAGE_SETTINGS = {"prior": ("prior_steps", "prior_guidance"), "decoder": ("decoder_steps", "decoder_guidance"),
                  "sr256": ("sr256_steps",), "sr1024": ("sr1024_steps",)}


@dataclass
class Job:
    """One image: its settings (seed = this image's seed, num_images = 1) and what the stages made so far, on the
    CPU (replicas may sit on different devices)."""
    settings: Settings
    prompt: str = ""
    candidates: int = 1  # best-of-k image embeddings (prior)
    state: torch.Tensor | None = None  # the image's generator state; None: fresh from settings.seed
    z: torch.Tensor | None = None  # (1, D) image embedding
    text: Text | None = None  # its text rows: [uncond; cond] (2) when guided, [cond] (1) otherwise
    image: torch.Tensor | None = None  # (1, 3, S, S) in [-1, 1], the last stage's output
    batches: dict[str, int] = field(default_factory=dict)  # stage -> images in the call that ran it
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> seconds that call took
    error: UnclipError | None = None  # what failed its call (the other calls of the batch go on)

    def key(self, stage: str) -> tuple:
        """Jobs with equal keys share `stage`'s network calls: every setting that stage reads is the same."""
        s = self.settings
        own = tuple(getattr(s, f) for f in STAGE_SETTINGS[stage])
        text_rows = guided("text_encoder", s) if stage in ("prior", "decoder") else None  # [uncond; cond] or [cond]
        return (*own, s.sampler, s.eta, text_rows, self.candidates if stage == "prior" else None)

    def stages(self, spec) -> list[str]:
        """The image stages this job runs, decoder first (its size decides where it stops)."""
        return list(IMAGE_STAGES[:IMAGE_STAGES.index(final_stage(spec, self.settings.size)) + 1])


def split_text(text: Text) -> list[Text]:
    """A batch's text conditioning -> one Text per image, keeping the [uncond; cond] layout."""
    n = text.cond().e.shape[0]
    out = []
    for i in range(n):
        rows = [i, n + i] if text.guided else [i]
        out.append(Text(text.ids[rows].cpu(), text.mask[rows].cpu(), text.e[rows].cpu(), text.H[rows].cpu(),
                        text.guided))
    return out


def join_text(parts: list[Text], device: torch.device) -> Text:
    """One Text per image -> the batch's, rows [uncond of each; cond of each] as encode_text lays them out."""
    guided = parts[0].guided
    assert all(p.guided == guided for p in parts), "jobs with different guidance share a batch"

    def stack(name: str, dev: torch.device) -> torch.Tensor:
        rows = [getattr(p, name) for p in parts]
        halves = [r[:1] for r in rows] + [r[1:] for r in rows] if guided else rows
        return torch.cat(halves).to(dev)

    cpu = torch.device("cpu")
    return Text(stack("ids", cpu), stack("mask", device), stack("e", device), stack("H", device), guided)


def groups(jobs: list[Job], per_call: int, stage: str) -> list[list[Job]]:
    """Jobs that can share `stage`'s network calls, in calls of at most per_call images (arrival order kept)."""
    by_key: dict[object, list[Job]] = {}
    for j in jobs:
        by_key.setdefault(j.key(stage), []).append(j)
    return [g[i:i + per_call] for g in by_key.values() for i in range(0, len(g), per_call)]


LANE_POLL_S = 0.01  # how often a batch with lanes still to start asks for a free core
OnCall = Callable[[int, float], None]  # (images in the call, seconds): the deployments' metrics


def _timed(stage: str, group: list[Job], run: Callable[[list[Job]], None], on_call: OnCall | None) -> None:
    """Run one call's worth of jobs. If it fails (NaN, a backend's error, a bug), each job is run again alone, so
    the failure stays with the jobs that cause it and the others' images are what they would be alone."""
    t = time.perf_counter()
    try:
        run(group)
    except Exception as e:  # noqa: BLE001 - whatever it is, it belongs to this call's jobs, not to the whole batch
        if len(group) > 1:
            for j in group:
                _timed(stage, [j], run, on_call)
            return
        group[0].error = e if isinstance(e, UnclipError) else UnclipError(
            f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no message'}")
    dt = time.perf_counter() - t
    for j in group:
        j.batches[stage], j.seconds[stage] = len(group), dt
    if on_call is not None:
        on_call(len(group), dt)


def run_prior(backend, jobs: list[Job], per_call: int, on_call: OnCall | None = None) -> list[Job]:
    """text_encoder + prior: each job's image embedding, text rows and generator state after the prior's draws."""
    spec = backend.spec
    chunks = [c for k in sorted({j.candidates for j in jobs})  # best-of-k: k rows per image
              for c in groups([j for j in jobs if j.candidates == k], per_call // k, "prior")]
    for group in chunks:
        def run(group):
            s = group[0].settings
            noise = Noise.from_seeds([j.settings.seed for j in group], backend.device)
            text = encode_text(backend, spec, [j.prompt for j in group], s,
                               negatives=[j.settings.negative for j in group])
            z = sample_prior(backend, spec, s, text, noise, candidates=group[0].candidates).z
            for j, z_j, t_j, st in zip(group, z.cpu().split(1), split_text(text), noise.get_state()):
                j.z, j.text, j.state = z_j.clone(), t_j, st
        _timed("prior", group, run, on_call)
    return jobs


def start_variation(z: torch.Tensor, texts: list[Text], settings: Settings) -> list[Job]:
    """The jobs of a variation request (manipulate.variation's data flow): the image's embedding z (N, D) and the
    empty prompt's text rows (encoded in chunks), generators fresh from seed + i (no prior draws)."""
    rows = [t for text in texts for t in split_text(text)]
    return [Job(replace(settings, seed=settings.seed + i, num_images=1), z=z_i.clone(), text=t_i,
                state=torch.Generator().manual_seed(settings.seed + i).get_state())
            for i, (z_i, t_i) in enumerate(zip(z.cpu().split(1), rows))]


def run_decoder(backend, jobs: list[Job], per_call: int, on_call: OnCall | None = None) -> list[Job]:
    """text_proj + decoder: each job's decoder image (clamped to [-1, 1]) and generator state."""
    spec, dev = backend.spec, backend.device
    for group in groups([j for j in jobs if j.error is None], per_call, "decoder"):
        def run(group):
            noise = _noise(group, dev)
            z = torch.cat([j.z for j in group]).to(dev)
            x, _ = decode(backend, spec, group[0].settings, z, join_text([j.text for j in group], dev), noise)
            _keep(group, x, noise)
            for j in group:  # the upsamplers read only the image: less to carry between replicas
                j.z = j.text = None
        _timed("decoder", group, run, on_call)
    return jobs


def run_upsampler(backend, stage: str, jobs: list[Job], per_call: int,
                  on_call: OnCall | None = None) -> list[Job]:
    """sr256 or sr1024: each job's image at the stage's size, and generator state."""
    spec, dev = backend.spec, backend.device
    for group in groups([j for j in jobs if j.error is None], per_call, stage):
        def run(group):
            noise = _noise(group, dev)
            low = torch.cat([j.image for j in group]).to(dev)
            x, _ = upsample_stage(backend, spec, group[0].settings, stage, low, noise)
            _keep(group, x, noise)
        _timed(stage, group, run, on_call)
    return jobs


def run_stage(backend, stage: str, jobs: list[Job], per_call: int, on_call: OnCall | None = None) -> list[Job]:
    """One stage over a batch of jobs (prior, decoder, sr256 or sr1024)."""
    if stage == "prior":
        return run_prior(backend, jobs, per_call, on_call)
    if stage == "decoder":
        return run_decoder(backend, jobs, per_call, on_call)
    return run_upsampler(backend, stage, jobs, per_call, on_call)


def lanes(jobs: list[Job], cores: int) -> list[list[Job]]:
    """A batch's jobs in at most `cores` groups of near-equal size (arrival order kept), one per lane."""
    n = max(1, min(cores, len(jobs)))
    size, extra = divmod(len(jobs), n)
    out, i = [], 0
    for k in range(n):
        out.append(jobs[i:i + size + (k < extra)])
        i += size + (k < extra)
    return out


def run_in_lanes(backend, stage: str, jobs: list[Job], per_call: int, cores: int, on_call: OnCall | None = None,
                 acquire: Callable[[], Callable[[], None] | None] | None = None,
                 waiting: Callable[[], contextlib.AbstractContextManager] | None = None) -> list[Job]:
    """The stage over a batch as up to `cores` lanes at once, each a group of the jobs on one thread (`backend`'s
    sessions single-threaded, the sampler's torch ops too): on a small CPU this serves more images per second than
    every core on one call (the networks scale poorly across cores); each image is the same as alone. A lane starts
    when `acquire` gives it a core (a function that gives it back; None: not now, asked again shortly), within
    `waiting` (what marks the stage as waiting for cores) until every lane has started; without `acquire`, at once."""
    parts = collections.deque(lanes(jobs, cores))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    futures = []
    try:
        with ThreadPoolExecutor(len(parts), thread_name_prefix=f"{stage}-lane") as pool, \
                (waiting() if waiting else contextlib.nullcontext()):
            while parts:
                release = acquire() if acquire else (lambda: None)
                if release is None:
                    running = [f for f in futures if not f.done()]
                    if running:  # a lane of this batch ending frees a core: look again then, or shortly
                        wait(running, timeout=LANE_POLL_S, return_when=FIRST_COMPLETED)
                    else:
                        time.sleep(LANE_POLL_S)
                    continue
                try:
                    futures.append(pool.submit(_lane, backend, stage, parts.popleft(), per_call, on_call, release))
                except BaseException:
                    release()
                    raise
        for f in futures:
            f.result()
    finally:
        torch.set_num_threads(threads)
    return jobs


def _lane(backend, stage: str, part: list[Job], per_call: int, on_call: OnCall | None, release) -> None:
    try:
        run_stage(backend, stage, part, per_call, on_call)
    finally:
        release()


def _noise(group: list[Job], device: torch.device) -> Noise:
    assert all(j.state is not None for j in group), "a job reached an image stage before its noise was seeded"
    return Noise.from_states([j.state for j in group], device)


def _keep(group: list[Job], x: torch.Tensor, noise: Noise) -> None:
    for j, x_j, st in zip(group, x.cpu().split(1), noise.get_state()):
        j.image, j.state = x_j.clone(), st
