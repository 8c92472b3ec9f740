"""The stage deployments: prior (text_encoder + prior, and image_encoder for variations), decoder (text_proj +
decoder), sr256, sr1024. Each replica opens its backend once and runs jobs (unclip.serve.jobs) in batches across
requests with @serve.batch, up to the engines' images per call.

Batching: a stage takes every job that queued while it was busy into its next batch, and when idle waits at most
batch_wait_s for company. @serve.batch alone forms the next batch as soon as the current one starts, from whatever
arrived in the wait window (often one job); so jobs wait at a gate while a batch runs and enter the queue together
when it ends. On the CPU (exclusive compute), the stages of one machine also take turns through a lock file: a stage
computes only while no other does, so they don't split the cores, and the jobs that arrive while another stage
computes wait at the gate and run as one batch when the machine is free. The networks run in a worker thread: the
replica keeps answering (health checks, cancellations)."""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import tempfile
import threading

from ray import serve
from ray.serve.metrics import Counter, Histogram
from unclip.engine.backend import open_backend
from unclip.engine.pipeline import images_per_call
from unclip.serve.config import ServeConfig
from unclip.serve.jobs import (
    Job,
    run_decoder,
    run_prior,
    run_upsampler,
    start_variation,
)

log = logging.getLogger(__name__)
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 32, 64]
SECONDS_BUCKETS = [0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300]


@serve.deployment
class StageReplica:
    def __init__(self, cfg: ServeConfig, stage: str):
        self.stage = stage
        self.backend = open_backend(cfg.backend_request(), notify=log.info)
        self.per_call = images_per_call(self.backend)
        self.run_batch.set_max_batch_size(self.per_call)
        self.run_batch.set_batch_wait_timeout_s(cfg.batch_wait_s)
        self.running = 0  # batches running now
        # one thread at a time in the backend: sessions with I/O bindings, TensorRT contexts and static buffers are
        # not thread-safe (a variation's embedding and a batch of the prior would otherwise interleave)
        self.lock = threading.Lock()
        self.node = _node_lock_path(cfg) if cfg.node_lock else None
        self.polling: asyncio.Future | None = None  # one poll of the machine's lock that every waiting job shares
        self.idle = asyncio.Condition()
        self.batch_images = Histogram("unclip_stage_batch_images", "images per network call batch, per stage",
                                      BATCH_BUCKETS, tag_keys=("stage",))
        self.batch_seconds = Histogram("unclip_stage_batch_seconds", "seconds per batch, per stage", SECONDS_BUCKETS,
                                       tag_keys=("stage",))
        self.images = Counter("unclip_stage_images", "images run, per stage", tag_keys=("stage",))
        for m in (self.batch_images, self.batch_seconds, self.images):
            m.set_default_tags({"stage": stage})

    def info(self) -> dict:
        """What the ingress checks requests against."""
        return {"spec": self.backend.spec.to_json(), "per_call": self.per_call}

    async def run(self, job: Job) -> Job:
        async with self.idle:
            await self.idle.wait_for(lambda: self.running == 0)  # join the batch that forms when this one ends
        if self.node is not None:  # and while another stage of this machine computes, wait with the others here
            if self.polling is None:
                self.polling = asyncio.ensure_future(self._until_node_free())
            await asyncio.shield(self.polling)
        job = await self.run_batch(job)
        if job.error is not None:
            raise job.error
        return job

    async def _until_node_free(self) -> None:
        try:
            while not _node_free(self.node):
                await asyncio.sleep(0.02)
        finally:
            self.polling = None

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)  # both set from the engines and config in __init__
    async def run_batch(self, jobs: list[Job]) -> list[Job]:
        self.running += 1
        calls: list[tuple[int, float]] = []  # (images, seconds) per network-call batch
        try:
            return await asyncio.to_thread(self._compute, jobs, lambda n, s: calls.append((n, s)))
        finally:
            self.running -= 1
            async with self.idle:
                self.idle.notify_all()
            for n, seconds in calls:
                self.batch_images.observe(n)
                self.batch_seconds.observe(seconds)
                self.images.inc(n)

    def _compute(self, jobs: list[Job], on_call) -> list[Job]:
        with self.lock, _holding(self.node):
            return self._stage(jobs, on_call)

    def _stage(self, jobs: list[Job], on_call) -> list[Job]:
        if self.stage == "prior":
            return run_prior(self.backend, jobs, self.per_call, on_call)
        if self.stage == "decoder":
            return run_decoder(self.backend, jobs, self.per_call, on_call)
        return run_upsampler(self.backend, self.stage, jobs, self.per_call, on_call)

    async def variation_jobs(self, image, settings, n: int) -> list[Job]:
        """A variation request's jobs: the image's CLIP embedding and the empty prompt's text rows (prior only)."""
        from unclip.engine.manipulate import empty_text, image_embedding

        def embed():
            with self.lock, _holding(self.node):
                z = image_embedding(self.backend, self.backend.spec, image)  # (1, D)
                # the empty prompt's rows in calls of at most the engines' images per call, as unclip-run chunks
                texts = [empty_text(self.backend, self.backend.spec, settings, min(self.per_call, n - i))
                         for i in range(0, n, self.per_call)]
            return start_variation(z.expand(n, -1), texts, settings)
        return await asyncio.to_thread(embed)


def _node_lock_path(cfg: ServeConfig) -> str:
    """The lock file that the stage replicas on one machine share (per user and device)."""
    return os.path.join(tempfile.gettempdir(), f"unclip-serve-{os.getuid()}-{cfg.device}.lock")


def _node_free(path: str) -> bool:
    """Whether no stage of this machine holds its compute lock now (a non-blocking try, released at once)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def _holding(path: str | None):
    """The machine's compute lock (flock: released by the kernel if a replica dies holding it)."""
    if path is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
