"""The stage deployments: prior (text_encoder + prior, and image_encoder for variations), decoder (text_proj +
decoder), sr256, sr1024. Each replica opens its backend once and runs jobs (unclip.serve.jobs) in batches across
requests with @serve.batch, up to the engines' images per call.

Batching: a stage takes every job that queued while it was busy into its next batch, and when idle waits at most
batch_wait_s for company. @serve.batch alone forms the next batch as soon as the current one starts, from whatever
arrived in the wait window (often one job); so jobs wait at a gate while a batch runs and enter the queue together
when it ends. On the CPU (`--exclusive-compute`, the default there), the stage replicas of one machine share its
cores through lock files (unclip.serve.cores): with onnxruntime a batch runs as lanes, one single-threaded group of
its jobs per core it gets, so stages compute side by side on different cores (a 2-core CPU serves about 1.3x the
images per second this way than with both cores on one call, the networks scale poorly across cores); a lone image
on an idle machine takes every core (no latency lost at one client); the other backends take every core per batch.
Jobs that arrive while no core is free wait at the gate and run as one batch. The networks run in worker threads:
the replica keeps answering (health checks, cancellations)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time

from ray import serve
from ray.serve.metrics import Counter, Histogram
from unclip.engine.backend import open_backend
from unclip.engine.pipeline import images_per_call
from unclip.serve.config import STAGES, ServeConfig
from unclip.serve.cores import Cores
from unclip.serve.jobs import Job, run_in_lanes, run_stage, start_variation

log = logging.getLogger(__name__)
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 32, 64]
SECONDS_BUCKETS = [0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300]


@serve.deployment
class StageReplica:
    def __init__(self, cfg: ServeConfig, stage: str):
        self.stage = stage
        self.rank = STAGES.index(stage)  # a free core goes to the latest stage waiting for one
        self.backend = open_backend(cfg.backend_request(threads=cfg.cores if cfg.node_lock else None), notify=log.info)
        self.per_call = images_per_call(self.backend)
        # the machine's cores, shared with the other stage replicas on it (None: GPUs, or --shared-compute)
        self.cores = Cores(cfg.cores or len(os.sched_getaffinity(0)), cfg.device) if cfg.node_lock else None
        # lanes: the same engines at one thread per session, run from one worker thread per core (onnxruntime's
        # sessions may run concurrently; the torch and OpenVINO backends hold per-call state, so they don't)
        self.lanes = None
        if self.cores is not None and cfg.backend == "onnxruntime" and cfg.device == "cpu":
            self.lanes = open_backend(cfg.backend_request(threads=1), notify=log.info)
        self.run_batch.set_max_batch_size(self.per_call)
        self.run_batch.set_batch_wait_timeout_s(cfg.batch_wait_s)
        self.running = 0  # batches running now
        # one thread at a time in the backend: sessions with I/O bindings, TensorRT contexts and static buffers are
        # not thread-safe (a variation's embedding and a batch of the prior would otherwise interleave)
        self.lock = threading.Lock()
        self.polling: asyncio.Future | None = None  # one poll of the machine's cores that every waiting job shares
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
        if self.cores is not None:  # and while the other stages of this machine hold every core, wait here
            if self.polling is None:
                self.polling = asyncio.ensure_future(asyncio.to_thread(self._until_a_core_is_free))
                self.polling.add_done_callback(self._polled)  # cleared on the loop, when the jobs go on
            await asyncio.shield(self.polling)
        job = await self.run_batch(job)
        if job.error is not None:
            raise job.error
        return job

    def _until_a_core_is_free(self) -> None:
        with self.cores.waiting(self.rank):
            while not self.cores.free():
                time.sleep(0.02)

    def _polled(self, _) -> None:
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
        with self.lock:
            if self.cores is None:
                return run_stage(self.backend, self.stage, jobs, self.per_call, on_call)
            if self.lanes is None or (len(jobs) == 1 and self.cores.idle()):
                with self.cores.every():
                    return run_stage(self.backend, self.stage, jobs, self.per_call, on_call)
            return run_in_lanes(self.lanes, self.stage, jobs, self.per_call, len(self.cores), on_call,
                                acquire=lambda: self.cores.try_one(self.rank),
                                waiting=lambda: self.cores.waiting(self.rank))

    async def variation_jobs(self, image, settings, n: int) -> list[Job]:
        """A variation request's jobs: the image's CLIP embedding and the empty prompt's text rows (prior only)."""
        from unclip.engine.manipulate import empty_text, image_embedding

        def embed():
            with self.lock, (self.cores.every() if self.cores is not None else contextlib.nullcontext()):
                z = image_embedding(self.backend, self.backend.spec, image)  # (1, D)
                # the empty prompt's rows in calls of at most the engines' images per call, as unclip-run chunks
                texts = [empty_text(self.backend, self.backend.spec, settings, min(self.per_call, n - i))
                         for i in range(0, n, self.per_call)]
            return start_variation(z.expand(n, -1), texts, settings)
        return await asyncio.to_thread(embed)
