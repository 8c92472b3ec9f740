"""The CPU cores of one machine, shared by the stage replicas on it: one lock file per core (flock: the kernel releases
a dead process's locks), and a `waiting` file that every replica with jobs waiting for a core holds shared. No Ray
here: the deployments (unclip.serve.stages) use it, and so can tests.

A stage's batch runs as lanes, each a group of its jobs on one core, started as cores come free, so different stages
compute at once on different cores; a free core goes to the latest stage that waits for one (finishing images frees
their clients to send the next request, and the early stages' jobs then batch together); a batch of one image that
finds the machine idle (every core free, nobody waiting) takes every core, so a lone request runs as fast as the
Python API; the backends that can't run lanes take every core."""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator


class Cores:
    def __init__(self, cores: int, tag: str, folder: str | None = None, ranks: int = 4):
        base = os.path.join(folder or tempfile.gettempdir(), f"unclip-serve-{os.getuid()}-{tag}")
        self.paths = [f"{base}-core{k}.lock" for k in range(cores)]
        self.waiting_path = f"{base}-waiting.lock"
        self.rank_paths = [f"{base}-waiting{r}.lock" for r in range(ranks)]  # per stage, in pipeline order

    def __len__(self) -> int:
        return len(self.paths)

    def free(self) -> int:
        """How many cores no batch holds now (each tried and released at once)."""
        n = 0
        for p in self.paths:
            fd = _try(p, fcntl.LOCK_EX)
            if fd is not None:
                os.close(fd)
                n += 1
        return n

    def idle(self) -> bool:
        """Every core free and no other replica waiting for one."""
        fd = _try(self.waiting_path, fcntl.LOCK_EX)  # fails while anyone holds it shared
        if fd is None:
            return False
        os.close(fd)
        return self.free() == len(self)

    @contextlib.contextmanager
    def waiting(self, rank: int | None = None) -> Iterator[None]:
        """Mark this replica (of the stage of `rank`) as waiting for a core."""
        fds: list[int] = []
        try:
            for p in [self.waiting_path] + ([self.rank_paths[rank]] if rank is not None else []):
                fds.append(_open(p))
                fcntl.flock(fds[-1], fcntl.LOCK_SH)
            yield
        finally:
            for fd in fds:
                os.close(fd)

    def later_waiting(self, rank: int) -> bool:
        """Whether a replica of a later stage waits for a core (it goes first)."""
        for p in self.rank_paths[rank + 1:]:
            fd = _try(p, fcntl.LOCK_EX)
            if fd is None:
                return True
            os.close(fd)
        return False

    def try_one(self, rank: int) -> Callable[[], None] | None:
        """A free core for a lane of the stage of `rank` (call the answer to give it back), unless none is free or a
        later stage waits for one."""
        if self.later_waiting(rank):
            return None
        for p in self.paths:
            fd = _try(p, fcntl.LOCK_EX)
            if fd is not None:
                return lambda: os.close(fd)
        return None

    @contextlib.contextmanager
    def every(self) -> Iterator[int]:
        """Every core (in order, blocking: the lane takers never wait while holding one, so this ends)."""
        fds: list[int] = []
        try:
            with self.waiting():
                for p in self.paths:
                    fd = _open(p)
                    fds.append(fd)
                    fcntl.flock(fd, fcntl.LOCK_EX)
            yield len(fds)
        finally:
            for fd in fds:
                os.close(fd)


def _open(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


def _try(path: str, how: int) -> int | None:
    fd = _open(path)
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
