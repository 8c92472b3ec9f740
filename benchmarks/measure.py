"""What benchmarks/latency.py measures with: per-network timers (CUDA events on a GPU), peak memory, the machine's
peak GFLOP/s per precision (the best of a few large GEMMs and convolutions), FLOPs per network call, and CUDA
launches per image."""
from __future__ import annotations

import collections
import resource
import time

import torch


class Timer:
    """Accumulates time and calls per network; CUDA events on a GPU (no sync inside the loop), else wall clock."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.spans: dict[str, list] = collections.defaultdict(list)

    def wrap(self, fn, name_of=lambda a, kw: a[0]):
        def timed(*a, **kw):
            name = name_of(a, kw)
            if self.cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                out = fn(*a, **kw)
                e.record()
                self.spans[name].append((s, e))
            else:
                t = time.perf_counter()
                out = fn(*a, **kw)
                self.spans[name].append(time.perf_counter() - t)
            return out
        return timed

    def totals(self) -> dict[str, tuple[float, int]]:
        """network -> (seconds, calls)."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for name, spans in self.spans.items():
            secs = sum(s.elapsed_time(e) / 1000 for s, e in spans) if self.cuda else sum(spans)
            out[name] = (secs, len(spans))
        return out


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _best_gflops(fn, flop: float, device: str, reps: int, budget_s: float = 2.0) -> float:
    """Best of 4 rounds of `reps` calls, with fewer calls where one call is slow (a precision this CPU only
    emulates: bf16 without AVX512-BF16 or AMX runs ~10x under fp32), so that a shape costs about budget_s."""
    def once() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    fn()  # warm-up (one-time set-up: cuBLAS, oneDNN primitives)
    first = once()
    if first > budget_s / 4:
        return flop / first / 1e9
    reps = max(1, min(reps, int(budget_s / 4 / first)))
    best = float("inf")
    for _ in range(4):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / reps)
    return flop / best / 1e9


@torch.inference_mode()
def peak_gflops(device: str, dtype: torch.dtype) -> tuple[float, dict]:
    """The machine's peak for this precision: the best of a few large GEMMs and 3x3 convolutions (channels-last,
    the layout the U-Nets run in), each timed best-of-4, so that no stage can honestly exceed 100% of it."""
    g = torch.Generator().manual_seed(0)
    shapes = {}
    for n in (1024, 2048):
        if n == 2048 and 2 * n ** 3 / (shapes["gemm 1024"] * 1e9) > 2.0:  # over 2 s a call: an emulated precision
            continue
        a = torch.randn(n, n, generator=g).to(device, dtype)
        b = torch.randn(n, n, generator=g).to(device, dtype)
        shapes[f"gemm {n}"] = _best_gflops(lambda: a @ b, 2 * n ** 3, device, 10 if n == 1024 else 3)
    for c, hw in ((128, 64), (256, 32), (64, 128)):
        x = torch.randn(4, c, hw, hw, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(c, c, 3, padding=1).to(device, dtype).to(memory_format=torch.channels_last)
        shapes[f"conv3x3 {c}ch {hw}px"] = _best_gflops(lambda: conv(x), 2 * 9 * c * c * hw * hw * 4, device, 5)
    return max(shapes.values()), shapes


def flops_per_call(model, batch: int) -> dict[str, float]:
    """FLOPs of one call of each network at the batch the pipeline runs it (guided stages at 2N)."""
    from torch.utils.flop_counter import FlopCounterMode
    from unclip.core.contract import contracts
    from unclip.core.spec import spec_from_model
    from unclip.core.stages import NETWORK_STAGE, can_guide
    spec = spec_from_model(model)
    out = {}
    for name, c in contracts(spec).items():
        if name == "image_encoder":
            continue
        b = batch * (2 if can_guide(NETWORK_STAGE[name]) else 1)
        inp = c.sample_inputs(b, spec)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model.networks()[name](*[inp[t.name] for t in c.inputs])
        out[name] = float(fc.get_total_flops())
    return out


def cuda_launches(gen) -> int:
    """CUDA kernel launches and graph replays of one image, counted by the profiler (CUPTI sees every library's)."""
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        gen(1)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
