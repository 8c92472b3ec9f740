"""The `tensorrt` backend: engines from `unclip-export --trt`, static device buffers, one activation-memory pool
shared by every engine, execute_async_v3. Inputs already on the device are bound in place; others are copied only
when they change (a stage's constant inputs once per stage). Returned tensors are the engine's own output buffers,
valid until the next call of that network. Written against the TensorRT 10 API; it has not run here (no GPU)."""
from __future__ import annotations

from pathlib import Path

import torch
from unclip.core import values
from unclip.core.artifacts import read_manifest, verify_files
from unclip.core.contract import Contract
from unclip.core.errors import ExportError
from unclip.core.packages import require_tensorrt
from unclip.core.spec import ModelSpec
from unclip.engine.backend import ExportedGraphs, failed
from unclip.engine.static import Binder


class TensorRTBackend(ExportedGraphs):  # pragma: no cover - needs TensorRT and a GPU
    name = "tensorrt"

    def __init__(self, export_dir: str | Path, device: str = "cuda", fix: str = "unclip-export --trt"):
        trt = require_tensorrt()
        self.dir = Path(values.path("engines", export_dir))
        self.fix = fix
        self.manifest = read_manifest(self.dir, fix)
        try:
            self.spec = ModelSpec.from_json(self.manifest["spec"])
        except (KeyError, TypeError, ValueError) as e:
            raise ExportError(f"{self.dir / 'manifest.json'}: its model description is unreadable ({e}); "
                              f"re-export: {fix} --force") from None
        self.device = torch.device(device)
        assert self.device.type == "cuda", device
        self.stream = torch.cuda.Stream(self.device)
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines: dict = {}
        self.pool = MemoryPool()

    def entry(self, network: str) -> dict:
        entry = self.manifest["networks"].get(network)
        if entry is None or "trt" not in entry:
            raise ExportError(f"{self.dir}: no TensorRT engine for {network}; run: {self.fix}")
        return entry

    def _load(self, network: str):
        if network not in self.engines:
            entry = self.entry(network)
            rec = entry["trt"]["file"]
            verify_files(self.dir, {"files": {rec["name"]: rec}}, network, self.fix + " --force")
            engine = self.runtime.deserialize_cuda_engine((self.dir / rec["name"]).read_bytes())
            if engine is None:
                raise ExportError(f"{self.dir / rec['name']}: TensorRT can't load this engine (built by another "
                                  f"TensorRT version or GPU?); rebuild it: {self.fix} --force")
            c = Contract.from_manifest(network, entry)
            hi = entry["profile"][2]
            buffers = {t.name: torch.empty(t.concrete(hi), device=self.device,
                                           dtype=torch.int64 if t.dtype == "int64" else torch.float32)
                       for t in c.inputs + c.outputs}
            ctx = shared_memory_context(self.trt, engine)
            self.engines[network] = (ctx, c, buffers, Binder())
            self.pool.need(engine, self.device)
        return self.engines[network]

    def run(self, network: str, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ctx, c, buffers, binder = self._load(network)
        B = feed[c.inputs[0].name].shape[0]
        assert B <= buffers[c.inputs[0].name].shape[0], (network, B)  # the pipeline chunks by max_batch
        for t in c.inputs:
            src, dt = feed[t.name], torch.int64 if t.dtype == "int64" else torch.float32
            if src.is_cuda and src.dtype == dt and src.is_contiguous():
                ptr = src.data_ptr()  # the caller's tensor, bound as it is: no copy
            else:
                view = buffers[t.name][:B]
                binder.bind(t.name, src, view)  # copied only when it changed (stage constants once per stage)
                ptr = view.data_ptr()
            ctx.set_input_shape(t.name, tuple(src.shape))
            ctx.set_tensor_address(t.name, ptr)
        outs = {}
        for t in c.outputs:
            view = buffers[t.name][:B]
            ctx.set_tensor_address(t.name, view.data_ptr())
            outs[t.name] = view
        self.pool.attach(ctx)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise failed(self.name, network, RuntimeError(f"execute_async_v3 returned False at batch {B}"))
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return outs


def shared_memory_context(trt, engine):
    """An execution context whose activation memory is the backend's shared pool (TensorRT 10 USER_MANAGED)."""
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    if strategy is not None:
        return engine.create_execution_context(strategy.USER_MANAGED)
    return engine.create_execution_context_without_device_memory()


class MemoryPool:
    """One device buffer for the activations of every engine (they run one at a time on one stream), grown to the
    largest engine's need, as the TensorRT diffusion demo shares activation memory across its engines."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def need(self, engine, device: torch.device) -> None:
        size = getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size
        if self.buffer is None or self.buffer.numel() < size:
            torch.cuda.current_stream(device).synchronize()  # no engine is using the old buffer any more
            self.buffer = torch.empty(size, dtype=torch.uint8, device=device)

    def attach(self, ctx) -> None:
        if hasattr(ctx, "set_device_memory"):
            ctx.set_device_memory(self.buffer.data_ptr(), self.buffer.numel())
        else:
            ctx.device_memory = self.buffer.data_ptr()
